"""The `npu-dit` command line: `generate` (a whole pipeline), `inspect` (a full-size model offline), `plan` (predicted
time, memory and traffic per configuration), `models`, `bench`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from npu_dit.config import COMM_DTYPES
from npu_dit.tools.help_format import HelpFormatter, show_defaults
from npu_dit.models import DEFAULT_MODEL, MODELS

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 1024x1024; got {text!r}") from None


def _at_least(minimum: int, what: str = "an integer"):
    """An argparse type: an int >= `minimum` (a count of pixels, tokens, ranks, steps...)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad flag values end in one line naming the flag and what it takes, exit status 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ulysses-degree", type=_at_least(1), default=None, help="Ulysses sequence-parallel degree")
    p.add_argument("--async-ulysses", action="store_true", help="overlap all-to-all with the Q/K/V projections")
    p.add_argument("--tp-degree", type=_at_least(1), default=None, help="tensor-parallel degree (column/row-sharded linears)")
    p.add_argument("--cfg-degree", type=_at_least(1), default=None,
                   help="CFG parallelism: 2 branches of ulysses x tp ranks (shows the mesh and the bytes per step)")
    p.add_argument("--attention-backend", default=None, help="auto, sdpa, npu_fia, npu_fa, flash, cudnn, ...")
    p.add_argument("--comm-dtype", default=None, choices=COMM_DTYPES,
                   help="Ulysses all-to-alls: Q, V and the attention output in this dtype (default: the compute dtype)")
    p.add_argument("--cache", type=_json_dict, default=None, help='cache options as JSON, e.g. \'{"Fn_compute_blocks": 1}\'')
    p.add_argument("--spatial-degree", type=_at_least(1), default=None,
                   help="spatial (height-band) parallelism of a convolutional graph: the VAE")
    p.add_argument("--options", type=_json_dict, default=None, help="any backend options as a JSON object")


