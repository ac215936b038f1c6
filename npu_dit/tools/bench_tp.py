"""Tensor parallelism against PyTorch's own DTensor TP on the bench FLUX, one process per rank:

    torchrun --nproc-per-node 2 -m npu_dit.tools.bench_tp --mode npu-dit
    torchrun --nproc-per-node 2 -m npu_dit.tools.bench_tp --mode dtensor
    python -m npu_dit.tools.bench_tp --mode serial

The same FluxTransformer2DModel (bench config, random weights, seed 0, float32) and inputs as
`bench_worker`. `npu-dit`: `torch.compile(backend="npu_dit", options={"tp_degree": P})` (eager inner
compiler). `dtensor`: `torch.distributed.tensor.parallel.parallelize_module` with `ColwiseParallel` on
the Q/K/V projections and the first MLP linears, `RowwiseParallel` on the output projections and the
second MLP linears, the attention's head count divided by P (as the per-model TP plans of diffusers'
ecosystem do), and FLUX's single-block `proj_out` weight columns permuted so that each rank's
contiguous block matches its local `cat([attn, mlp])`; AdaLN stays replicated there. Rank 0 prints
one `NPU_DIT_BENCH {json}` line (median of the timed calls, each between barriers) and the max abs
error against the serial output when `--reference` names a saved one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch


def dtensor_parallelize(model: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer_blocks:
        plan = {name: ColwiseParallel() for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                                      "attn.add_k_proj", "attn.add_v_proj", "ff.net.0.proj",
                                                      "ff_context.net.0.proj")}
        plan.update({name: RowwiseParallel() for name in ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2")})
        parallelize_module(block, mesh, plan)
        block.attn.heads //= world
    for block in model.single_transformer_blocks:
        attn_width = block.attn.to_q.out_features
        mlp_width = block.proj_mlp.out_features
        # local cat([attn_r, mlp_r]) on rank r: reorder proj_out's input columns to [attn_0, mlp_0, attn_1, ...]
        order = []
        for r in range(world):
            order += range(r * attn_width // world, (r + 1) * attn_width // world)
            order += range(attn_width + r * mlp_width // world, attn_width + (r + 1) * mlp_width // world)
        with torch.no_grad():
            block.proj_out.weight.copy_(block.proj_out.weight[:, order])
        plan = {name: ColwiseParallel() for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
        plan["proj_out"] = RowwiseParallel()
        parallelize_module(block, mesh, plan)
        block.attn.heads //= world


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("serial", "npu-dit", "dtensor"), required=True)
    p.add_argument("--size", default="bench")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-output", default=None)
    p.add_argument("--reference", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from npu_dit.models import build_transformer, get_model

    spec = get_model("flux.1-dev")
    config = spec.config(args.size)
    model = build_transformer(spec, config, seed=0)
    inputs = spec.example_inputs(config, height=args.height, width=args.width, prompt_len=args.prompt_len, seed=0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if args.mode == "npu-dit":
        run = torch.compile(model, backend="npu_dit", dynamic=True, options={"tp_degree": world})
    elif args.mode == "dtensor":
        dtensor_parallelize(model, world)
        run = model
    else:
        run = model

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    times = []
    with torch.no_grad():
        for _ in range(args.warmup):
            out = run(**inputs)[0]
        for _ in range(args.iters):
            barrier()
            start = time.perf_counter()
            out = run(**inputs)[0]
            barrier()
            times.append(time.perf_counter() - start)
    if rank == 0:
        if args.save_output:
            torch.save(out, args.save_output)
        err = None
        if args.reference:
            err = (out - torch.load(args.reference)).abs().max().item()
        print("NPU_DIT_BENCH " + json.dumps({"mode": args.mode, "world_size": world, "median_s": statistics.median(times),
                                             "min_s": min(times), "times_s": times, "max_abs_err": err}), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
