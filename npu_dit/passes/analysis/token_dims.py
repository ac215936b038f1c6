"""Token dimensions: which input dims, which dims of tensors built inside the graph, and which output
dims carry the tokens that reach attention's sequence axis.

Nothing here knows a model. `dim_flow` propagates dims through the dataflow; the atoms that reach the
sequence axis of some attention call (query or key side) are the *token segments* (FLUX: text, image;
Qwen-Image-Edit: text, target image, each input image). Every tensor dim made only of token segments
is a token dim. Dynamo's symbolic sizes say which segments are dynamic (`s50`) and which specialised
to a constant (Qwen-Image's text length under `dynamic=True`); both are reported.

For FLUX this finds hidden_states dim 1, encoder_hidden_states dim 1, img_ids dim 0, txt_ids dim 0
and output dim 1 — the plan diffusers writes by hand in `FluxTransformer2DModel._cp_plan`.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from npu_dit.passes.analysis._cache import cached_analysis
from npu_dit.passes.analysis.attention_ops import attention_qkv, is_attention_call, node_value
from npu_dit.passes.analysis.dim_flow import FlowResult, Seq, _attention_seq_dims, dim_flow
from npu_dit.passes.analysis.module_paths import module_path
from npu_dit.errors import Refusal


@dataclasses.dataclass(frozen=True)
class TokenSegment:
    id: int
    atom: int
    size: sympy.Expr
    hint: int | None
    origin: str  # where the segment first appears, e.g. "hidden_states[1]" or "pos_embed: reshape"

    @property
    def dynamic(self) -> bool:
        return bool(self.size.free_symbols)


@dataclasses.dataclass(frozen=True)
class TokenDim:
    node: fx.Node
    dim: int
    segments: tuple[int, ...]  # TokenSegment ids, in order along the dim
    size: sympy.Expr
    name: str

    @property
    def dynamic(self) -> bool:
        return bool(self.size.free_symbols)

    def describe(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"{self.name} dim {self.dim} ({kind}, {self.size})"


@dataclasses.dataclass(frozen=True)
class AttentionTokens:
    node: fx.Node
    query_segments: tuple[int, ...]
    key_segments: tuple[int, ...]
    size: sympy.Expr


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """A token segment made inside the graph from an input's spatial dims: row-major patches,
    token i*cols + j = patch (i, j) of `input_name` (rows: dim `row_dim` in patches of `patch[0]`,
    columns: dim `col_dim` in patches of `patch[1]`), by a convolution with kernel == stride or by a
    reshape/permute patchify."""

    segment: int
    input: fx.Node
    input_name: str
    row_dim: int
    col_dim: int
    patch: tuple[int, int]
    # outer factors before the rows ((dim, patch) of the input, outermost first): a video's frames.
    # The grid's "rows" are then all of them times the row dim's patches: still contiguous runs of
    # `cols` tokens, cut in whole rows
    lead: tuple[tuple[int, int], ...] = ()

    def describe(self) -> str:
        lead = "".join(f"{d} ({p}), " for d, p in self.lead)
        return (f"{self.input_name} dims {lead}{self.row_dim}, {self.col_dim} in {self.patch[0]}x{self.patch[1]} "
                f"patches")


@dataclasses.dataclass
class TokenDims:
    flow: FlowResult
    segments: list[TokenSegment]
    inputs: list[TokenDim]
    built: list[TokenDim]
    outputs: list[TokenDim]
    attention: list[AttentionTokens]
    by_node: dict[fx.Node, list[tuple[int, tuple[int, ...]]]]  # node -> [(dim, segment ids)]
    grids: dict[int, PatchGrid] = dataclasses.field(default_factory=dict)  # segment id -> its patch grid

    def token_dims_of(self, node: fx.Node) -> list[tuple[int, tuple[int, ...]]]:
        return self.by_node.get(node, [])

    @property
    def static_inputs(self) -> list[TokenDim]:
        return [t for t in self.inputs if not t.dynamic]

    @property
    def dynamic_inputs(self) -> list[TokenDim]:
        return [t for t in self.inputs if t.dynamic]

    def summary(self) -> dict[str, object]:
        def entry(t: TokenDim) -> dict[str, object]:
            return {
                "name": t.name,
                "dim": t.dim,
                "size": str(t.size),
                "dynamic": t.dynamic,
                "segments": list(t.segments),
            }

        return {
            "segments": [
                {"id": s.id, "size": str(s.size), "example": s.hint, "dynamic": s.dynamic, "origin": s.origin}
                for s in self.segments
            ],
            "inputs": [entry(t) for t in self.inputs],
            "built_in_graph": [entry(t) for t in self.built],
            "outputs": [entry(t) for t in self.outputs],
            "attention_lengths": sorted({str(a.size) for a in self.attention}),
            "patch_grids": {seg: g.describe() for seg, g in self.grids.items()},
        }


def input_name(node: fx.Node) -> str:
    """The user-facing name of a graph input (`img_ids`, `img_shapes[0][1][2]`)."""
    return node.meta.get("npu_dit.input_name") or source_name(node)


def source_name(node: fx.Node) -> str:
    """Name a placeholder from Dynamo's source (`L['kwargs']['img_ids']` -> `img_ids`)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return str(node.target)
    name = source.name
    name = name() if callable(name) else name
    for prefix in ("L['kwargs']", "L['args']", "L"):
        if name.startswith(prefix + "["):
            name = name[len(prefix):]
            break
    # ['hidden_states'] -> hidden_states ; ['img_shapes'][0][1] -> img_shapes[0][1]
    if name.startswith("['"):
        end = name.index("']")
        name = name[2:end] + name[end + 2:]
    return name


