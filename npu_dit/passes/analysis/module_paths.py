"""Module path of every node, from Dynamo's `nn_module_stack` metadata.

Dynamo records, for each node, the stack of modules whose forward produced it, as source strings such
as `L['self'].__dict__['_modules']['transformer_blocks'].0.attn`. We normalise those to the dotted
names users know from `named_modules()` (`transformer_blocks.0.attn`). Passes match on these paths,
on op targets and on shapes, never on `node.name`.
"""

from __future__ import annotations

import re

import torch.fx as fx

_ROOT = re.compile(r"^L\[['\"][A-Za-z_][A-Za-z0-9_]*['\"]\]")
_DICT_MODULES = re.compile(r"\.__dict__\[['\"]_modules['\"]\]\[['\"]([^'\"]+)['\"]\]")
_PRIVATE_MODULES = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_ITEM = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def normalize_path(source: str) -> str:
    path = _ROOT.sub("", source)
    path = _DICT_MODULES.sub(r".\1", path)
    path = _PRIVATE_MODULES.sub(r".\1", path)
    path = _ITEM.sub(r".\1", path)
    return path.lstrip(".")


def _type_name(module_type: object) -> str:
    if isinstance(module_type, str):
        return module_type.rsplit(".", 1)[-1]
    return getattr(module_type, "__name__", str(module_type))


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(path, class name) of every module on the node's stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(normalize_path(path), _type_name(kind)) for path, kind in stack.values()]


def module_path(node: fx.Node) -> str:
    """Innermost module path of `node` ('' for code in the root module's own forward)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def module_type(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][1] if stack else ""


def indexed_ancestor(node: fx.Node) -> tuple[str, str] | None:
    """The outermost module on the node's stack that is an element of a ModuleList (`blocks.3`)."""
    for path, kind in module_stack(node):
        last = path.rsplit(".", 1)[-1]
        if last.isdigit():
            return path, kind
    return None


def source_line(node: fx.Node) -> str:
    """Where the model wrote the op: 'transformer_flux.py:412: y = torch.roll(x, 1, 1)' (the last frame
    of Dynamo's recorded stack), or '' when the node has none (a node a pass inserted)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line for line in trace.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith("File "):
            parts = line.split('"')
            if len(parts) < 3:
                return ""
            path = parts[1].rsplit("/", 1)[-1]
            number = parts[2].split("line", 1)[-1].split(",", 1)[0].strip()
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{path}:{number}: {code}" if code else f"{path}:{number}"
    return ""
