"""Cache regions: split the transformer graph into front / middle / back at block boundaries.

    before:   embed -> block_0 ... block_{Fn-1} -> block_Fn ... block_{N-Bn-1} -> block_{N-Bn} ... -> head
    after:    front  = embed + the first Fn blocks           (always runs)
              middle = the remaining blocks but the last Bn  (runs, or is replaced by cached residuals)
              back   = the last Bn blocks + the output head  (always runs)

Each region is its own GraphModule, compiled on its own by the inner compiler: no graph break and no
`.item()` inside any of them (the `scalar_inputs` pass runs first). The host-side controller
(`runtime/cache.py`) decides between regions whether the middle runs. The pass finds, without naming
a model:
  - the image stream (the activation whose leading dims — batch and tokens — are the graph output's,
    as symbolic sizes) entering block 0 (h_0) and leaving block Fn-1 (h_Fn): R = h_Fn - h_0 is the
    residual the decision compares;
  - each middle output and the middle input of the same stream (same symbolic shape): the middle
    residual is output - input, stored on computed steps and added back on cached ones.
Shapes, not the token-dim analysis, so the pass works on graphs other passes rewrote (Ulysses keeps
every existing node's metadata).
FLUX's 19 double + 38 single blocks are one list of 57 for Fn/Bn.
Preconditions: blocks are contiguous; everything the middle hands to the back is a block stream.
Postcondition: `gm.meta["npu_dit.cache_plan"]` (the graph itself is not changed).
Pipeline position: last — it splits the graph every other pass produced.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _make_graph_module
from torch.utils._pytree import tree_flatten

from npu_dit.config import CacheConfig
from npu_dit.passes.analysis.attention_ops import node_value
from npu_dit.passes.analysis.blocks import transformer_blocks
from npu_dit.passes.analysis.timestep import timestep_input
from npu_dit.passes.infra import PassResult, Refusal, UserError
from npu_dit.plans import CACHE_PLAN_KEY, CachePlan, Region, Source  # noqa: F401 - re-exported for passes



def _extract(gm: fx.GraphModule, name: str, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        placeholder = graph.placeholder(node.name)
        placeholder.meta = dict(node.meta)
        env[node] = placeholder
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    region = _make_graph_module(gm, graph, class_name=f"CacheRegion_{name}")
    region.graph.lint()
    region.recompile()
    return region


def _shape(node: fx.Node) -> tuple | None:
    value = node_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _same_tokens(a: tuple | None, b: tuple | None) -> bool:
    """Same batch and token dims (all but the channel dim), compared as symbolic sizes."""
    return a is not None and b is not None and len(a) == len(b) >= 2 and all(
        str(x) == str(y) for x, y in zip(a[:-1], b[:-1])
    )


def cache_regions_pass(gm: fx.GraphModule, *, cfg: CacheConfig) -> PassResult:
    blocks = transformer_blocks(gm)
    fn, bn = cfg.Fn_compute_blocks, cfg.Bn_compute_blocks
    if not blocks:
        raise Refusal("the hybrid cache found no transformer block list in this graph (a piece of the model "
                      "after a graph break?)")
    if fn + bn >= len(blocks):
        raise Refusal(
            f"cache Fn_compute_blocks={fn} + Bn_compute_blocks={bn} leaves no middle blocks to cache in this "
            f"{len(blocks)}-block transformer; lower them so that Fn + Bn < {len(blocks)}"
        )
    if not all(b.contiguous for b in blocks):
        raise NotImplementedError("transformer blocks are interleaved in the graph; cannot cut regions")
    flat_out, _ = tree_flatten(list(gm.graph.nodes)[-1].args[0])
    image_like = _shape(flat_out[0]) if flat_out and isinstance(flat_out[0], fx.Node) else None
    if image_like is None:
        raise NotImplementedError("the graph's first output is not a tensor: no image stream to cache on")

    order = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    front_end = blocks[fn - 1].last
    middle_end = blocks[len(blocks) - bn - 1].last
    compute = [n for n in order if n.op not in ("placeholder", "output")]
    region_of = {}
    for n in compute:
        region_of[n] = "front" if position[n] <= front_end else "middle" if position[n] <= middle_end else "back"
    placeholders = [n for n in order if n.op == "placeholder"]
    output_node = order[-1]
    flat_outputs, spec = tree_flatten(output_node.args[0])

    def members(name: str) -> list[fx.Node]:
        return [n for n in compute if region_of[n] == name]

    def external_inputs(name: str) -> list[fx.Node]:
        seen: dict[fx.Node, None] = {}
        for n in members(name):
            for inp in n.all_input_nodes:
                if region_of.get(inp) != name:
                    seen.setdefault(inp, None)
        return list(seen)

    def used_later(name: str) -> list[fx.Node]:
        rank = {"front": 0, "middle": 1, "back": 2}[name]
        result = []
        for n in members(name):
            if any((u.op == "output") or ({"front": 0, "middle": 1, "back": 2}[region_of[u]] > rank) for u in n.users):
                result.append(n)
        return result

    # the image stream entering block 0 and leaving block Fn-1
    def is_image_activation(node: fx.Node, like: fx.Node | None = None) -> bool:
        shape = _shape(node)
        if not _same_tokens(shape, image_like):
            return False
        return like is None or str(_shape(like)) == str(shape)

    block0 = blocks[0]
    block_fn = blocks[fn - 1]
    middle_inputs = external_inputs("middle")
    h_fn = [n for n in middle_inputs if block_fn.first <= position.get(n, -1) <= block_fn.last and is_image_activation(n)]
    if len(h_fn) != 1:
        raise NotImplementedError(f"found {len(h_fn)} image-stream outputs of block {block_fn.path}, expected 1")
    h_fn = h_fn[0]
    h_0 = [
        n for n in order[: block0.first]
        if any(block0.first <= position[u] <= block0.last for u in n.users) and is_image_activation(n, like=h_fn)
    ]
    if len(h_0) != 1:
        raise NotImplementedError(f"found {len(h_0)} image-stream inputs of block {block0.path}, expected 1")
    h_0 = h_0[0]

    front_outputs = used_later("front")
    for extra in (h_0, h_fn):
        if extra not in front_outputs:
            front_outputs.append(extra)
    middle_outputs = used_later("middle")
    back_outputs = [n for n in flat_outputs if isinstance(n, fx.Node)]

    sources: dict[fx.Node, Source] = {n: ("arg", i) for i, n in enumerate(placeholders)}
    sources.update({n: ("front", i) for i, n in enumerate(front_outputs)})
    sources.update({n: ("middle", i) for i, n in enumerate(middle_outputs)})

    regions = {}
    for name, outs in (("front", front_outputs), ("middle", middle_outputs), ("back", back_outputs)):
        ins = external_inputs(name)
        region_gm = _extract(gm, name, members(name), ins, outs)
        in_blocks = [b.path for b in blocks if region_of.get(order[b.first]) == name]
        regions[name] = Region(name, region_gm, [sources[n] for n in ins], in_blocks, len(members(name)))
        if name == "back":
            sources.update({n: ("back", i) for i, n in enumerate(outs)})

    # pair each middle output with the middle input of the same stream (block Fn-1's output)
    pairs = []
    middle_in_position = {n: i for i, n in enumerate(external_inputs("middle"))}
    candidates = [n for n in middle_inputs if block_fn.first <= position.get(n, -1) <= block_fn.last]
    for j, out in enumerate(middle_outputs):
        match = [n for n in candidates if str(_shape(n)) == str(_shape(out))]
        if len(match) != 1:
            raise NotImplementedError(
                f"middle output {out.name} has no unique same-stream input ({len(match)} candidates); "
                f"the cache can only skip blocks that hand streams to each other"
            )
        stream = "image" if _same_tokens(_shape(out), image_like) else "text"
        pairs.append((j, middle_in_position[match[0]], stream))

    timestep = timestep_input(gm)
    plan = CachePlan(
        front=regions["front"], middle=regions["middle"], back=regions["back"],
        image_in=front_outputs.index(h_0), image_fn=front_outputs.index(h_fn),
        residual_pairs=pairs,
        outputs=[sources[n] if isinstance(n, fx.Node) else ("const", n) for n in flat_outputs],
        output_spec=spec,
        timestep_arg=timestep,
    )
    gm.meta[CACHE_PLAN_KEY] = plan
    notes = [
        f"{r.name}: {len(r.blocks)} blocks ({r.blocks[0] if r.blocks else '-'} .. {r.blocks[-1] if r.blocks else '-'}), "
        f"{r.nodes} nodes, {len(r.inputs)} inputs"
        for r in plan.regions
    ] + [f"middle residuals: {', '.join(s for _, _, s in pairs)}"]
    return PassResult(gm, modified=False, counts={"cache_regions": 3}, notes=notes)
