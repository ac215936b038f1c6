"""The one ordered list of passes for a CompileConfig.

Order matters and is written down here, not left to import side effects:
0. scalar_inputs  — whenever the graph is rewritten: the rewritten graph is compiled again (Dynamo
                    re-traces it), and `.item()` on 0-d inputs would break that graph.
1. tensor_parallel — column/row-shards the linears (heads/N per rank) and inserts the TP
                    all-reduces; before Ulysses, which then exchanges the local heads within its
                    own mesh axis, and whose analyses read the TP pass's refreshed local shapes.
2. ulysses        — shards the token streams and wraps attention in all-to-all; everything after
                    works on the sharded graph.
3. async_ulysses  — reorders nodes so each all-to-all overlaps independent compute; it must see the
                    collectives the Ulysses pass inserted, and it only moves nodes.
4. attention_lowering — replaces each SDPA call by a kernel (torch_npu's fused attention, PyTorch's
                    flash/cuDNN/efficient); after the Ulysses passes, because it lowers the attention
                    Ulysses wrapped (in the BSND layout the all-to-all can deliver without transposes)
                    and because the Ulysses and async passes recognise attention as SDPA. Only in the
                    pipeline when it may fire: `auto` on a machine without an accelerator keeps SDPA.
   spatial        — (convolutional graphs, `spatial_degree` > 1; never with the transformer passes
                    above) height bands with halos, exact group-norm statistics, gathered attention
                    keys/values; after scalar_inputs like every rewrite.
   fuse_qkv       — (sync Ulysses) Q, K and V of each site in one all-to-all; after the lowering, which
                    treats the unfused exchanges as layout-transparent ops, and before the regions are
                    cut. Async Ulysses keeps one all-to-all per projection (each overlaps compute).
   comm_compression — (`comm_dtype`) Q, V and the attention output through the all-to-alls in FP8;
                    after fuse_qkv (it packs the fused message), the async schedule and the lowering
                    (it replaces each start and wait where they stand), before the regions are cut.
5. cache_regions  — last: it cuts the final graph (sharded, scheduled, lowered) into front/middle/back
                    regions at block boundaries; it changes no node.
"""

from __future__ import annotations

import functools

from npu_dit.config import CompileConfig
from npu_dit.passes.infra import PassSpec
from npu_dit.runtime.dist import ParallelContext


def build_pipeline(cfg: CompileConfig, ctx: ParallelContext | None = None,
                   tp_ctx: ParallelContext | None = None) -> list[PassSpec]:
    from npu_dit.passes.attention_lowering import lowering_may_fire

    passes: list[PassSpec] = []
    lowering = lowering_may_fire(cfg)
    rewrites = (cfg.ulysses_degree > 1 or cfg.tp_degree > 1 or lowering or cfg.cache is not None
                or cfg.spatial_degree > 1)
    if rewrites:
        from npu_dit.passes.scalar_inputs import scalar_inputs_pass

        passes.append(PassSpec("scalar_inputs", scalar_inputs_pass))
    if cfg.tp_degree > 1:
        from npu_dit.passes.tensor_parallel import tensor_parallel_pass

        if tp_ctx is None:
            raise ValueError("the tensor-parallel pass needs a ParallelContext for its TP group")
        passes.append(PassSpec("tensor_parallel", functools.partial(
            tensor_parallel_pass, ctx=tp_ctx, release_weights=cfg.release_weights), preserves_numerics=False,
            changes_shapes=True))
    if cfg.ulysses_degree > 1:
        from npu_dit.passes.ulysses import ulysses_pass

        if ctx is None:
            raise ValueError("the Ulysses pass needs a ParallelContext (rank, world size, group)")
        passes.append(PassSpec("ulysses", functools.partial(ulysses_pass, ctx=ctx), preserves_numerics=False,
                               changes_shapes=True))
        if cfg.async_ulysses:
            from npu_dit.passes.async_ulysses import async_ulysses_pass

            passes.append(PassSpec("async_ulysses", async_ulysses_pass))
    if cfg.spatial_degree > 1:
        from npu_dit.passes.spatial import spatial_pass

        if ctx is None:
            raise ValueError("the spatial pass needs a ParallelContext (rank, world size, group)")
        passes.append(PassSpec("spatial", functools.partial(spatial_pass, ctx=ctx), preserves_numerics=False,
                               changes_shapes=True))
    if lowering:
        from npu_dit.passes.attention_lowering import attention_lowering_pass

        passes.append(
            PassSpec("attention_lowering", functools.partial(attention_lowering_pass, cfg=cfg), preserves_numerics=False)
        )
    if cfg.ulysses_degree > 1 and not cfg.async_ulysses:
        from npu_dit.passes.fuse_qkv import fuse_qkv_pass

        passes.append(PassSpec("fuse_qkv", fuse_qkv_pass))
    if cfg.ulysses_degree > 1 and cfg.comm_dtype is not None:
        from npu_dit.passes.comm_compression import comm_compression_pass

        passes.append(PassSpec("comm_compression", functools.partial(comm_compression_pass, comm_dtype=cfg.comm_dtype),
                               preserves_numerics=False))
    if cfg.cache is not None:
        from npu_dit.passes.cache_regions import cache_regions_pass

        passes.append(PassSpec("cache_regions", functools.partial(cache_regions_pass, cfg=cfg.cache)))
    return passes
