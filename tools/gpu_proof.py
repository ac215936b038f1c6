"""GPU proof (issue 20, item 6): the full-size FLUX.1-dev transformer on one GPU, eager and through
npu-dit, and `npu-dit generate --device cuda` end to end; one markdown table of seconds per step and
peak memory.

    python tools/gpu_proof.py                       # on a machine with one CUDA GPU (~25 GiB for the weights)
    python tools/gpu_proof.py --dry-run             # the same program on the CPU: tiny config, 2 steps

Rows (each a fresh Dynamo state, the same random bfloat16 weights built on the device, 1024x1024 =
4096 image tokens + 512 text tokens, `--steps` denoising steps as FluxPipeline runs them: one
transformer call per step, timestep t/1000 falling from 1, the latents updated by the output):

    eager      the diffusers module as it is
    npu_dit    torch.compile(backend="npu_dit", options={"attention_backend": "auto"})  (flash / cuDNN SDPA)
    cache      + options["cache"] = F1B0 (DBCache, Fn=1 Bn=0, cache-dit's defaults otherwise)
    inductor   + options["inner_compiler"] = "inductor"
    generate-tiny / generate-bench   `npu-dit generate flux.1-dev --device cuda --size tiny|bench` in a fresh process

Each compiled row first runs one untimed 2-step generation (compiles), then the timed one; the
columns are seconds per step of the timed run (device-synchronised), peak device memory allocated
during it, and the largest difference of the final latents from the eager row (bf16 noise for the
exact rows; the cache's approximation for `cache`). --dry-run runs the same code on the CPU with the
tiny config in float32 for 2 steps (what tests/test_gpu_proof.py runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROWS = ("eager", "npu_dit", "cache", "inductor", "generate-tiny", "generate-bench")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def denoise(model, inputs: dict, steps: int) -> torch.Tensor:
    """FluxPipeline's loop, reduced to the transformer: one call per step, Euler update of the latents."""
    latents = inputs["hidden_states"]
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    with torch.no_grad():
        for i in range(steps):
            timestep = torch.full((latents.shape[0],), sigmas[i], device=latents.device, dtype=latents.dtype)
            out = model(**dict(inputs, hidden_states=latents, timestep=timestep, return_dict=False))[0]
            latents = latents + (sigmas[i + 1] - sigmas[i]) * out
    return latents


def transformer_row(name: str, model, inputs: dict, steps: int, device: torch.device) -> dict:
    import npu_dit

    torch._dynamo.reset()
    options: dict = {"attention_backend": "auto"}
    if name == "cache":
        from npu_dit.pipeline_parallel import DEFAULT_WARMUP_STEPS, short_run_warmup

        options["cache"] = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "num_inference_steps": steps}
        if steps <= DEFAULT_WARMUP_STEPS:  # as parallelize does for short runs (the dry run's 2 steps)
            options["cache"]["max_warmup_steps"] = short_run_warmup(steps)
    if name == "inductor":
        options["inner_compiler"] = "inductor"
    runner = model if name == "eager" else torch.compile(model, backend="npu_dit", dynamic=True, options=options)
    if name != "eager":
        denoise(runner, inputs, min(2, steps))  # compiles (untimed)
        npu_dit.reset_cache()
    _sync(device)
    _peak_reset(device)
    start = time.perf_counter()
    latents = denoise(runner, inputs, steps)
    _sync(device)
    seconds = time.perf_counter() - start
    row = {"row": name, "s_per_step": seconds / steps, "peak_mib": _peak_mib(device), "latents": latents}
    if name == "cache":
        from npu_dit.runtime.cache import latest

        controller = latest()
        row["note"] = f"cache pattern {controller.pattern()}" if controller is not None else "no cache controller"
    else:
        from npu_dit.backend import RECORDS

        if name != "eager" and RECORDS:
            report = RECORDS[-1].report
            row["note"] = f"fell back: {report.fallback_reason}" if report.fell_back else ", ".join(
                f"{k}={v}" for k, v in sorted(report.counts.items()))
    return row


def generate_row(size: str, device: str, steps: int, dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "npu_dit.tools.cli", "generate", "flux.1-dev", "--device", device, "--size", size,
           "--steps", str(steps), "--warmup", "0" if dry_run else "1", "--json", "--quiet", "--out", f"gpu_proof_{size}.png"]
    if dry_run:
        cmd += ["--height", "128", "--width", "128"]
    elif size == "bench":
        cmd += ["--height", "1024", "--width", "1024"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"row": f"generate-{size}", "s_per_step": None, "peak_mib": None,
                "note": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    memory = report["peak_memory_per_rank"][0]
    return {"row": f"generate-{size}", "s_per_step": report["stages_s"]["denoising"] / report["steps"],
            "peak_mib": memory.get("device_mib"),
            "note": f"{report['height']}x{report['width']}, {report['device']} {report['dtype']}, "
                    f"total {report['stages_s']['total']:.2f} s"}


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| row | s / step | peak device memory (MiB) | max abs diff vs eager | note |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        s = f"{r['s_per_step']:.4f}" if r.get("s_per_step") is not None else "-"
        m = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        d = f"{r['diff']:.3g}" if r.get("diff") is not None else "-"
        lines.append(f"| {r['row']} | {s} | {m} | {d} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, float32, 2 steps")
    parser.add_argument("--steps", type=int, default=None, help="default: 28 (2 with --dry-run)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    steps = args.steps or (2 if args.dry_run else 28)
    if args.dry_run:
        device, dtype, size, side, prompt_len = torch.device("cpu"), torch.float32, "tiny", 128, 12
    else:
        if not torch.cuda.is_available():
            print("gpu_proof: no CUDA GPU here; run with --dry-run to check the script on the CPU", file=sys.stderr)
            return 2
        device, dtype, size, side, prompt_len = torch.device("cuda", 0), torch.bfloat16, "full", 1024, 512
        torch.cuda.set_device(device)
    from npu_dit.models import build_transformer, get_model

    spec = get_model("flux.1-dev")
    config = spec.config(size)
    model = build_transformer(spec, config, device=device, dtype=dtype, seed=0)  # random weights, on the device
    inputs = spec.example_inputs(config, height=side, width=side, prompt_len=prompt_len, device=device, dtype=dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    rows: list[dict] = []
    for row in rows_wanted:
        if row.startswith("generate-"):
            if args.dry_run and row == "generate-bench":
                continue  # the bench pipeline is minutes on a CPU
            rows.append(generate_row(row.split("-", 1)[1], device.type, steps, args.dry_run))
        else:
            rows.append(transformer_row(row, model, inputs, steps, device))
    eager = next((r["latents"] for r in rows if r["row"] == "eager"), None)
    for r in rows:
        if eager is not None and "latents" in r:
            r["diff"] = (r["latents"].float() - eager.float()).abs().max().item()
        r.pop("latents", None)
    header = (f"FLUX.1-dev transformer ({size} config, {dtype}), {side}x{side} ({(side // 16) ** 2} image + {prompt_len} "
              f"text tokens), {steps} steps, on {name}; torch {torch.__version__}")
    print(format_table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0 if all(r.get("s_per_step") is not None for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
