"""The Dynamo backend: options -> CompileConfig -> pass pipeline -> inner compiler -> executor.

Registered as `npu_dit` in the `torch_dynamo_backends` entry-point group, so

    torch.compile(transformer, backend="npu_dit", dynamic=True, options={...})

works in a fresh interpreter without importing npu_dit first. Dynamo traces the frames compiled
with this backend without duck shaping (`npu_dit.tracing`), so token lengths that happen to equal a
weight's width stay symbolic.

Every graph either runs rewritten on every rank or unrewritten on every rank: a pass that cannot
prove its rewrite exact refuses (one warning, the captured graph runs), and under parallelism the
ranks compare their plans before the first run (`runtime/agreement.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx

from npu_dit import progress, tracing
from npu_dit.config import CompileConfig
from npu_dit.errors import UserError, warn_user
from npu_dit.plans import CACHE_PLAN_KEY
from npu_dit.passes.infra import PipelineReport, run_passes
from npu_dit.passes.pipeline import build_pipeline
from npu_dit.passes.prepare import prepare_meta
from npu_dit.passes.scalar_inputs import SCALAR_INPUTS_KEY
from npu_dit.plans import SHARDING_META_KEY, SPATIAL_META_KEY, TP_META_KEY
from npu_dit.runtime import agreement, planes
from npu_dit.runtime.cache import CacheController
from npu_dit.runtime.dist import ParallelContext, check_same_cache_config, ensure_parallel, ensure_process_group
from npu_dit.runtime.executor import GraphExecutor
from npu_dit.runtime.grad import COLLECTIVES, grad_required, refusing_runner
from npu_dit.runtime.spatial_executor import SpatialExecutor
from npu_dit.runtime.inner import compile_inner, compile_inner_lazily


@dataclasses.dataclass
class CompileRecord:
    """What one backend call did; the latest few are kept in `RECORDS` for tools, tests, `explain()`."""

    config: CompileConfig
    report: PipelineReport
    graph: fx.GraphModule
    num_nodes_captured: int
    parallel: ParallelContext | None
    tag: str = "graph"

    def explain(self) -> str:
        from npu_dit.explain import format_record

        return format_record(self)


RECORDS: collections.deque[CompileRecord] = collections.deque(maxlen=16)


def _graph_device(example_inputs: list[Any]) -> torch.device | None:
    """The device of the graph's tensors (a CPU model on a machine with a GPU communicates over Gloo)."""
    return next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)


def npu_dit_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    cfg = CompileConfig.from_options(options)
    progress.backend_entered(cfg.inner_compiler)
    if mode is not None and cfg.inner_compiler != "inductor":
        raise UserError(
            f"torch.compile(mode={mode!r}) only applies to inner_compiler='inductor'; "
            f"drop mode or set options={{'inner_compiler': 'inductor'}}"
        )
    if cfg.cfg_degree > 1:
        _check_calls_paired(cfg)
    ctx = tp_ctx = None
    device = _graph_device(example_inputs)  # the group's backend follows the model, not the machine
    if cfg.spatial_degree > 1:  # the VAE: one group over the world, as Ulysses'
        ctx = ensure_process_group(cfg.spatial_degree, device=device, option="spatial_degree")
    elif cfg.world_degree > 1:
        ctx, tp_ctx = ensure_parallel(cfg.ulysses_degree, cfg.tp_degree, device=device, cfg_degree=cfg.cfg_degree)
    parallel = ctx or tp_ctx  # the context that names this rank in tags and errors
    if parallel is not None:
        check_same_cache_config(cfg.cache, parallel)
        if grad_required(example_inputs):  # every call would be refused after the rewrite: refuse now
            return refusing_runner(COLLECTIVES)
    prepare_meta(gm)
    num_nodes = len(gm.graph.nodes)
    tag = "graph_" + str(gm.meta.get("dynamo_compile_id", "0")).replace("/", "_")
    if parallel is not None:
        tag += f"_rank{dist.get_rank()}"
    start = time.perf_counter()
    rewritten, report = run_passes(gm, build_pipeline(cfg, ctx, tp_ctx=tp_ctx), dump_dir=cfg.dump_dir, graph_tag=tag)
    if parallel is not None:
        rewritten = _agree_across_ranks(gm, rewritten, report, example_inputs, host=parallel.host_group_name)
    progress.add_time("passes", time.perf_counter() - start)
    if report.fell_back:
        progress.note(f"runs unrewritten ({report.fallback_reason})")
    _warn_fixable(rewritten, report)
    RECORDS.append(CompileRecord(cfg, report, rewritten, num_nodes, parallel, tag))
    if rewritten is gm:
        if tp_ctx is not None:
            _refuse_released_weights(example_inputs, report)
        # no rewrite (or a refusal): every rank runs the captured graph on the full inputs
        start = time.perf_counter()
        compiled = compile_inner(rewritten, example_inputs, cfg.inner_compiler, mode=mode)
        progress.add_time("inner", time.perf_counter() - start)
        return compiled
    # the rewritten graph takes other inputs (local shapes, scalars, lengths): the inner compiler
    # gets it on its first real call
    spatial_plan = rewritten.meta.get(SPATIAL_META_KEY)
    if spatial_plan is not None:
        return SpatialExecutor(
            compile_inner_lazily(rewritten, cfg.inner_compiler, mode=mode),
            compile_inner_lazily(gm, cfg.inner_compiler, mode=mode),  # heights the bands cannot take
            plan=spatial_plan, ctx=ctx, scalar_inputs=rewritten.meta.get(SCALAR_INPUTS_KEY, ()),
        )
    cache_plan = rewritten.meta.get(CACHE_PLAN_KEY)
    if cache_plan is not None:
        regions = tuple(compile_inner_lazily(r.gm, cfg.inner_compiler, mode=mode) for r in cache_plan.regions)
        # the whole world's host group (a CPU decision, never on the device group): under Ulysses x TP
        # the TP ranks hold the same tokens, so the all-reduced sums and counts are both scaled alike
        # and the means stay exact; every rank decides alike
        inner = CacheController(
            cache_plan, cfg.cache, regions, label=tag,
            group=planes.host_group(parallel.host_group_name) if parallel is not None else None,
            scalar_inputs=rewritten.meta.get(SCALAR_INPUTS_KEY, ()),
        )
    else:
        inner = compile_inner_lazily(rewritten, cfg.inner_compiler, mode=mode)
    return GraphExecutor(
        inner,
        scalar_inputs=rewritten.meta.get(SCALAR_INPUTS_KEY, ()),
        plan=rewritten.meta.get(SHARDING_META_KEY),
        ctx=ctx,
        weights=rewritten.meta.get(TP_META_KEY) if tp_ctx is not None else None,
        host=parallel.host_group_name if parallel is not None else None,
        inner_reads_scalars=cache_plan is not None,
    )


