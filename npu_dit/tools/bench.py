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
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from npu_dit.runtime.dist import free_port

def _marks(inner_compiler: str) -> tuple[str, str]:
    """One section per inner compiler: `<!-- bench:ulysses:... -->` (eager), `...ulysses-inductor...`."""
    tag = "ulysses" if inner_compiler == "eager" else f"ulysses-{inner_compiler}"
    return f"<!-- bench:{tag}:start -->", f"<!-- bench:{tag}:end -->"


def machine() -> str:
    """The machine line every bench section records."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("NPU_DIT_BENCH "):
            return json.loads(line[len("NPU_DIT_BENCH "):])
    raise RuntimeError(f"no result line from {' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _run_side_by_side(cmd: list[str], copies: int, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """`copies` independent processes of `cmd` at once (each its own output path): what one process's
    calls cost while the others keep the remaining cores busy."""
    procs = [subprocess.Popen([*cmd[:-1], f"{cmd[-1]}.{i}"] if i else cmd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(copies)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark process failed ({' '.join(cmd)}):\n{out[-3000:]}\n{err[-3000:]}")
        lines = [line for line in out.splitlines() if line.startswith("NPU_DIT_BENCH ")]
        if not lines:
            raise RuntimeError(f"no result line from {' '.join(cmd)}:\n{out[-2000:]}\n{err[-2000:]}")
        results.append(json.loads(lines[-1][len("NPU_DIT_BENCH "):]))
    merged = dict(results[0])
    merged["copy_medians_s"] = [r["median_s"] for r in results]
    merged["median_s"] = statistics.median(merged["copy_medians_s"])
    return merged


def bench_ulysses(
    *,
    degree: int = 2,
    height: int = 512,
    width: int = 512,
    prompt_len: int = 128,
    warmup: int = 2,
    iters: int = 5,
    runs: int = 1,
    inner_compiler: str = "eager",
    profile_dir: str | None = None,
    peer: bool | None = None,
    ceiling: bool = False,
    timeout: float = 1800,
    log=print,
) -> dict[str, Any]:
    """Each configuration `runs` times in fresh processes, the configurations interleaved round by round
    (a slow spell of a shared machine then hits every configuration alike). A configuration's time is
    the median of its runs' medians; its spread is max - min of those run medians (with one run: of
    the calls). `peer`: also run cache-dit's Ulysses (npu_dit.tools.bench_peer); None = when installed.
    `ceiling`: also `degree` serial processes side by side: the time per call of one process while the
    others keep the rest of the cores busy (shared caches and memory bandwidth), so T1 / that time is
    the efficiency a perfect split, with free communication, could reach on this machine."""
    from npu_dit.tools import bench_peer

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    common = ["--size", "bench", "--height", str(height), "--width", str(width), "--prompt-len", str(prompt_len),
              "--warmup", str(warmup), "--iters", str(iters)]
    workdir = tempfile.mkdtemp(prefix="npu_dit_bench_")

    def torchrun(module: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={degree}",
                f"--master-port={free_port()}", "-m", module]

    # (key, label, processes, command without the output path)
    ours = ["--inner-compiler", inner_compiler, *common]
    configs: list[tuple[str, str, int, Any]] = [
        ("serial", "baseline", 1,
         lambda: [sys.executable, "-m", "npu_dit.tools.bench_worker", "--mode", "serial", *ours]),
        ("ulysses", f"Ulysses-{degree}", degree,
         lambda: [*torchrun("npu_dit.tools.bench_worker"), "--mode", "ulysses", *ours]),
        ("ulysses-async", f"Async Ulysses-{degree}", degree,
         lambda: [*torchrun("npu_dit.tools.bench_worker"), "--mode", "ulysses", "--async-ulysses", *ours]),
    ]
    if ceiling:
        configs.insert(1, ("serial-side-by-side", f"{degree} serial processes side by side (ceiling)", degree,
                           lambda: [sys.executable, "-m", "npu_dit.tools.bench_worker", "--mode", "serial", *ours]))
    results: dict[str, Any] = {}
    if peer is not False and bench_peer.available():
        for key, label, extra in bench_peer.PEER_CONFIGS:
            configs.append((key, f"{label.format(P=degree)} ({bench_peer.version()})", degree,
                            lambda extra=extra: [*torchrun("npu_dit.tools.bench_peer"), *extra, *common]))
    elif peer is not False:  # asked for, or by default: say how to get the column
        results["peer_note"] = bench_peer.missing_note()
        log(results["peer_note"])

    per_run: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in configs}
    for run in range(runs):
        for key, label, procs, command in configs:
            out_path = os.path.join(workdir, f"{key}.pt")
            cmd = [*command(), "--save-output", out_path]
            if profile_dir and key != "serial" and run == runs - 1:
                cmd += ["--profile-dir", os.path.join(profile_dir, key)]
            where = (f"{procs} independent processes (1 thread each)" if key == "serial-side-by-side" else
                     f"{procs} processes (torchrun, Gloo, 1 thread each)" if procs > 1 else "1 process (1 thread)")
            log(f"[run {run + 1}/{runs}] {label} on {where} ...")
            start = time.perf_counter()
            r = _run_side_by_side(cmd, procs, env, timeout) if key == "serial-side-by-side" else _run(cmd, env, timeout)
            r["label"] = label
            r["max_abs_err_vs_serial"] = (0.0 if key == "serial" else
                                          (torch.load(out_path) - torch.load(os.path.join(workdir, "serial.pt"))).abs().max().item())
            per_run[key].append(r)
            log(f"  {r['median_s']:.3f} s per call, max |err| {r['max_abs_err_vs_serial']:.2e} "
                f"({time.perf_counter() - start:.0f} s)")
    for key, label, procs, _ in configs:
        rs = per_run[key]
        medians = [r["median_s"] for r in rs]
        merged = dict(rs[-1])
        merged.update(
            devices=procs,
            run_medians_s=medians,
            median_s=statistics.median(medians),
            spread_s=(max(medians) - min(medians)) if runs > 1 else (max(rs[0]["times_s"]) - min(rs[0]["times_s"])),
            max_abs_err_vs_serial=max(r["max_abs_err_vs_serial"] for r in rs),
            fell_back=any(r.get("fell_back") for r in rs),
        )
        results[key] = merged
    t1 = results["serial"]["median_s"]
    for key, *_ in configs:
        results[key]["speedup"] = t1 / results[key]["median_s"]
        results[key]["efficiency"] = t1 / (results[key]["devices"] * results[key]["median_s"])
    if ceiling:  # independent processes: each does the whole job, so its T1 / T is the ceiling itself
        side = results["serial-side-by-side"]
        side["speedup"], side["efficiency"] = None, t1 / side["median_s"]
    results["order"] = [key for key, *_ in configs]
    results["setup"] = {
        "model": "flux.1-dev (bench config: 8 heads x 128 = hidden 1024, 2 double + 2 single blocks)",
        "tokens": {"image": (height // 16) * (width // 16), "text": prompt_len},
        "degree": degree, "warmup": warmup, "iters": iters, "runs": runs, "inner_compiler": inner_compiler,
        "machine": machine(),
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    setup = results["setup"]
    spread_of = "run medians" if setup.get("runs", 1) > 1 else "calls"
    rows = [
        f"| configuration | devices | time per call (median) | spread (max-min of {spread_of}) | 28 calls | speed-up "
        "| efficiency T1/(P·TP) | max abs err vs serial | blocked in wait_tensor | shape check per call |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in results["order"]:
        r = results[key]
        devices = r["devices"]
        blocked = f"{r['wait_blocked_ms']:.0f} ms" if r.get("wait_blocked_ms") is not None else "-"
        check = r.get("agreement_check_ms")
        check = f"{check:.3f} ms ({100 * check / 1000 / r['median_s']:.2f} %)" if check is not None else "-"
        label = r["label"] + (" (fell back)" if r.get("fell_back") else "")
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        rows.append(
            f"| {label} | {devices} CPU process{'es' if devices > 1 else ''} | {r['median_s']:.3f} s | "
            f"{r['spread_s']:.3f} s | {28 * r['median_s']:.1f} s | {speedup} | {r['efficiency']:.2f} | "
            f"{r['max_abs_err_vs_serial']:.1e} | {blocked} | {check} |"
        )
    sync, asyn = results["ulysses"], results["ulysses-async"]
    gain = sync["median_s"] - asyn["median_s"]
    rows += ["", f"Async vs sync: {gain * 1000:+.0f} ms per call ({100 * gain / sync['median_s']:+.1f} %); spread "
                 f"{sync['spread_s'] * 1000:.0f} ms (sync), {asyn['spread_s'] * 1000:.0f} ms (async) — the gain is "
                 f"{'larger' if gain > max(sync['spread_s'], asyn['spread_s']) else 'not larger'} than the spread."]
    if "serial-side-by-side" in results:
        side = results["serial-side-by-side"]
        rows += ["", f"Ceiling: with {side['devices']} serial processes side by side each call takes "
                     f"{side['median_s']:.3f} s (vs {results['serial']['median_s']:.3f} s alone), so no "
                     f"{side['devices']}-way split can exceed efficiency {side['efficiency']:.2f} on this machine; "
                     f"against it Ulysses reaches {sync['efficiency'] / side['efficiency']:.2f} (sync) and "
                     f"{asyn['efficiency'] / side['efficiency']:.2f} (async)."]
    for key in ("ulysses", "ulysses-async"):
        if results[key].get("streams"):
            rows += ["", f"{results[key]['label']} plan (public call): " + "; ".join(results[key]["streams"])]
            break
    if results.get("peer_note"):
        rows += ["", results["peer_note"]]
    return "\n".join(rows)


def write_section(path: str, command: str, results: dict[str, Any]) -> None:
    setup = results["setup"]
    start, end = _marks(setup["inner_compiler"])
    body = "\n".join([
        start,
        f"Command: `{command}`  ",
        f"Machine: {setup['machine']}; Gloo over loopback, one thread per process.  ",
        f"Model: {setup['model']}; {setup['tokens']['image']} image + {setup['tokens']['text']} text tokens; "
        f"{setup['warmup']} warm-up + {setup['iters']} timed calls per run, {setup['runs']} run(s) per configuration, "
        f"interleaved; inner compiler `{setup['inner_compiler']}`.",
        "",
        format_table(results),
        end,
    ])
    replace_section(path, start, end, body, heading="## Ulysses on CPU (issues #3, #8)")


def replace_section(path: str, start: str, end: str, body: str, *, heading: str) -> None:
    """Put `body` (which starts with `start` and ends with `end`) in place of that section of `path`,
    or append it under `heading`."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: body, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------
