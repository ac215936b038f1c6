"""One benchmark process: build the model, compile it with npu_dit, time transformer calls.

Run directly for the serial baseline, or under torchrun for the parallel modes:

    torchrun --nproc-per-node 2 -m npu_dit.tools.bench_worker --mode ulysses --async-ulysses

Prints one JSON line (rank 0) with the per-call times; `npu-dit bench` launches and collects these.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="npu_dit.tools.bench_worker")
    p.add_argument("--model", default="flux.1-dev")
    p.add_argument("--size", default="bench")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--mode", choices=("serial", "ulysses"), default="serial")
    p.add_argument("--async-ulysses", action="store_true")
    p.add_argument("--inner-compiler", default="eager")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile-dir", default=None)
    p.add_argument("--save-output", default=None, help="torch.save the output here (rank 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from npu_dit.models import build_transformer, get_model

    spec = get_model(args.model)
    config = spec.config(args.size)
    model = build_transformer(spec, config, seed=0)
    inputs = spec.example_inputs(config, height=args.height, width=args.width, prompt_len=args.prompt_len, seed=0)
    options = {"inner_compiler": args.inner_compiler}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.mode == "ulysses":
        options.update(ulysses_degree=world, async_ulysses=args.async_ulysses)
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)

    def barrier() -> None:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    times = []
    with torch.no_grad():
        for _ in range(args.warmup):
            out = compiled(**inputs)[0]
        for _ in range(args.iters):
            barrier()
            start = time.perf_counter()
            out = compiled(**inputs)[0]
            barrier()
            times.append(time.perf_counter() - start)
        blocked_ms = None
        if args.profile_dir:
            blocked_ms = profile(compiled, inputs, args.profile_dir, rank, barrier)
    check_ms = agreement_check_ms() if world > 1 else None
    from npu_dit.backend import RECORDS
    from npu_dit.plans import SHARDING_META_KEY

    plan = RECORDS[-1].graph.meta.get(SHARDING_META_KEY) if RECORDS else None
    if rank == 0:
        if args.save_output:
            torch.save(out, args.save_output)
        result = {
            "mode": args.mode + ("-async" if args.async_ulysses else ""),
            "world_size": world,
            "median_s": statistics.median(times),
            "mean_s": statistics.mean(times),
            "min_s": min(times),
            "times_s": times,
            "wait_blocked_ms": blocked_ms,
            "agreement_check_ms": check_ms,
            "streams": plan.describe() if plan is not None else [],
            "fell_back": bool(RECORDS and RECORDS[-1].report.fell_back),
        }
        print("NPU_DIT_BENCH " + json.dumps(result), flush=True)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def agreement_check_ms(repeats: int = 200) -> float:
    """The per-call cost of the ranks' input-shape check (one small all-gather), in ms."""
    from npu_dit.runtime.agreement import CALL, exchange

    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        exchange(CALL, "bench")
    return (time.perf_counter() - start) / repeats * 1000


def profile(compiled, inputs, profile_dir: str, rank: int, barrier) -> float:
    """Write a Chrome trace of one call per rank; return the time this rank sat in wait_tensor."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    os.makedirs(profile_dir, exist_ok=True)
    barrier()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        compiled(**inputs)
        barrier()
    prof.export_chrome_trace(os.path.join(profile_dir, f"rank{rank}.json"))
    blocked = sum(e.cpu_time_total for e in prof.key_averages() if "wait_tensor" in e.key)
    return blocked / 1000.0


if __name__ == "__main__":
    main()
