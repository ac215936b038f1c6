"""Pass infrastructure: `PassResult`, the one runner that does every pass's chores, graph dumps.

A pass is a plain function `xxx_pass(gm, *, cfg, ...) -> PassResult`, bound with `functools.partial`
into the ordered list that `pipeline.build_pipeline` returns. Passes never print, time themselves or
recompile: `run_passes` lints, recompiles, times, counts what fired and dumps the graph before and
after each pass when asked. If a pass refuses (`Refusal`: it cannot prove its rewrite exact here) or
raises anything but a `UserError`, the runner drops the whole rewrite and returns the unrewritten
graph with one warning: a graph we cannot handle runs as it was
captured, never as a wrong program.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import traceback
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module

from npu_dit.errors import Refusal, UserError, warn_user  # noqa: F401 - re-exported for the passes

log = logging.getLogger("npu_dit")




@dataclasses.dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    # what fired, e.g. {"all_to_all": 228}; summed over the pipeline into the report
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    # facts a pass wants shown to the user (inspect prints them), e.g. per-site decisions
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable[[fx.GraphModule], PassResult]
    # numerics-preserving passes are tested bitwise against the unrewritten graph
    preserves_numerics: bool = True
    # passes that change shapes (sharding) promise true local shapes in meta["val"]; the runner
    # checks the promise by propagating the rewritten graph again
    changes_shapes: bool = False


@dataclasses.dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    counts: dict[str, int]
    notes: list[str]


@dataclasses.dataclass
class PipelineReport:
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    fell_back: bool = False
    fallback_reason: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for record in self.records:
            for key, value in record.counts.items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy: new graph and nodes, node.meta copied shallowly, same submodules/attrs."""
    graph = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    value_remap: dict[fx.Node, fx.Node] = {}
    output_value = graph.graph_copy(gm.graph, value_remap)
    graph.output(output_value)
    for old, new in value_remap.items():
        new.meta = dict(old.meta)
    # lazy: the Python code of a 7,000-node graph is generated when it is first run, not for each copy
    clone = _make_graph_module(gm, graph, graph_module_cls=_LazyGraphModule)
    clone.meta = dict(getattr(gm, "meta", {}))
    clone.meta.pop(ANALYSIS_CACHE_KEY, None)
    return clone


ANALYSIS_CACHE_KEY = "npu_dit.analysis"


def invalidate_analyses(gm: fx.GraphModule) -> None:
    gm.meta.pop(ANALYSIS_CACHE_KEY, None)


def count_nodes(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


def graph_text(gm: fx.GraphModule) -> str:
    """Readable dump: one line per node with its shape and module path, then the Python code."""
    from npu_dit.passes.analysis.module_paths import module_path

    lines = []
    for node in gm.graph.nodes:
        val = node.meta.get("val", node.meta.get("example_value"))
        shape = ""
        if isinstance(val, torch.Tensor):
            shape = f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
        elif isinstance(val, (torch.SymInt, int)):
            shape = f"int={val}"
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        args = ", ".join(str(a) for a in node.args)
        lines.append(f"{node.op:13} {node.name:40} {str(target):36} {shape:36} {module_path(node)}   ({args[:160]})")
    return "\n".join(lines) + "\n\n# ---- code ----\n" + gm.code


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def dump_graph(gm: fx.GraphModule, dump_dir: str, stem: str) -> str:
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, _safe(stem) + ".txt")
    with open(path, "w") as f:
        f.write(graph_text(gm))
    return path


# The meta lint. Every shape-changing pass ends by propagating its whole graph again
# (`fake_prop.repropagate`), which gives every node a new value: a value recorded before the pass
# (left in place, or copied to a new node by hand) is stale. That check is one walk over the nodes
# and always runs. Propagating once more and comparing every shape (the
# same computation the pass just did: ~40 % of a tiny model's compile, minutes at full size) runs
# with NPU_DIT_LINT=1; tests/test_sound_sharding.py does it explicitly.