def _name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return input_name(node)
    path = module_path(node)
    return f"{path}: {node.name}" if path else node.name


def require_dynamic_token_dims(tokens: TokenDims, feature: str) -> None:
    """Refuse if no token segment is dynamic (the graph was traced with static shapes) and none is a patch
    grid. A grid's tokens are cut to this rank's rows where the graph makes them, from its input's dims,
    which need not be symbols: a model that compares its latent's size with a constant (a positional table
    built for one sample size: DiT, CogVideoX) makes Dynamo specialise them under dynamic=True, and the
    graph, valid only at that size, is still cut exactly."""
    if not tokens.attention:
        raise Refusal(f"{feature}: this graph has no attention call (a piece of the model after a graph break?)")
    if any(s.dynamic for s in tokens.segments) or tokens.grids:
        return
    static = ", ".join(t.describe() for t in tokens.inputs) or "none found"
    raise Refusal(
        f"{feature} needs the token dims to be symbolic, but every token dim of this graph is static "
        f"({static}); the graph was captured with constant sequence lengths",
        fix="Pass dynamic=True to torch.compile (or torch._dynamo.mark_dynamic(tensor, dim) on the token dims).",
    )


@cached_analysis
def token_dims(gm: fx.GraphModule) -> TokenDims:
    flow = dim_flow(gm)
    atoms = flow.atoms
    attention: list[tuple[fx.Node, Seq, Seq]] = []
    token_atoms: list[int] = []
    for node in gm.graph.nodes:
        if not is_attention_call(node):
            continue
        q, k, _ = attention_qkv(node)
        qd = flow.dims(q)
        seq_q, seq_k = _attention_seq_dims(node, len(qd) if qd else 4)
        q_seq = flow.seq(q, seq_q) or ()
        k_seq = flow.seq(k, seq_k) or ()
        attention.append((node, q_seq, k_seq))
        for atom in q_seq + k_seq:
            if atom not in token_atoms:
                token_atoms.append(atom)
    # re-normalise: unifications made late in the graph may have merged atoms seen earlier
    roots: list[int] = []
    for atom in token_atoms:
        for root in atoms.normalize((atom,)):
            if root not in roots:
                roots.append(root)
    token_set = set(roots)

    def token_dims_in(value: tuple) -> list[tuple[int, Seq]]:
        found = []
        for dim, seq in enumerate(value):
            if seq is None:
                continue
            seq = atoms.normalize(seq)
            if seq and all(a in token_set for a in seq):
                found.append((dim, seq))
        return found

    by_node: dict[fx.Node, list[tuple[int, tuple[int, ...]]]] = {}
    carries_tokens: set[fx.Node] = set()  # also multi-output nodes (split, unbind) with a token dim
    for node, value in flow.values.items():
        if isinstance(value, tuple):
            found = token_dims_in(value)
            if found:
                by_node[node] = found
                carries_tokens.add(node)
        elif isinstance(value, list) and any(isinstance(v, tuple) and token_dims_in(v) for v in value):
            carries_tokens.add(node)

    nodes_in_order = list(gm.graph.nodes)
    placeholders = [n for n in nodes_in_order if n.op == "placeholder" and not isinstance(node_value(n), torch.nn.Parameter)]
    segment_ids: dict[int, int] = {}
    segments: list[TokenSegment] = []

    def segment_of(atom: int, origin: str) -> int:
        if atom not in segment_ids:
            segment_ids[atom] = len(segments)
            size = atoms.size[atom]
            segments.append(TokenSegment(len(segments), atom, size.expr, size.hint, origin))
        return segment_ids[atom]

    def describe(node: fx.Node, dim: int, seq: Seq, name: str) -> TokenDim:
        ids = tuple(segment_of(a, f"{name}[{dim}]") for a in seq)
        size = sympy.Add(*[atoms.size[a].expr for a in seq])
        return TokenDim(node, dim, ids, size, name)

    inputs = [describe(n, d, s, _name(n)) for n in placeholders for d, s in by_node.get(n, [])]

    built = []
    for node in nodes_in_order:
        if node.op == "placeholder" or node not in by_node:
            continue
        if any(i in carries_tokens for i in node.all_input_nodes):
            continue
        for dim, seq in by_node[node]:
            built.append(describe(node, dim, seq, _name(node)))

    output_node = next(n for n in reversed(nodes_in_order) if n.op == "output")
    flat_outputs, _ = tree_flatten(output_node.args[0])
    outputs = []
    for position, out in enumerate(flat_outputs):
        if isinstance(out, fx.Node):
            for dim, seq in by_node.get(out, []):
                outputs.append(describe(out, dim, seq, f"output[{position}]"))

    attention_tokens = []
    for node, q_seq, k_seq in attention:
        q_norm = atoms.normalize(q_seq)
        k_norm = atoms.normalize(k_seq)
        q_ids = tuple(segment_of(a, _name(node)) for a in q_norm)
        k_ids = tuple(segment_of(a, _name(node)) for a in k_norm)
        size = sympy.Add(*[atoms.size[a].expr for a in q_norm])
        attention_tokens.append(AttentionTokens(node, q_ids, k_ids, size))

    grids = {}
    for segment in segments:
        grid = patch_grid(flow, segment.atom)
        if grid is not None:
            node, row_dim, col_dim, patch, lead = grid
            grids[segment.id] = PatchGrid(segment.id, node, _name(node), row_dim, col_dim, patch, lead)
    return TokenDims(flow, segments, inputs, built, outputs, attention_tokens, by_node, grids)