def _collect_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.options or {})
    if args.ulysses_degree is not None:
        options["ulysses_degree"] = args.ulysses_degree
    if args.async_ulysses:
        options["async_ulysses"] = True
    if getattr(args, "tp_degree", None) is not None:
        options["tp_degree"] = args.tp_degree
    if getattr(args, "cfg_degree", None) is not None:
        options["cfg_degree"] = args.cfg_degree
    if args.attention_backend is not None:
        options["attention_backend"] = args.attention_backend
    if getattr(args, "comm_dtype", None) is not None:
        options["comm_dtype"] = args.comm_dtype
    if args.cache is not None:
        options["cache"] = args.cache
    if getattr(args, "spatial_degree", None) is not None:
        options["spatial_degree"] = args.spatial_degree
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="npu-dit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="trace a full-size model on the meta device and show what the passes do",
                       formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"one of: {', '.join(MODELS)}, or a text encoder: t5-v1.1-xxl, qwen2.5-vl-7b-lm (default {DEFAULT_MODEL})")
    p.add_argument("--size", default="full", help="which config of the model: full, tiny or bench (flux.1-dev also: bench-deep)")
    p.add_argument("--height", type=_at_least(1), default=1024, help="image height in pixels")
    p.add_argument("--width", type=_at_least(1), default=1024, help="image width in pixels")
    p.add_argument("--prompt-len", type=_at_least(1), default=None, help="text tokens (default: the model's pipeline default)")
    p.add_argument("--input-image", type=_image_size, action="append", default=None, metavar="HxW",
                   help="an edit model's input image size in pixels; repeat for several (Edit-2509: up to 3)")
    p.add_argument("--batch", type=_at_least(1), default=1, help="batch size of the example call")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    p.add_argument("--vae", choices=("decode", "encode"), default=None,
                   help="inspect the model's VAE call instead of the transformer (default with --spatial-degree: decode)")
    _add_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--dump", metavar="DIR", default=None, help="write the captured graph and each pass's graphs here")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")

    sub.add_parser("models", help="list the seed models")

    from npu_dit.tools import generate

    generate.add_parser(sub)

    from npu_dit.tools import plan

    plan.add_parser(sub)

    b = sub.add_parser("bench", help="benchmarks; results go to docs/BENCHMARKS.md with --write")
    bsub = b.add_subparsers(dest="bench", required=True)
    u = bsub.add_parser("ulysses", help="serial vs Ulysses vs Async Ulysses (bench-size FLUX, Gloo on CPU)",
                        formatter_class=HelpFormatter)
    u.add_argument("--degree", type=_at_least(1), default=2)
    u.add_argument("--height", type=_at_least(1), default=512)
    u.add_argument("--width", type=_at_least(1), default=512)
    u.add_argument("--prompt-len", type=_at_least(1), default=128)
    u.add_argument("--warmup", type=_at_least(0), default=2)
    u.add_argument("--iters", type=_at_least(1), default=5, help="timed calls per run")
    u.add_argument("--runs", type=_at_least(1), default=1,
                   help="fresh-process runs per configuration, interleaved; the spread is over their medians")
    u.add_argument("--inner-compiler", default="eager", choices=("eager", "inductor"))
    u.add_argument("--profile", metavar="DIR", default=None, help="also write a Chrome trace per rank here")
    u.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help="also run cache-dit's Ulysses (sync, async, async + torch.compile) on the same model "
                        "(default: when cache-dit is installed)")
    u.add_argument("--ceiling", action="store_true",
                   help="also run DEGREE serial processes side by side: the efficiency this machine allows any split "
                        "(shared caches and memory bandwidth)")
    u.add_argument("--write", metavar="FILE", nargs="?", const="docs/BENCHMARKS.md", default=None,
                   help="update the Ulysses section of FILE (default docs/BENCHMARKS.md)")
    u.add_argument("--json", action="store_true")
    v = bsub.add_parser("vae", help="full-size FLUX VAE decode: one process vs spatial_degree over Gloo processes",
                        formatter_class=HelpFormatter)
    v.add_argument("--degree", type=_at_least(1), default=2)
    v.add_argument("--height", type=_at_least(1), default=1024)
    v.add_argument("--width", type=_at_least(1), default=1024)
    v.add_argument("--vae", default="flux", choices=("flux", "qwen-image"))
    v.add_argument("--size", default="full", choices=("full", "tiny"))
    v.add_argument("--warmup", type=_at_least(0), default=1)
    v.add_argument("--iters", type=_at_least(1), default=1)
    v.add_argument("--float64-reference", action="store_true",
                   help="also decode in float64 and report both float32 decodes' error against it")
    v.add_argument("--write", metavar="FILE", nargs="?", const="docs/BENCHMARKS.md", default=None)
    v.add_argument("--json", action="store_true")
    from npu_dit.tools.bench_seed import TABLES

    flux, qwen = TABLES["flux"], TABLES["qwen-edit"]
    s = bsub.add_parser("seed", help="the seed's two whole-pipeline tables (FLUX.1-dev, Qwen-Image-Edit) on bench-size "
                                     "pipelines, Gloo on CPU; tables, JSON and bar charts", formatter_class=HelpFormatter)
    s.add_argument("--tables", default=",".join(TABLES), help=f"which tables, comma-separated: {', '.join(TABLES)}")
    s.add_argument("--columns", default=None, metavar="KEY,...",
                   help="only these columns; default: all. flux: " + ", ".join(c.key for c in flux.columns)
                        + "; qwen-edit: " + ", ".join(c.key for c in qwen.columns))
    s.add_argument("--size", default="bench", choices=("bench", "tiny"), help="the offline pipelines' size")
    s.add_argument("--flux-resolution", type=_image_size, default=None, metavar="HxW",
                   help=f"default {flux.height}x{flux.width}")
    s.add_argument("--flux-steps", type=_at_least(1), default=None, help=f"default {flux.steps}")
    s.add_argument("--qwen-resolution", type=_image_size, default=None, metavar="HxW",
                   help=f"Qwen-Image-Edit's output, default {qwen.height}x{qwen.width} (the pipeline always encodes "
                        f"its input image at 1024x1024)")
    s.add_argument("--qwen-steps", type=_at_least(1), default=None,
                   help=f"default {qwen.steps} (true CFG: two transformer calls per step)")
    s.add_argument("--warmup", type=_at_least(0), default=1, help="untimed generations before the timed one (they compile)")
    s.add_argument("--out", metavar="DIR", default="bench-seed",
                   help="write DIR/seed-tables.md, DIR/seed-tables.json and DIR/seed-TABLE.png here")
    s.add_argument("--write", metavar="FILE", nargs="?", const="docs/BENCHMARKS.md", default=None,
                   help="also update the seed section of FILE (default docs/BENCHMARKS.md), charts beside it")
    s.add_argument("--from-json", metavar="FILE", default=None,
                   help="redraw the tables and charts from a saved seed-tables.json instead of running")
    s.add_argument("--json", action="store_true")
    from npu_dit.tools.bench_exactness import COLUMNS

    e = bsub.add_parser("exactness", help="every seed-table column, TP-2, VAE parallel and the cache on each seed model's "
                                          "tiny pipeline: the image against the 1-rank image (fresh generate runs)",
                        formatter_class=HelpFormatter)
    e.add_argument("--models", default="all", metavar="NAME,...", help="comma-separated seed models; default: all six")
    e.add_argument("--columns", default=None, metavar="KEY,...",
                   help="only these columns (their references run too); default: all. " + ", ".join(c.key for c in COLUMNS))
    e.add_argument("--height", type=_at_least(1), default=128)
    e.add_argument("--width", type=_at_least(1), default=128)
    e.add_argument("--steps", type=_at_least(1), default=4, help="denoising steps (the cached columns cache the steps after the warm-up)")
    e.add_argument("--write", metavar="FILE", nargs="?", const="docs/BENCHMARKS.md", default=None)
    e.add_argument("--json", action="store_true")
    d = bsub.add_parser("dits", help="every diffusers DiT at its test's tiny config: does Ulysses shard it, and is it "
                                     "exact against eager (one fresh Gloo run per model)", formatter_class=HelpFormatter)
    d.add_argument("--models", default="all", metavar="NAME,...",
                   help="comma-separated short or class names (Flux, WanTransformer3DModel); default: all")
    d.add_argument("--world", type=_at_least(1), default=2, help="ranks = ulysses_degree")
    d.add_argument("--timeout", type=_positive_seconds, default=240.0, help="seconds per model before it is killed and recorded")
    d.add_argument("--from-json", metavar="FILE", default=None, help="print (and --write) a saved --json run instead of running")
    d.add_argument("--write", metavar="FILE", nargs="?", const="docs/BENCHMARKS.md", default=None)
    d.add_argument("--json", action="store_true", help="print the records as JSON instead of the table")
    c = bsub.add_parser("cache", help="28-step denoising with DBCache/TaylorSeer/steps-mask configs vs no cache",
                        formatter_class=HelpFormatter)
    c.add_argument("--sizes", default="tiny,bench-deep", help="FLUX configs to run, comma-separated")
    c.add_argument("--steps", type=_at_least(1), default=28)
    c.add_argument("--threshold-f1", type=float, default=0.42, help="residual_diff_threshold of the F1B0 configs")
    c.add_argument("--threshold-f8", type=float, default=0.5, help="residual_diff_threshold of the F8B0 configs")
    c.add_argument("--compiles", default="bench-deep", metavar="SIZE",
                   help="FLUX config for the Inductor compile count over three shapes ('none' to skip)")
    c.add_argument("--write", metavar="FILE", nargs="?", const="docs/BENCHMARKS.md", default=None)
    c.add_argument("--json", action="store_true")
    show_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            return _models()
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "generate":
            from npu_dit.tools import generate

            return generate.main(args)
        if args.command == "plan":
            from npu_dit.tools import plan

            return plan.main(args)
        if args.command == "bench":
            return _bench(args, argv)
    except ValueError as exc:
        print(f"npu-dit: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _models() -> int:
    for spec in MODELS.values():
        cfg = "true CFG" if spec.true_cfg else "no true CFG"
        images = f", up to {spec.max_input_images} input image(s)" if spec.max_input_images else ""
        print(f"{spec.name:<32} {spec.transformer_cls:<30} {spec.default_steps:>3} steps, {cfg}{images}  [{spec.hf_repo}]")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from npu_dit.models.text_encoders import TEXT_ENCODERS
    from npu_dit.tools.inspect_model import format_report, format_text_encoder_report, inspect_model, inspect_text_encoder

    if args.model in TEXT_ENCODERS:
        report = inspect_text_encoder(args.model, size=args.size, prompt_len=args.prompt_len or 512,
                                      dtype=DTYPES[args.dtype], options=_collect_options(args), quiet=args.quiet or args.json)
        print(json.dumps(report, indent=1, default=str) if args.json else format_text_encoder_report(report))
        return 0

    if args.vae is not None or args.spatial_degree is not None:
        from npu_dit.tools.inspect_vae import format_vae_report, inspect_vae

        report = inspect_vae(args.model, fn=args.vae or "decode", height=args.height, width=args.width,
                             size=args.size, dtype=DTYPES[args.dtype], options=_collect_options(args))
        print(json.dumps(report, indent=1, default=str) if args.json else format_vae_report(report))
        return 0

    report = inspect_model(
        args.model,
        size=args.size,
        height=args.height,
        width=args.width,
        prompt_len=args.prompt_len,
        input_images=args.input_image,
        batch=args.batch,
        dtype=DTYPES[args.dtype],
        options=_collect_options(args),
        dump_dir=args.dump,
        quiet=args.quiet or args.json,
    )
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_report(report))
    return 0


