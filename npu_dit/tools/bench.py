"""`npu-dit bench ulysses`: serial vs Ulysses vs Async Ulysses on the bench-size FLUX config.

Each configuration runs in fresh processes (torchrun for the parallel ones, Gloo on CPU, one thread
per rank), so the serial baseline and each rank get one core each. Reports the median time per
transformer call, the time for a 28-step generation, the speed-up and the parallel efficiency
T1 / (P * TP), and checks the parallel output against the serial one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from npu_dit.runtime.dist import free_port

MARK_START = "<!-- bench:ulysses:start -->"
MARK_END = "<!-- bench:ulysses:end -->"


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("NPU_DIT_BENCH "):
            return json.loads(line[len("NPU_DIT_BENCH "):])
    raise RuntimeError(f"no result line from {' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def bench_ulysses(
    *,
    degree: int = 2,
    height: int = 512,
    width: int = 512,
    prompt_len: int = 128,
    warmup: int = 2,
    iters: int = 5,
    inner_compiler: str = "eager",
    profile_dir: str | None = None,
    timeout: float = 1800,
    log=print,
) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    common = ["--size", "bench", "--height", str(height), "--width", str(width), "--prompt-len", str(prompt_len),
              "--warmup", str(warmup), "--iters", str(iters), "--inner-compiler", inner_compiler]
    workdir = tempfile.mkdtemp(prefix="npu_dit_bench_")
    serial_out = os.path.join(workdir, "serial.pt")
    results = {}
    log(f"serial baseline (1 process, 1 thread) ...")
    start = time.perf_counter()
    results["serial"] = _run([sys.executable, "-m", "npu_dit.tools.bench_worker", "--mode", "serial",
                              "--save-output", serial_out, *common], env, timeout)
    log(f"  {results['serial']['median_s']:.3f} s per call ({time.perf_counter() - start:.0f} s)")
    for name, extra in (("ulysses", []), ("ulysses-async", ["--async-ulysses"])):
        log(f"{name} on {degree} processes (torchrun, Gloo, 1 thread each) ...")
        out_path = os.path.join(workdir, f"{name}.pt")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={degree}",
               f"--master-port={free_port()}", "-m", "npu_dit.tools.bench_worker", "--mode", "ulysses",
               "--save-output", out_path, *extra, *common]
        if profile_dir:
            cmd += ["--profile-dir", os.path.join(profile_dir, name)]
        start = time.perf_counter()
        results[name] = _run(cmd, env, timeout)
        err = (torch.load(out_path) - torch.load(serial_out)).abs().max().item()
        results[name]["max_abs_err_vs_serial"] = err
        log(f"  {results[name]['median_s']:.3f} s per call, max |err| {err:.2e} ({time.perf_counter() - start:.0f} s)")
    t1 = results["serial"]["median_s"]
    for name in ("ulysses", "ulysses-async"):
        tp = results[name]["median_s"]
        results[name]["speedup"] = t1 / tp
        results[name]["efficiency"] = t1 / (degree * tp)
    results["setup"] = {
        "model": "flux.1-dev (bench config: 8 heads x 128 = hidden 1024, 2 double + 2 single blocks)",
        "tokens": {"image": (height // 16) * (width // 16), "text": prompt_len},
        "degree": degree, "warmup": warmup, "iters": iters, "inner_compiler": inner_compiler,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    setup = results["setup"]
    degree = setup["degree"]
    rows = [
        "| configuration | devices | time per call (median) | 28 calls | speed-up | efficiency T1/(P·TP) | max abs err vs serial | blocked in wait_tensor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {"serial": ("baseline", 1), "ulysses": (f"Ulysses-{degree}", degree), "ulysses-async": (f"Async Ulysses-{degree}", degree)}
    for key, (label, devices) in labels.items():
        r = results[key]
        blocked = f"{r['wait_blocked_ms']:.0f} ms" if r.get("wait_blocked_ms") is not None else "-"
        rows.append(
            f"| {label} | {devices} CPU process{'es' if devices > 1 else ''} | {r['median_s']:.3f} s | {28 * r['median_s']:.1f} s | "
            f"{r.get('speedup', 1.0):.2f}x | {r.get('efficiency', 1.0):.2f} | "
            f"{r.get('max_abs_err_vs_serial', 0.0):.1e} | {blocked} |"
        )
    return "\n".join(rows)


def write_section(path: str, command: str, results: dict[str, Any]) -> None:
    setup = results["setup"]
    body = "\n".join([
        MARK_START,
        f"Command: `{command}`  ",
        f"Machine: {setup['machine']}; Gloo over loopback, one thread per process.  ",
        f"Model: {setup['model']}; {setup['tokens']['image']} image + {setup['tokens']['text']} text tokens; "
        f"{setup['warmup']} warm-up + {setup['iters']} timed calls; inner compiler `{setup['inner_compiler']}`.",
        "",
        format_table(results),
        MARK_END,
    ])
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if MARK_START in text:
        text = re.sub(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), lambda _: body, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Ulysses on CPU (issue #3)\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)