def patch_grid(flow: FlowResult, atom: int) -> tuple[fx.Node, int, int, tuple[int, int], tuple] | None:
    """(input, row dim, column dim, (patch rows, patch columns), outer factors) when `atom` is a
    reshape's merge of dims of whole patches (or of whole positions: patch 1, a 1x1 patch embedding)
    cut from dims of one graph input, in the input's dim order (row-major); else None."""
    for factors in flow.all_merged_factors(atom):
        grid = _grid_of(flow, factors) or _grid_of(flow, _flat_factors(flow, factors))
        if grid is not None:
            return grid
    return None


def _flat_factors(flow: FlowResult, factors: tuple, depth: int = 0) -> tuple:
    """Merged factors with each factor that is itself a merge replaced by its own factors: frames merged
    with a flattened [rows, cols] grid (Allegro's `unflatten(0, (B, F)).flatten(1, 2)` of per-frame
    patch tokens) are frames x rows x cols, row-major."""
    flat = []
    for factor in factors:
        inner = flow.merged_factors(factor[0]) if len(factor) == 1 and depth < 8 else None
        flat.extend(_flat_factors(flow, inner, depth + 1) if inner else [factor])
    return tuple(flat)


def _grid_of(flow: FlowResult, factors: tuple) -> tuple[fx.Node, int, int, tuple[int, int], tuple] | None:
    atoms = flow.atoms
    if len(factors) < 2:
        return None
    found = []
    for factor in factors:
        if len(factor) != 1:
            return None
        cut = next((c for k, c in flow.patches.items() if atoms.find(k) == factor[0]), None)
        if cut is not None:
            if len(atoms.normalize(cut[0])) != 1:
                return None
            source, patch = atoms.find(atoms.normalize(cut[0])[0]), cut[1]
        else:
            source, patch = atoms.find(factor[0]), 1  # the input's own positions
        node, dim = atoms.origin[source]
        if node.op != "placeholder":
            return None
        found.append((node, dim, patch))
    dims = [d for _, d, _ in found]
    if len({n for n, _, _ in found}) != 1 or dims != sorted(set(dims)):
        return None
    (_, row_dim, p_rows), (_, col_dim, p_cols) = found[-2], found[-1]
    return found[0][0], row_dim, col_dim, (p_rows, p_cols), tuple((d, p) for _, d, p in found[:-2])
