"""`npu-dit inspect MODEL --vae decode|encode --spatial-degree P`: the seed model's full-size VAE, offline.

The VAE (FLUX.1-dev's `AutoencoderKL`, Qwen-Image's `AutoencoderKLQwenImage`) is built on the meta
device, `decode` (or `encode`) is traced by Dynamo as the public call traces it (`dynamic=True`, no
duck shaping), and the spatial pass rewrites it as rank r of P would. The rewritten graph of every rank
then runs on meta tensors (shapes only) with each collective replaced by its shape: what each rank
sends — halo rows to its neighbours, group-norm statistics, attention keys and values — is counted
from the tensors it really hands the collective.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.fx as fx

from npu_dit.config import CompileConfig
from npu_dit.models import get_model
from npu_dit.models.vae import build_vae, example_input
from npu_dit.passes.infra import run_passes
from npu_dit.passes.pipeline import build_pipeline
from npu_dit.plans import SPATIAL_META_KEY
from npu_dit.runtime import spatial_ops as S
from npu_dit.runtime.dist import inspection_context
from npu_dit.tools.capture import capture_graph


def vae_kind(model: str) -> str:
    return "flux" if get_model(model).transformer_cls == "FluxTransformer2DModel" else "qwen-image"


class _MetaRun(fx.Interpreter):
    """Runs one rank's rewritten graph on meta tensors; each collective returns its result's shape and
    records the bytes this rank sends."""

    def __init__(self, gm: fx.GraphModule, world: int) -> None:
        super().__init__(gm)
        self.world = world
        self.sent: dict[str, list[int]] = {}  # kind -> [count, bytes]

    def _record(self, kind: str, nbytes: int) -> None:
        entry = self.sent.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is S.halo_exchange:
            x, dim, top, bottom, edge_top, edge_bottom, rank, world = args[:8]
            row = x.numel() // max(x.shape[dim], 1) * x.element_size()
            sends = (bottom if rank > 0 else 0) + (top if rank < world - 1 else 0)
            receives = (top if rank > 0 else edge_top) + (bottom if rank < world - 1 else edge_bottom)
            self._record("halo rows (neighbours)", sends * row)
            shape = list(x.shape)
            shape[dim] += receives
            return x.new_empty(shape)
        if target is S.neighbour_rows:
            x, dim, top, bottom, rank, world = args[:6]
            row = x.numel() // max(x.shape[dim], 1) * x.element_size()
            sends = (bottom if rank > 0 else 0) + (top if rank < world - 1 else 0)
            receives = (top if rank > 0 else 0) + (bottom if rank < world - 1 else 0)
            self._record("halo rows (neighbours)", sends * row)
            rows = x.movedim(dim, 0)
            return rows.new_empty((receives, *rows.shape[1:]))
        if target is S.group_norm:
            x, groups = args[0], args[1]
            self._record("group-norm statistics (all-gather)", 3 * x.shape[0] * groups * 4)
            return torch.empty_like(x)
        if target is S.gather_rows_start:
            x, dim, units, rank, world = args[:5]
            per_unit = x.shape[dim] // units[rank]
            self._record("attention keys/values (gather)", x.numel() * x.element_size() * (world - 1))
            rows = x.movedim(dim, 0)
            return rows.new_empty((per_unit * sum(units), *rows.shape[1:]))
        if target is S.gather_rows_wait:
            return args[0].movedim(0, args[1])
        return super().call_function(target, args, kwargs)


def _local_args(real_inputs: list[Any], plan: Any, units: list[int], rank: int, scalar_inputs: tuple) -> list[Any]:
    local = list(real_inputs)
    for index in scalar_inputs:
        value = local[index]
        local[index] = value.item() if isinstance(value, torch.Tensor) and value.device.type != "meta" else 1e-6
    x = local[plan.input_index]
    rows = plan.align * units[rank]
    local[plan.input_index] = x.narrow(plan.dim, plan.align * sum(units[:rank]), rows)
    for index in plan.local_symints:
        local[index] = rows
    return local + list(units)


def inspect_vae(
    model: str, *, fn: str = "decode", height: int = 1024, width: int = 1024, size: str = "full",
    dtype: torch.dtype = torch.bfloat16, options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    options = dict(options or {})
    options.setdefault("spatial_degree", 2)
    cfg = CompileConfig.from_options(options)
    world = cfg.spatial_degree
    kind = vae_kind(model)
    start = time.perf_counter()
    vae = build_vae(kind, size, device="meta", dtype=dtype)
    x = example_input(kind, size, height=height, width=width, encode=fn == "encode", device="meta", dtype=dtype)
    built = time.perf_counter() - start
    start = time.perf_counter()
    captured = capture_graph(getattr(vae, fn), {"z" if fn == "decode" else "x": x})
    traced = time.perf_counter() - start
    gm = captured.gm
    report: dict[str, Any] = {
        "model": model, "vae": type(vae).__name__, "call": fn, "size": size, "height": height, "width": width,
        "dtype": str(dtype).removeprefix("torch."), "input_shape": list(x.shape), "spatial_degree": world,
        "nodes_captured": len(gm.graph.nodes), "build_seconds": round(built, 2), "trace_seconds": round(traced, 2),
        "parameters": sum(p.numel() for p in vae.parameters()), "ranks": [],
    }
    for rank in range(world):
        start = time.perf_counter()
        rewritten, passes = run_passes(gm, build_pipeline(cfg, inspection_context(world, rank)))
        if rank == 0:
            report["passes_seconds"] = round(time.perf_counter() - start, 2)  # rank 0's, as `inspect` MODEL
        if passes.fell_back:
            report["fallback"] = passes.fallback_reason
            return report
        plan = rewritten.meta[SPATIAL_META_KEY]
        units = S.band_units(x.shape[plan.dim], plan.align, world)
        spatial = next(r for r in passes.records if r.name == "spatial")
        if rank == 0:
            report["plan"] = plan.describe()
            report["counts"] = spatial.counts
            report["sites"] = spatial.notes[len(plan.describe()):]
            report["pass_seconds"] = round(spatial.seconds, 2)
            report["bands"] = [plan.align * u for u in units]
        runner = _MetaRun(rewritten, world)
        with torch.no_grad():
            runner.run(*_local_args(captured.real_inputs, plan, units, rank, tuple(rewritten.meta.get("npu_dit.scalar_inputs", ()))))
        report["ranks"].append({"rank": rank, "rows": plan.align * units[rank], "sent": runner.sent,
                                "bytes_sent": sum(b for _, b in runner.sent.values())})
    return report


def format_vae_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: {report['vae']}.{report['call']} ({report['size']} config, "
        f"{report['parameters'] / 1e6:.1f} M parameters, {report['dtype']}), input {report['input_shape']} "
        f"for {report['height']}x{report['width']}",
        f"captured: {report['nodes_captured']} nodes (traced in {report['trace_seconds']} s)",
        f"spatial_degree={report['spatial_degree']}",
    ]
    if "fallback" in report:
        lines.append(f"  FALLBACK: {report['fallback']}")
        return "\n".join(lines)
    lines += [f"  {line}" for line in report["plan"]]
    lines.append(f"  input rows per rank: {report['bands']}")
    counts = report["counts"]
    lines.append(
        f"  rewritten: {counts.get('conv', 0)} convolutions with halos ({counts.get('halo_exchange', 0)} halo exchanges, "
        f"{counts.get('edge_pad', 0)} paddings at the global edges only), {counts.get('group_norm', 0)} GroupNorms "
        f"with cross-rank statistics, {counts.get('gather_rows', 0)} attention key/value gathers, "
        f"{counts.get('upsample', 0)} local upsamplings ({report['pass_seconds']} s)"
    )
    lines.append("  sites:")
    lines += [f"    {site}" for site in report["sites"]]
    lines.append(f"  time: build {report['build_seconds']} s, trace {report['trace_seconds']} s, passes (rank 0) "
                 f"{report['passes_seconds']} s = {report['passes_seconds'] / max(report['trace_seconds'], 1e-9):.3f} x trace")
    lines.append("  bytes sent per rank (one call):")
    for entry in report["ranks"]:
        detail = ", ".join(f"{kind}: {count} x, {nbytes / 2**20:.2f} MiB" for kind, (count, nbytes) in entry["sent"].items())
        lines.append(f"    rank {entry['rank']} ({entry['rows']} input rows): {entry['bytes_sent'] / 2**20:.2f} MiB  [{detail}]")
    return "\n".join(lines)
