"""The Dynamo backend: options -> CompileConfig -> pass pipeline -> inner compiler -> executor.

Registered as `npu_dit` in the `torch_dynamo_backends` entry-point group, so

    torch.compile(transformer, backend="npu_dit", dynamic=True, options={...})

works in a fresh interpreter without importing npu_dit first.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import torch.fx as fx

from npu_dit.config import CompileConfig
from npu_dit.passes.infra import PipelineReport, UserError, run_passes
from npu_dit.passes.pipeline import build_pipeline
from npu_dit.passes.ulysses import SHARDING_META_KEY
from npu_dit.runtime.dist import ParallelContext, check_same_cache_config, ensure_process_group
import torch.distributed as dist

from npu_dit.passes.cache_regions import CACHE_PLAN_KEY
from npu_dit.passes.scalar_inputs import SCALAR_INPUTS_KEY
from npu_dit.runtime.cache import CacheController
from npu_dit.runtime.executor import GraphExecutor
from npu_dit.runtime.inner import compile_inner, compile_inner_lazily
from npu_dit.tools.capture import prepare_meta


@dataclasses.dataclass
class CompileRecord:
    """What one backend call did; the latest few are kept in `RECORDS` for tools and tests."""

    config: CompileConfig
    report: PipelineReport
    graph: fx.GraphModule
    num_nodes_captured: int
    parallel: ParallelContext | None


RECORDS: collections.deque[CompileRecord] = collections.deque(maxlen=16)


def npu_dit_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    cfg = CompileConfig.from_options(options)
    if mode is not None and cfg.inner_compiler != "inductor":
        raise UserError(
            f"torch.compile(mode={mode!r}) only applies to inner_compiler='inductor'; "
            f"drop mode or set options={{'inner_compiler': 'inductor'}}"
        )
    ctx = ensure_process_group(cfg.ulysses_degree) if cfg.ulysses_degree > 1 else None
    if ctx is not None:
        check_same_cache_config(cfg.cache, ctx)
    prepare_meta(gm)
    num_nodes = len(gm.graph.nodes)
    tag = "graph_" + str(gm.meta.get("dynamo_compile_id", "0")).replace("/", "_")
    if ctx is not None:
        tag += f"_rank{ctx.rank}"
    rewritten, report = run_passes(gm, build_pipeline(cfg, ctx), dump_dir=cfg.dump_dir, graph_tag=tag)
    RECORDS.append(CompileRecord(cfg, report, rewritten, num_nodes, ctx))
    if rewritten is gm:
        # no rewrite (or a fallback): every rank runs the captured graph on the full inputs
        return compile_inner(rewritten, example_inputs, cfg.inner_compiler, mode=mode)
    # the rewritten graph takes other inputs (local shapes, scalars, lengths): the inner compiler
    # gets it on its first real call
    cache_plan = rewritten.meta.get(CACHE_PLAN_KEY)
    if cache_plan is not None:
        regions = tuple(compile_inner_lazily(r.gm, cfg.inner_compiler, mode=mode) for r in cache_plan.regions)
        inner = CacheController(
            cache_plan, cfg.cache, regions, group=dist.group.WORLD if ctx is not None else None, label=tag
        )
    else:
        inner = compile_inner_lazily(rewritten, cfg.inner_compiler, mode=mode)
    return GraphExecutor(
        inner,
        scalar_inputs=rewritten.meta.get(SCALAR_INPUTS_KEY, ()),
        plan=rewritten.meta.get(SHARDING_META_KEY),
        ctx=ctx,
    )