def _bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    from npu_dit.tools.bench import bench_ulysses, format_table, write_section

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k))
    if args.bench == "cache":
        return _bench_cache(args, argv, log)
    if args.bench == "vae":
        return _bench_vae(args, argv, log)
    if args.bench == "seed":
        return _bench_seed(args, argv, log)
    if args.bench == "exactness":
        return _bench_exactness(args, argv, log)
    if args.bench == "dits":
        return _bench_dits(args, argv, log)
    results = bench_ulysses(
        degree=args.degree, height=args.height, width=args.width, prompt_len=args.prompt_len,
        warmup=args.warmup, iters=args.iters, runs=args.runs, inner_compiler=args.inner_compiler,
        profile_dir=args.profile,
        peer=args.peer, ceiling=args.ceiling, log=log,
    )
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results))
    if args.write:
        command = "npu-dit " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(args.write, command, results)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


def _bench_vae(args: argparse.Namespace, argv: list[str] | None, log) -> int:
    from npu_dit.tools.bench_vae import bench_vae, format_vae_table, write_vae_section

    results = bench_vae(degree=args.degree, height=args.height, width=args.width, vae=args.vae, size=args.size,
                        warmup=args.warmup, iters=args.iters, float64_reference=args.float64_reference, log=log)
    print(json.dumps(results, indent=1) if args.json else format_vae_table(results))
    if args.write:
        write_vae_section(args.write, "npu-dit " + " ".join(argv if argv is not None else sys.argv[1:]), results)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


