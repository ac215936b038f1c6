"""`npu-dit plan MODEL --devices N --hardware NAME`: every legal configuration's predicted time, memory and
traffic, fastest first, the recommendation marked; `npu-dit plan calibrate --hardware NAME --from RESULTS.json`
fits a profile's free constants to measured runs. The model lives in `npu_dit/planner/`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from npu_dit.tools.help_format import HelpFormatter

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CONFIG_KEYS = ("ulysses_degree", "async_ulysses", "tp_degree", "cfg_degree", "text_encoder_parallel", "vae_parallel",
               "attention_backend", "predicted_s", "stages_s", "peak_memory_gib", "bytes_per_step", "fits")


def _image_size(text: str) -> tuple[int, int]:
    from npu_dit.tools.cli import _image_size as parse

    return parse(text)


def add_parser(sub) -> None:
    from npu_dit.models import DEFAULT_MODEL, MODELS
    from npu_dit.planner.hardware import available

    p = sub.add_parser("plan", formatter_class=HelpFormatter,
                       help="predict every parallel configuration's time, memory and traffic on a hardware profile; "
                            "`plan calibrate` fits a profile to measured runs")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"one of: {', '.join(MODELS)}; or `calibrate` (with --hardware and --from)")
    p.add_argument("--devices", type=int, default=None, help="devices (NPUs, GPUs, CPU ranks) to spend; default 2")
    p.add_argument("--hardware", default=None, help=f"a profile: {', '.join(available())}, or a profile file (.json)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="denoising steps; default: the model's pipeline default")
    p.add_argument("--prompt-len", type=int, default=None, help="text tokens the transformer sees (default: the model's)")
    p.add_argument("--input-image", type=_image_size, action="append", default=None, metavar="HxW",
                   help="an edit model's input image; repeat for several (default: one of 1024x1024, as the pipelines "
                        "resize it)")
    p.add_argument("--size", default="full", help="the model's config: full, or bench / tiny (the offline pipelines)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default bfloat16 (full), float32 (bench, tiny)")
    p.add_argument("--cache-fraction", type=float, default=1.0,
                   help="the expected share of steps the cache computes (1: no cache)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the best predicted time against 1, 2, 4, 8 devices on every profile")
    p.add_argument("--no-cache", action="store_true", help="re-read the graphs instead of the cached costs")
    p.add_argument("--from", dest="from_file", metavar="RESULTS.json", default=None,
                   help="calibrate: measured runs (generate --json, bench seed --json, or {\"measurements\": [...]})")
    p.add_argument("--out", metavar="PROFILE.json", default=None, help="calibrate: write the fitted profile here")
    p.add_argument("--cpu-seconds", action="store_true",
                   help="calibrate: fit and check each run's busiest rank's CPU seconds (generate --json reports) instead "
                        "of its wall times: on a machine other jobs share, the wall time follows their load")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def main(args: argparse.Namespace) -> int:
    if args.model == "calibrate":
        return _calibrate(args)
    from npu_dit.models import get_model
    from npu_dit.planner import hardware, model

    spec = get_model(args.model)
    hw = hardware.load(args.hardware or "atlas-800i-a2")
    devices = args.devices if args.devices is not None else 2
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    if not 0 < args.cache_fraction <= 1:  # checked before the (slow) capture
        raise ValueError(f"--cache-fraction is the expected share of computed steps, in (0, 1]; got {args.cache_fraction}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    steps = args.steps or spec.default_steps
    costs = _costs(args, spec.name)
    start = time.perf_counter()
    rows = model.plan(costs, hw, devices, steps=steps, cache_fraction=args.cache_fraction)
    elapsed = time.perf_counter() - start
    report = {"model": spec.name, "hardware": hw.name, "devices": devices, "height": args.height, "width": args.width,
              "steps": steps, "size": args.size, "cache_fraction": args.cache_fraction, "plan_s": elapsed,
              "configs": [{k: r[k] for k in CONFIG_KEYS} | {"label": r["label"], "recommended": r["recommended"]}
                          for r in rows]}
    print(json.dumps(report, indent=1) if args.json else format_plan(report, hw))
    if args.plot:
        plot(args, spec.name, costs, steps)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _costs(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    from npu_dit.planner.extract import model_costs

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.size == "full" else torch.float32)
    log = None if args.quiet or args.json else (lambda m: print(f"plan: {m} ...", file=sys.stderr, flush=True))
    return model_costs(model_name, size=args.size, height=args.height, width=args.width, prompt_len=args.prompt_len,
                       input_images=args.input_image, dtype=dtype, use_cache=not args.no_cache, log=log)


def _gib(n: float) -> str:
    return f"{n:.1f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def format_plan(report: dict[str, Any], hw) -> str:
    lines = [f"{report['model']} on {report['devices']} x {hw.name} ({hw.description}), "
             f"{report['height']}x{report['width']}, {report['steps']} steps"
             + (f", cache computes {report['cache_fraction']:.0%} of steps" if report["cache_fraction"] < 1 else ""),
             "efficiencies: " + ", ".join(f"{k} {v:.3g}" for k, v in hw.constants().items())
             + f"; {len(report['configs'])} configurations, evaluated in {report['plan_s'] * 1000:.0f} ms",
             "",
             f"  {'configuration':<58} {'total':>9} {'text':>7} {'denoise':>9} {'VAE':>7} {'GiB/rank':>9} "
             f"{'sent/step':>11}"]
    for r in report["configs"]:
        mark = "*" if r["recommended"] else " "
        oom = "" if r["fits"] else "  OUT OF MEMORY"
        s = r["stages_s"]
        lines.append(f"{mark} {r['label']:<58} {r['predicted_s']:8.2f}s {s['text_encoding']:6.2f}s "
                     f"{s['denoising']:8.2f}s {s['vae']:6.2f}s {_gib(r['peak_memory_gib']):>9} "
                     f"{_bytes(r['bytes_per_step']):>11}{oom}")
    lines.append("")
    lines.append("* recommended: the fastest configuration that fits in the device's memory")
    return "\n".join(lines)


def plot(args: argparse.Namespace, model_name: str, costs: dict[str, Any], steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from npu_dit.planner import hardware, model

    counts = [1, 2, 4, 8]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in hardware.available():
        hw = hardware.load(name)
        best = []
        for n in counts:
            rows = [r for r in model.plan(costs, hw, n, steps=steps, cache_fraction=args.cache_fraction) if r["fits"]]
            best.append(rows[0]["predicted_s"] if rows else float("nan"))
        ax.plot(counts, best, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted seconds per image (best configuration that fits)")
    ax.set_title(f"{model_name}, {args.height}x{args.width}, {steps} steps ({args.size} config)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def _calibrate(args: argparse.Namespace) -> int:
    from npu_dit.planner import calibrate, hardware
    from npu_dit.planner.extract import model_costs

    if not args.hardware or not args.from_file:
        raise ValueError("plan calibrate needs --hardware NAME and --from RESULTS.json")
    hw = hardware.load(args.hardware)
    try:
        with open(args.from_file) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--from {args.from_file}: {exc}") from None
    measurements = calibrate.load_measurements(data, default_backend=next(iter(hw.attention_kernels)))
    fit_on = [m for m in measurements if m.use == "calibrate"]
    held_out = [m for m in measurements if m.use != "calibrate"]
    log = None if args.quiet or args.json else (lambda m: print(f"plan: {m} ...", file=sys.stderr, flush=True))

    def costs_for(m):
        return model_costs(m.model, size=m.size, height=m.height, width=m.width, prompt_len=m.prompt_len,
                           input_images=m.input_images, dtype=DTYPES[m.dtype], use_cache=not args.no_cache, log=log)

    if args.cpu_seconds:  # checked before the (slow) captures
        calibrate.check_cpu_seconds(measurements)
    fitted, rows = calibrate.calibrate(hw, fit_on, costs_for, cpu_seconds=args.cpu_seconds)
    names = calibrate.fitted_names(hw, fit_on, cpu_seconds=args.cpu_seconds)
    checks = calibrate.check(fitted, held_out, costs_for, cpu_seconds=args.cpu_seconds)
    result = {"hardware": hw.name, "fitted": {k: fitted.constants()[k] for k in names},
              "before": {k: hw.constants()[k] for k in names}, "calibration": rows, "validation": checks}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        if args.cpu_seconds:
            print("compared: the busiest rank's CPU seconds")
        print(f"{hw.name}: fitted " + ", ".join(f"{k} {result['before'][k]:.3g} -> {v:.3g}" for k, v in result["fitted"].items()))
        print(calibrate.format_rows("fitted on", rows))
        if checks:
            print(calibrate.format_rows("held out", checks))
    if args.out:
        with open(args.out, "w") as f:
            f.write(calibrate.profile_json(fitted, args.from_file, names) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
