"""The peer column of `npu-dit bench ulysses`: cache-dit's own Ulysses on the same bench model.

One process per rank under torchrun (Gloo on CPU, one thread each), like `bench_worker`:

    torchrun --nproc-per-node 2 -m npu_dit.tools.bench_peer --async-ulysses --compile

builds the same FluxTransformer2DModel (bench config, random weights, seed 0, float32) and the same
inputs, applies cache-dit's context parallelism (`cache_dit.enable_cache(transformer,
parallelism_config=ParallelismConfig(ulysses_size=P, ulysses_async=...))`, no cache), optionally
wraps it in `torch.compile(backend="inductor")`, and times calls the way `bench_worker` does
(warm-up, then the median of timed calls with a barrier on each side). Rank 0 prints one
`NPU_DIT_BENCH {json}` line and can save its output for the error check against the serial run.
With `--profile-dir` each rank writes a Chrome trace of one call (`rankN.json`), as `bench_worker`
does; `python -m npu_dit.tools.bench_peer compare DIR_A DIR_B` prints self time per op of two such
traces side by side (e.g. `--profile P` of `npu-dit bench ulysses` gives `P/ulysses-async` and
`P/cache-dit-async-compiled`).

cache-dit is optional: `available()` says whether it can be imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
import warnings

import torch

INSTALL_HINT = "pip install --no-deps cache-dit==1.5.3 einops"


def available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def version() -> str | None:
    try:
        from importlib.metadata import version as _version

        return _version("cache-dit")
    except Exception:
        return None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="npu_dit.tools.bench_peer")
    p.add_argument("--model", default="flux.1-dev")
    p.add_argument("--size", default="bench")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--async-ulysses", action="store_true")
    p.add_argument("--compile", action="store_true", help="wrap in torch.compile(backend='inductor')")
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
    import torch.distributed as dist

    from npu_dit.models import build_transformer, get_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("gloo")

    spec = get_model(args.model)
    config = spec.config(args.size)
    model = build_transformer(spec, config, seed=0)
    inputs = spec.example_inputs(config, height=args.height, width=args.width, prompt_len=args.prompt_len, seed=0)
    model = parallelize(model, world, args.async_ulysses)
    if args.compile:
        model = torch.compile(model, backend="inductor")

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    def call():
        # cache-dit gathers the output with a functional all-gather and hands back an
        # AsyncCollectiveTensor in eager mode; wait on it so each timed call includes the gather
        return finish(model(**inputs)[0])

    times = []
    with torch.no_grad():
        for _ in range(args.warmup):
            out = call()
        for _ in range(args.iters):
            barrier()
            start = time.perf_counter()
            out = call()
            barrier()
            times.append(time.perf_counter() - start)
        blocked_ms = None
        if args.profile_dir:
            blocked_ms = profile(call, args.profile_dir, rank, barrier)
    if rank == 0:
        if args.save_output:
            torch.save(out, args.save_output)
        result = {
            "mode": "cache-dit" + ("-async" if args.async_ulysses else "") + ("-compiled" if args.compile else ""),
            "peer": f"cache-dit {version()}",
            "world_size": world,
            "median_s": statistics.median(times),
            "mean_s": statistics.mean(times),
            "min_s": min(times),
            "times_s": times,
            "wait_blocked_ms": blocked_ms,
        }
        print("NPU_DIT_BENCH " + json.dumps(result), flush=True)
    dist.destroy_process_group()


def finish(out: torch.Tensor) -> torch.Tensor:
    """A plain tensor: wait on an AsyncCollectiveTensor (eager cache-dit's gathered output)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if isinstance(out, AsyncCollectiveTensor):
        out = out.wait()
    return out


def profile(call, profile_dir: str, rank: int, barrier) -> float:
    """Write a Chrome trace of one call per rank (`rankN.json`, as `bench_worker.profile` does);
    return the time this rank sat waiting on collectives (wait_tensor / Gloo work waits), in ms."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    os.makedirs(profile_dir, exist_ok=True)
    barrier()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
        barrier()
    prof.export_chrome_trace(os.path.join(profile_dir, f"rank{rank}.json"))
    blocked = sum(e.cpu_time_total for e in prof.key_averages() if "wait_tensor" in e.key)
    return blocked / 1000.0


def parallelize(model: torch.nn.Module, world: int, async_ulysses: bool) -> torch.nn.Module:
    """cache-dit's Ulysses on `world` ranks, no cache, the way its examples call it."""
    import cache_dit
    from cache_dit import ParallelismConfig

    cfg = ParallelismConfig(ulysses_size=world, ulysses_async=async_ulysses)
    return cache_dit.enable_cache(model, parallelism_config=cfg)


# --------------------------------------------------------------------------------------------
# comparing traces: python -m npu_dit.tools.bench_peer compare DIR_A DIR_B [--rank 0] [--top 25]


def self_times_ms(trace_path: str) -> dict[str, float]:
    """Self CPU time (ms) per op name in one Chrome trace from `torch.profiler` (children subtracted,
    per thread), over the whole profiled call."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    totals: dict[str, float] = {}
    by_thread: dict[tuple, list] = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, self]
        def pop():
            end, name, own = stack.pop()
            totals[name] = totals.get(name, 0.0) + own / 1000.0
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]:
                pop()
            if stack:
                stack[-1][2] -= e["dur"]
            name = "Inductor kernels (CompiledFxGraph call)" if "CompiledFxGraph" in e["name"] else e["name"]
            stack.append([e["ts"] + e["dur"], name, e["dur"]])
        while stack:
            pop()
    return totals


def compare(dir_a: str, dir_b: str, rank: int = 0, top: int = 25) -> str:
    """A table of the ops with the most self time in either trace (`DIR/rankN.json`), side by side."""
    a = self_times_ms(os.path.join(dir_a, f"rank{rank}.json"))
    b = self_times_ms(os.path.join(dir_b, f"rank{rank}.json"))
    names = sorted(set(a) | set(b), key=lambda n: -max(a.get(n, 0.0), b.get(n, 0.0)))[:top]
    width = max([len(n) for n in names] + [10])
    lines = [f"self CPU time per op, rank {rank} (ms)", f"{'op':<{width}}  {'A':>9}  {'B':>9}  {'B-A':>9}",
             f"{'(all ops)':<{width}}  {sum(a.values()):9.1f}  {sum(b.values()):9.1f}  {sum(b.values()) - sum(a.values()):9.1f}"]
    for n in names:
        lines.append(f"{n:<{width}}  {a.get(n, 0.0):9.1f}  {b.get(n, 0.0):9.1f}  {b.get(n, 0.0) - a.get(n, 0.0):9.1f}")
    lines.append(f"A = {dir_a}\nB = {dir_b}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the column in `npu-dit bench ulysses`

# (key, label, extra worker flags): sync and async eager, async under torch.compile (inductor)
PEER_CONFIGS = (
    ("cache-dit", "cache-dit Ulysses-{P}", []),
    ("cache-dit-async", "cache-dit async Ulysses-{P}", ["--async-ulysses"]),
    ("cache-dit-async-compiled", "cache-dit async Ulysses-{P} + torch.compile", ["--async-ulysses", "--compile"]),
)


def missing_note() -> str:
    return f"peer column skipped: cache-dit is not installed (`{INSTALL_HINT}` into this environment, then rerun)"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["compare"]:
        c = argparse.ArgumentParser(prog="npu_dit.tools.bench_peer compare")
        c.add_argument("dir_a")
        c.add_argument("dir_b")
        c.add_argument("--rank", type=int, default=0)
        c.add_argument("--top", type=int, default=25)
        a = c.parse_args(sys.argv[2:])
        print(compare(a.dir_a, a.dir_b, a.rank, a.top))
    else:
        main()