# hybrid cache

CACHE_MARK_START = "<!-- bench:cache:start -->"
CACHE_MARK_END = "<!-- bench:cache:end -->"


def cache_configs(size: str, threshold_f1: float, threshold_f8: float, steps: int = 28) -> list[tuple[str, dict[str, Any] | None]]:
    base = {"max_warmup_steps": 4, "residual_diff_threshold": threshold_f1, "num_inference_steps": steps}
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("no cache", None),
        ("F1B0", {**base, "Fn_compute_blocks": 1, "Bn_compute_blocks": 0}),
        ("F1B0 + TaylorSeer(1)", {**base, "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "taylorseer_order": 1}),
        ("F1B0 + fast mask", {**base, "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "steps_mask": "fast"}),
    ]
    if size != "tiny":
        f8 = {"max_warmup_steps": 4, "residual_diff_threshold": threshold_f8, "Fn_compute_blocks": 8, "Bn_compute_blocks": 0,
              "num_inference_steps": steps}
        configs += [
            ("F8B0", f8),
            ("F8B0 + TaylorSeer(1) + fast mask", {**f8, "taylorseer_order": 1, "steps_mask": "fast"}),
        ]
    return configs


def bench_cache(
    *,
    size: str = "bench-deep",
    height: int = 256,
    width: int = 256,
    prompt_len: int = 64,
    steps: int = 28,
    threshold_f1: float = 0.42,
    threshold_f8: float = 0.5,
    threads: int = 1,
    log=print,
) -> dict[str, Any]:
    """28-step FlowMatch Euler generations with each cache configuration, against no cache."""
    import warnings

    from npu_dit.models import build_transformer, get_model
    from npu_dit.runtime import cache as cache_runtime
    from npu_dit.tools.denoise import denoise

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    spec = get_model("flux.1-dev")
    config = spec.config(size)
    model = build_transformer(spec, config, seed=0)
    inputs = spec.example_inputs(config, height=height, width=width, prompt_len=prompt_len, seed=0)
    rows = []
    reference = None
    uncached_s = None
    for name, cache in cache_configs(size, threshold_f1, threshold_f8, steps):
        torch._dynamo.reset()
        options = {"cache": cache} if cache is not None else {}
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
        with torch.no_grad():
            denoise(compiled, inputs, steps=2, height=height, width=width)  # compile and warm up
            cache_runtime.reset_all()
            start = time.perf_counter()
            latents = denoise(compiled, inputs, steps=steps, height=height, width=width)
            seconds = time.perf_counter() - start
        controller = cache_runtime.latest() if cache is not None else None
        pattern = controller.pattern() if controller is not None else "1" * steps
        overhead_s = controller.overhead()["seconds_per_call"] if controller is not None else 0.0
        computed = pattern.count("1")
        if reference is None:
            reference, uncached_s = latents, seconds
        err = (latents - reference).abs().max().item()
        rel = ((latents - reference).norm() / reference.norm()).item()
        cached = steps - computed
        bound = ((steps - cached + 1) / steps + 0.05) * uncached_s
        rows.append({"config": name, "options": cache, "seconds": seconds, "computed": computed, "steps": steps,
                     "overhead_ms": overhead_s * 1e3, "overhead_pct": 100 * overhead_s / (uncached_s / steps),
                     "pattern": pattern, "max_abs_err": err, "rel_l2_err": rel, "bound_s": bound,
                     "within_bound": seconds <= bound})
        log(f"  {name:<34} {seconds:6.2f} s  computed {computed}/{steps}  [{pattern}]  rel err {rel:.2e}  "
            f"controller {overhead_s * 1e3:.2f} ms/step")
        if controller is not None:
            log("    " + controller.format_summary().replace("\n", "\n    "))
    return {
        "rows": rows,
        "setup": {"size": size, "config": config, "tokens": {"image": (height // 16) * (width // 16), "text": prompt_len},
                  "steps": steps, "threads": threads,
                  "machine": machine()},
    }


INDUCTOR_SHAPES = ((256, 256, 64), (192, 320, 40), (320, 256, 96))  # (height, width, prompt tokens)


def bench_cache_compiles(*, size: str = "bench-deep", steps: int = 4, threads: int = 1,
                         shapes: tuple[tuple[int, int, int], ...] = INDUCTOR_SHAPES, log=print) -> dict[str, Any]:
    """The cached graph with inner_compiler="inductor" over three resolutions / prompt lengths: how
    many Inductor compiles each region needed, and how long the first call at each shape took."""
    import warnings

    from npu_dit.models import build_transformer, get_model
    from npu_dit.runtime import cache as cache_runtime
    from npu_dit.tools.denoise import denoise

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    spec = get_model("flux.1-dev")
    config = spec.config(size)
    if size == "tiny":
        shapes = tuple((h // 2, w // 2, p // 4) for h, w, p in shapes)
    model = build_transformer(spec, config, seed=0)
    torch._dynamo.reset()
    cache = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.42, "max_warmup_steps": 1}
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"cache": cache, "inner_compiler": "inductor"})
    rows = []
    controller = None
    for height, width, prompt_len in shapes:
        inputs = spec.example_inputs(config, height=height, width=width, prompt_len=prompt_len, seed=0)
        start = time.perf_counter()
        with torch.no_grad():
            denoise(compiled, inputs, steps=1, height=height, width=width)
        first = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            denoise(compiled, inputs, steps=steps, height=height, width=width)
        per_step = (time.perf_counter() - start) / steps
        controller = cache_runtime.latest()
        regions = (controller.front, controller.middle, controller.back)
        rows.append({"height": height, "width": width, "prompt_len": prompt_len, "first_call_s": first,
                     "step_s": per_step, "compiles": [r.compiles for r in regions],
                     "compile_s": [r.compile_seconds for r in regions]})
        log(f"  {height}x{width}, {prompt_len} text tokens: first call {first:.1f} s, then {per_step:.3f} s/step; "
            f"Inductor compiles so far (front, middle, back): {rows[-1]['compiles']}")
    return {"size": size, "rows": rows}


def format_compiles_table(results: dict[str, Any]) -> str:
    lines = [
        f"Inductor over three shapes ({results['size']} config, cache F1B0): compiles per region so far, "
        f"after each shape's first call.",
        "",
        "| shape (h x w, text tokens) | first call | step after | compiles (front, middle, back) | compile time so far |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['height']}x{r['width']}, {r['prompt_len']} | {r['first_call_s']:.1f} s | {r['step_s']:.3f} s | "
            f"{', '.join(map(str, r['compiles']))} | {sum(r['compile_s']):.1f} s |"
        )
    return "\n".join(lines)


def format_cache_table(results: dict[str, Any]) -> str:
    lines = [
        "| configuration | wall (28 steps) | steps computed | speed-up | bound (N-k+1)/N·T + 5 % | within | max abs err | rel L2 err | controller per step | pattern |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = results["rows"][0]["seconds"]
    for r in results["rows"]:
        lines.append(
            f"| {r['config']} | {r['seconds']:.2f} s | {r['computed']}/{r['steps']} | {base / r['seconds']:.2f}x | "
            f"{r['bound_s']:.2f} s | {'yes' if r['within_bound'] else 'NO'} | {r['max_abs_err']:.2e} | {r['rel_l2_err']:.2e} | "
            f"{r['overhead_ms']:.2f} ms ({r['overhead_pct']:.2f} %) | `{r['pattern']}` |"
        )
    return "\n".join(lines)


def write_cache_section(path: str, command: str, results_by_size: list[dict[str, Any]],
                        compiles: dict[str, Any] | None = None) -> None:
    parts = [CACHE_MARK_START, f"Command: `{command}`  "]
    for results in results_by_size:
        setup = results["setup"]
        cfg = setup["config"]
        parts += [
            "",
            f"**{setup['size']}** FLUX config ({cfg['num_layers']} double + {cfg['num_single_layers']} single blocks, "
            f"{cfg['num_attention_heads']} x {cfg['attention_head_dim']} heads), {setup['tokens']['image']} image + "
            f"{setup['tokens']['text']} text tokens, {setup['steps']} FlowMatch Euler steps, {setup['threads']} thread; "
            f"{setup['machine']}.",
            "",
            format_cache_table(results),
        ]
    if compiles is not None:
        parts += ["", format_compiles_table(compiles)]
    parts.append(CACHE_MARK_END)
    body = "\n".join(parts)
    replace_section(path, CACHE_MARK_START, CACHE_MARK_END, body, heading="## Hybrid cache (issue #4)")
