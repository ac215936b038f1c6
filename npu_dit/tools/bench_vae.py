"""`npu-dit bench vae`: the full-size FLUX.1-dev VAE (random weights) decoding a 1024x1024 latent, one
process against `spatial_degree=P` over P Gloo processes, one thread each.

Reports the time per decode, the speed-up, the growth of each process's peak resident memory during
the decode calls (peak RSS minus RSS before the first call: compile included for the parallel run),
its ratio to the serial process's growth, and the max abs error against the serial output.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import torch

from npu_dit.runtime.dist import free_port
from npu_dit.tools.bench import _run, machine, replace_section

MARK_START = "<!-- bench:vae:start -->"
MARK_END = "<!-- bench:vae:end -->"


def bench_vae(*, degree: int = 2, height: int = 1024, width: int = 1024, warmup: int = 1, iters: int = 1,
              vae: str = "flux", size: str = "full", float64_reference: bool = False, timeout: float = 3600,
              log=print) -> dict[str, Any]:
    """`float64_reference`: also decode in float64 (one more serial process) and report both float32
    decodes' error against it: whether the spatial decode's difference from the serial one is the
    serial kernel's own float32 rounding."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    common = ["--vae", vae, "--size", size, "--height", str(height), "--width", str(width), "--iters", str(iters)]
    workdir = tempfile.mkdtemp(prefix="npu_dit_bench_vae_")
    serial_out, parallel_out = os.path.join(workdir, "serial.pt"), os.path.join(workdir, "spatial.pt")
    results: dict[str, Any] = {}
    log("serial decode (1 process, 1 thread) ...")
    start = time.perf_counter()
    results["serial"] = _run([sys.executable, "-m", "npu_dit.tools.bench_vae_worker", "--mode", "serial",
                              "--warmup", "0", "--save-output", serial_out, *common], env, timeout)
    log(f"  {results['serial']['median_s']:.2f} s per decode ({time.perf_counter() - start:.0f} s)")
    log(f"spatial_degree={degree} ({degree} processes, Gloo, 1 thread each) ...")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={degree}", f"--master-port={free_port()}",
           "-m", "npu_dit.tools.bench_vae_worker", "--mode", "spatial", "--warmup", str(warmup),
           "--save-output", parallel_out, *common]
    results["spatial"] = _run(cmd, env, timeout)
    results["spatial"]["max_abs_err_vs_serial"] = (torch.load(parallel_out) - torch.load(serial_out)).abs().max().item()
    log(f"  {results['spatial']['median_s']:.2f} s per decode ({time.perf_counter() - start:.0f} s)")
    if results["spatial"].get("fell_back"):
        log("  WARNING: the spatial graph fell back to the captured graph: these are not spatial figures")
    serial_growth = results["serial"]["peak_growth_mib"][0]
    results["spatial"]["speedup"] = results["serial"]["median_s"] / results["spatial"]["median_s"]
    # CPU seconds per decode (process time: what the machine's other load cannot inflate)
    results["spatial"]["cpu_speedup"] = results["serial"]["cpu_s"][0] / max(results["spatial"]["cpu_s"])
    results["spatial"]["memory_ratio"] = [g / serial_growth for g in results["spatial"]["peak_growth_mib"]]
    serial_decode = results["serial"].get("decode_growth_mib", [None])[0]
    if serial_decode:
        results["spatial"]["decode_memory_ratio"] = [
            g / serial_decode if g is not None else None for g in results["spatial"]["decode_growth_mib"]]
    if float64_reference:
        # CPU has no oneDNN path for float64 convolutions: ATen's im2col kernel holds a
        # [C*k*k, H*W] buffer per convolution (9.4 GB for a 128-channel 3x3 conv at 1024x1024),
        # so the reference fits only smaller images; a failure is reported, not fatal
        reference_out = os.path.join(workdir, "float64.pt")
        log("serial decode in float64 (1 process, 1 thread): the reference ...")
        start = time.perf_counter()
        try:
            results["float64"] = _run([sys.executable, "-m", "npu_dit.tools.bench_vae_worker", "--mode", "serial",
                                       "--float64", "--warmup", "0", "--save-output", reference_out, *common],
                                      env, timeout)
        except RuntimeError as exc:
            results["float64_failed"] = str(exc).splitlines()[0][:300]
            log(f"  the float64 reference failed (out of memory at this size?): {results['float64_failed']}")
        else:
            log(f"  {results['float64']['median_s']:.2f} s per decode ({time.perf_counter() - start:.0f} s)")
            reference = torch.load(reference_out)
            for key, path in (("serial", serial_out), ("spatial", parallel_out)):
                diff = torch.load(path).double() - reference
                results[key]["max_abs_err_vs_float64"] = diff.abs().max().item()
                results[key]["mean_abs_err_vs_float64"] = diff.abs().mean().item()
    results["setup"] = {
        "model": f"{vae} VAE ({size} config, random weights), decode of a {height}x{width} image's latent",
        "degree": degree, "warmup": warmup, "iters": iters,
        "machine": machine(),
        "load_before": os.getloadavg()[0],
    }
    return results