def _bench_seed(args: argparse.Namespace, argv: list[str] | None, log) -> int:
    from npu_dit.tools import bench_seed

    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        command = results.pop("command", "(unknown)")
    else:
        command = "npu-dit " + " ".join(argv if argv is not None else sys.argv[1:])
        geometry = {}
        for key, resolution, steps in (("flux", args.flux_resolution, args.flux_steps),
                                       ("qwen-edit", args.qwen_resolution, args.qwen_steps)):
            table = bench_seed.TABLES[key]
            height, width = resolution or (table.height, table.width)
            geometry[key] = (height, width, steps or table.steps)
        columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
        results = bench_seed.bench_seed(tables=[t.strip() for t in args.tables.split(",") if t.strip()], columns=columns,
                                        size=args.size, geometry=geometry, warmup=args.warmup, log=log)
    print(json.dumps(results, indent=1) if args.json else bench_seed.format_markdown(results))
    for path in bench_seed.write_outputs(args.out, results, command, log=log):
        log(f"wrote {path}")
    if args.write:
        bench_seed.write_section(args.write, command, results, log=log)
        log(f"wrote {args.write}")
    return 0


def _bench_exactness(args: argparse.Namespace, argv: list[str] | None, log) -> int:
    from npu_dit.models import MODELS
    from npu_dit.tools import bench_exactness

    models = list(MODELS) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    results = bench_exactness.bench_exactness(models, columns, height=args.height, width=args.width, steps=args.steps,
                                              log=log)
    command = "npu-dit " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(results, indent=1) if args.json else bench_exactness.format_results(results, command))
    if args.write:
        bench_exactness.write(results, command, args.write)
        log(f"wrote {args.write}")
    bad = bench_exactness.failures(results)
    for line in bad:
        log(f"NOT EXACT: {line}")
    return 1 if bad else 0


def _bench_dits(args: argparse.Namespace, argv: list[str] | None, log) -> int:
    from npu_dit.models.diffusers_dits import ENTRIES
    from npu_dit.tools import dit_survey

    command = "npu-dit " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        command = results.get("command", command)
    else:
        models = [e.name for e in ENTRIES] if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
        results = dit_survey.survey(models, world=args.world, timeout=args.timeout, log=log)
        results["command"] = command
    print(json.dumps(results, indent=1) if args.json else dit_survey.format_table(results, results["command"]))
    log(dit_survey.summary(results["records"]))
    if args.write:
        dit_survey.write(results, results["command"], args.write)
        log(f"wrote {args.write}")
    return 0


def _bench_cache(args: argparse.Namespace, argv: list[str] | None, log) -> int:
    from npu_dit.tools.bench import (bench_cache, bench_cache_compiles, format_cache_table, format_compiles_table,
                                     write_cache_section)

    all_results = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        geometry = {"height": 128, "width": 128, "prompt_len": 16} if size == "tiny" else {}
        log(f"{size}:")
        results = bench_cache(size=size, steps=args.steps, threshold_f1=args.threshold_f1,
                              threshold_f8=args.threshold_f8, log=log, **geometry)
        all_results.append(results)
        print(json.dumps(results, indent=1, default=str) if args.json else format_cache_table(results))
    compiles = None
    if args.compiles != "none":
        log(f"{args.compiles}, inner_compiler=inductor over three shapes:")
        compiles = bench_cache_compiles(size=args.compiles, log=log)
        print(json.dumps(compiles, indent=1, default=str) if args.json else format_compiles_table(compiles))
    if args.write:
        command = "npu-dit " + " ".join(argv if argv is not None else sys.argv[1:])
        write_cache_section(args.write, command, all_results, compiles)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