def _recorded_values(gm: fx.GraphModule) -> dict:
    from npu_dit.passes.analysis.fake_prop import recorded_values

    return recorded_values(gm)


def _lint_meta(gm: fx.GraphModule, name: str, values_before: dict) -> None:
    from npu_dit.passes.analysis.fake_prop import meta_mismatches, stale_meta

    problems = stale_meta(gm, values_before)
    if not problems and os.environ.get("NPU_DIT_LINT") == "1":
        problems = meta_mismatches(gm)
    if problems:
        raise AssertionError(f"pass {name} left stale shapes in meta['val']: " + "; ".join(problems))


def _accurate(refusal: Refusal) -> str:
    """The refusal as the user should read it. A pass that finds a size static suggests
    `dynamic=True`; under `dynamic=True` (Dynamo's `assume_static_by_default` is off while the backend
    runs) a size is static because it is 0 or 1, which Dynamo always specialises: say that instead."""
    import torch._dynamo.config

    fix = refusal.fix
    if fix is not None and "dynamic=True" in fix and not torch._dynamo.config.assume_static_by_default:
        fix = ("this graph was compiled with dynamic=True, but Dynamo makes a size of 0 or 1 a constant "
               "(0/1 specialisation), so an input this small cannot be split; nothing to change: it runs whole "
               "on every rank, and larger inputs compile a graph that is split")
    return refusal.reason if fix is None else f"{refusal.reason}. {fix}"


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[PassSpec],
    *,
    dump_dir: str | None = None,
    graph_tag: str = "graph",
) -> tuple[fx.GraphModule, PipelineReport]:
    """Run `passes` in order on a copy of `gm`; return the rewritten module and a report.

    On an unexpected failure the unrewritten `gm` is returned (report.fell_back is True) after one
    warning that names the pass and the error. `UserError`s propagate unchanged.
    """
    report = PipelineReport()
    if not passes:
        if dump_dir:
            dump_graph(gm, dump_dir, f"{graph_tag}_00_captured")
        return gm, report
    work = clone_graph_module(gm)
    for index, spec in enumerate(passes):
        stem = f"{graph_tag}_{index + 1:02d}_{spec.name}"
        if dump_dir:
            dump_graph(work, dump_dir, stem + "_before")
        nodes_before = count_nodes(work)
        values_before = _recorded_values(work) if spec.changes_shapes else {}
        start = time.perf_counter()
        try:
            result = spec.fn(work)
            if result.modified:
                result.graph_module.graph.lint()
                result.graph_module.recompile()
                invalidate_analyses(result.graph_module)
                if spec.changes_shapes:
                    _lint_meta(result.graph_module, spec.name, values_before)
        except UserError:
            raise
        except Refusal as exc:  # the pass cannot prove its rewrite exact for this graph
            reason = f"{spec.name} refused: {_accurate(exc)}"
            warn_user(f"npu_dit: {reason}. Running this graph without npu_dit's rewrites (results stay correct).")
            report.fell_back = True
            report.fallback_reason = reason
            return gm, report
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the captured graph
            reason = f"pass {spec.name!r} failed: {type(exc).__name__}: {exc}"
            log.debug("npu_dit fallback traceback:\n%s", traceback.format_exc())
            warn_user(
                f"npu_dit: {reason}. Running the captured graph without npu_dit's rewrites "
                f"(results stay correct; set NPU_DIT_DUMP_DIR to see the graphs, or report this graph)."
            )
            report.fell_back = True
            report.fallback_reason = reason
            return gm, report
        seconds = time.perf_counter() - start
        work = result.graph_module
        report.records.append(
            PassRecord(
                name=spec.name,
                modified=result.modified,
                seconds=seconds,
                nodes_before=nodes_before,
                nodes_after=count_nodes(work),
                counts=dict(result.counts),
                notes=list(result.notes),
            )
        )
        if dump_dir:
            dump_graph(work, dump_dir, stem + "_after")
    return work, report