npu_dit_backend.backend_ctx_ctor = tracing.backend_tracing_context  # type: ignore[attr-defined]
tracing.install()


def _check_calls_paired(cfg: CompileConfig) -> None:
    """`cfg_degree=2` only under `CFGParallel`: a backend sees captured graphs, never the model's calls,
    so it cannot pair the prompt's and the negative prompt's calls of a step (they may even be two
    graphs: Qwen-Image's text length is a constant of the graph, and the two prompts differ in
    length). Alone, every rank would compute every call: no speed-up, so it is an error."""
    from npu_dit.runtime.cfg_parallel import pairing_calls

    if not pairing_calls():
        degrees = (("ulysses_degree", cfg.ulysses_degree), ("tp_degree", cfg.tp_degree))
        other = ", ".join(f"{k}={v}" for k, v in degrees if v > 1)
        raise UserError(
            f"option cfg_degree={cfg.cfg_degree} needs the two true-CFG calls of each step paired, which the "
            f"compiled graph alone cannot do (a torch.compile backend sees graphs, not the model's calls); use "
            f"npu_dit.parallelize(pipe, cfg_parallel=True{', ' + other if other else ''}) (or `npu-dit generate "
            f"--cfg-parallel`), which compiles the transformer with cfg_degree=2 and pairs its calls, or drop "
            f"cfg_degree"
        )


def _agree_across_ranks(
    captured: fx.GraphModule, rewritten: fx.GraphModule, report: PipelineReport, example_inputs: list[Any],
    *, host: str | None = None,
) -> fx.GraphModule:
    """Every rank runs the rewrite, or every rank runs the captured graph; different graphs or
    plans raise the same RankMismatchError on every rank (never a hang)."""
    plan = rewritten.meta.get(SHARDING_META_KEY) or rewritten.meta.get(SPATIAL_META_KEY)
    tp_plan = rewritten.meta.get(TP_META_KEY)
    graph = f"{len(captured.graph.nodes)} nodes|{agreement.call_signature(example_inputs)}"
    what = "none"
    if not report.fell_back and (plan is not None or tp_plan is not None):
        what = (plan.fingerprint() if plan is not None else "") + "|" + (tp_plan.fingerprint() if tp_plan else "")
    # over the ranks that run this graph: the world, or this rank's CFG branch (`host`)
    records = agreement.exchange(agreement.COMPILE, what, graph=graph, fell_back=report.fell_back, host=host)
    detail = "fell back" if report.fell_back else f"plan {plan.describe() if plan else 'none'}"
    # a graph that differs between ranks is an error even where some rank fell back
    agreement.check_records(records, agreement.COMPILE, detail, ignore_plans=True)
    if report.fell_back:
        return captured
    if any(r[3] for r in records):
        report.fell_back = True
        report.fallback_reason = "another rank could not rewrite this graph; every rank runs it unrewritten"
        warn_user(f"npu_dit: {report.fallback_reason} (see the warning on that rank).")
        return captured
    agreement.check_records(records, agreement.COMPILE, detail)
    return rewritten


def _refuse_released_weights(example_inputs: list[Any], report: PipelineReport) -> None:
    """A graph that runs unrewritten needs the full weights; an earlier tensor-parallel compile may
    have released them (a recompile after a graph break, say): say so instead of computing garbage."""
    from npu_dit.runtime.weights import is_released

    if any(is_released(a) for a in example_inputs if hasattr(a, "untyped_storage")):
        raise UserError(
            f"npu_dit: this graph runs without tensor parallelism ({report.fallback_reason or 'nothing to shard'}), "
            f"but an earlier compile released the full weights it reads. Compile with "
            f"options={{'release_weights': False}} to keep them."
        )


def _warn_fixable(rewritten: fx.GraphModule, report: PipelineReport) -> None:
    plan = rewritten.meta.get(SHARDING_META_KEY)
    if plan is None:
        return
    for stream in plan.streams:
        if not stream.sharded and stream.fix:
            warn_user(
                f"npu_dit: token stream {stream.id} ({stream.name}, e.g. {stream.example_length} tokens) stays "
                f"replicated: {stream.reason}. {stream.fix}"
            )