def format_vae_table(results: dict[str, Any]) -> str:
    degree = results["setup"]["degree"]
    serial, spatial = results["serial"], results["spatial"]
    rows = [
        "| configuration | processes | time per decode | speed-up | CPU s per decode (per process) | CPU-time speed-up | peak RSS growth per process | vs serial growth | max abs err vs serial |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| serial (eager) | 1 | {serial['median_s']:.2f} s | 1.00x | {serial['cpu_s'][0]:.1f} | 1.00x | "
        f"{serial['peak_growth_mib'][0]:.0f} MiB | 1.00x | - |",
        f"| spatial_degree={degree} | {degree} | {spatial['median_s']:.2f} s | {spatial['speedup']:.2f}x | "
        f"{', '.join(f'{c:.1f}' for c in spatial['cpu_s'])} | {spatial['cpu_speedup']:.2f}x | "
        f"{', '.join(f'{g:.0f}' for g in spatial['peak_growth_mib'])} MiB | "
        f"{', '.join(f'{r:.2f}x' for r in spatial['memory_ratio'])} | {spatial['max_abs_err_vs_serial']:.1e} |",
    ]
    if spatial.get("decode_memory_ratio"):
        rows.append(
            f"\nPeak RSS growth during the timed decode alone (high-water mark reset after the warm-up / compile): "
            f"serial {serial['decode_growth_mib'][0]:.0f} MiB; spatial_degree={degree} "
            f"{', '.join(f'{g:.0f}' for g in spatial['decode_growth_mib'])} MiB per process = "
            f"{', '.join(f'{r:.2f}x' for r in spatial['decode_memory_ratio'])} of the serial growth."
        )
    if "max_abs_err_vs_float64" in spatial:
        rows.append(
            f"\nAgainst the same decode in float64: serial float32 max abs err "
            f"{serial['max_abs_err_vs_float64']:.1e} (mean {serial['mean_abs_err_vs_float64']:.1e}), "
            f"spatial_degree={degree} {spatial['max_abs_err_vs_float64']:.1e} "
            f"(mean {spatial['mean_abs_err_vs_float64']:.1e})."
        )
    if results.get("float64_failed"):
        rows.append(f"\nThe float64 reference decode failed: {results['float64_failed']}")
    if spatial.get("fell_back"):
        rows.append("\nWARNING: the spatial graph fell back to the captured graph (see the warning).")
    return "\n".join(rows)


def write_vae_section(path: str, command: str, results: dict[str, Any], note: str = "") -> None:
    setup = results["setup"]
    body = "\n".join([
        MARK_START,
        f"Command: `{command}`  ",
        f"Machine: {setup['machine']}; Gloo over loopback, one thread per process; 1-minute load average "
        f"before the run: {setup['load_before']:.1f}.  ",
        f"Model: {setup['model']}; serial: {setup['iters']} timed eager decode(s); spatial: {setup['warmup']} warm-up "
        f"(compile) + {setup['iters']} timed decode(s). "
        f"Memory: peak RSS minus RSS before the first decode call, per process.",
        "",
        format_vae_table(results),
        *(["", note] if note else []),
        MARK_END,
    ])
    replace_section(path, MARK_START, MARK_END, body, heading="## VAE spatial parallelism on CPU (issue #11)")
