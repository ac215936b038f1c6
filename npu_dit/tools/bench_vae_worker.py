"""One process of `npu-dit bench vae` (run directly for the serial baseline, under torchrun for the
spatially parallel decode). Prints one `NPU_DIT_BENCH {json}` line on rank 0."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings

import torch


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("serial", "spatial"), required=True)
    p.add_argument("--vae", default="flux")
    p.add_argument("--size", default="full")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--save-output", default=None)
    p.add_argument("--float64", action="store_true",
                   help="serial only: decode the same weights and latent in float64 (the reference both "
                        "float32 decodes are measured against)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from npu_dit.models.vae import build_vae, example_input

    vae = build_vae(args.vae, args.size, seed=0)
    z = example_input(args.vae, args.size, height=args.height, width=args.width, encode=False, seed=1)
    if args.float64:
        vae, z = vae.double(), z.double()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    decode = vae.decode
    if args.mode == "spatial":
        decode = torch.compile(vae.decode, backend="npu_dit", dynamic=True, options={"spatial_degree": world})

    def barrier() -> None:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    before = rss_mib()
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(args.warmup):
            out = decode(z).sample
        import gc

        gc.collect()
        can_reset = reset_peak_rss()
        before_timed = rss_mib()
        for _ in range(args.iters):
            barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = decode(z).sample
            cpu.append(time.process_time() - start_cpu)
            barrier()
            times.append(time.perf_counter() - start)
    growth = peak_rss_mib() - before
    decode_growth = hwm_mib() - before_timed if can_reset else None
    memory, cpu_s, decode_memory = [growth], [statistics.median(cpu)], [decode_growth]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (growth, cpu_s[0], decode_growth))
        memory, cpu_s, decode_memory = ([g[i] for g in gathered] for i in range(3))
    fell_back = False
    if args.mode == "spatial":
        from npu_dit.backend import RECORDS

        fell_back = bool(RECORDS and RECORDS[-1].report.fell_back)
    if rank == 0:
        if args.save_output:
            torch.save(out, args.save_output)
        print("NPU_DIT_BENCH " + json.dumps({
            "mode": args.mode, "world_size": world, "median_s": statistics.median(times), "times_s": times,
            "rss_before_mib": before, "peak_growth_mib": memory, "cpu_s": cpu_s,
            "decode_growth_mib": decode_memory, "fell_back": fell_back,
        }), flush=True)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
