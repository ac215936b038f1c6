"""`npu-dit generate MODEL`: one whole pipeline run (text encoding, denoising, VAE) in one process or
under torchrun, with the transformer compiled by `npu_dit.parallelize`.

    npu-dit generate flux.1-dev --out flux.png                        # tiny random pipeline, offline
    npu-dit generate flux.1-dev --size bench --height 512 --width 512  # bench-size random pipeline
    torchrun --nproc-per-node 2 -m npu_dit.tools.cli generate flux.1-dev --ulysses 2 --async-ulysses
    npu-dit generate qwen-image-edit-lightning --weights /ckpt/Qwen-Image-Edit --lora lightning.safetensors --steps 8

Every rank runs the pipeline (same seed, same latents); rank 0 writes the PNG and prints the table of
time per stage (compiling apart: the "compile" row), peak memory per rank and the cache summary. Every
flag's value is checked before anything is built (`check_args`: one line naming the flag, exit status 2). Flag spellings follow cache-dit's
`generate.py` where it has the flag (`--model-path`, `--steps`, `--parallel-text-encoder`, ...).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import resource
import sys
import time
from typing import Any

from npu_dit.tools.help_format import HelpFormatter

import torch

from npu_dit.config import COMM_DTYPES
from npu_dit.runtime.devices import DEVICES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TINY_SIDE = 256  # default output size of the tiny pipelines (1024 with --weights)


def add_parser(sub) -> None:
    from npu_dit.models import DEFAULT_MODEL, MODELS
    from npu_dit.pipelines.tiny import SIZES

    g = sub.add_parser(
        "generate", help="run a whole pipeline (tiny offline weights by default); torchrun for several ranks",
        formatter_class=HelpFormatter,
    )
    g.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"one of: {', '.join(MODELS)}")
    g.add_argument("--weights", "--model-path", dest="weights", default=None, metavar="DIR",
                   help="a local diffusers checkpoint folder (from_pretrained); default: tiny random weights built offline")
    g.add_argument("--size", default=None, choices=SIZES,
                   help="the offline random pipeline's size: tiny (the default) or bench (the bench transformer config, "
                        "text encoders and VAE scaled down alike: `npu-dit bench seed`); not with --weights")
    g.add_argument("--lora", default=None, metavar="FILE", help="a LoRA (.safetensors) fused into the transformer before sharding, e.g. Lightning")
    g.add_argument("--lora-scale", type=float, default=1.0)
    g.add_argument("--prompt", default="a photo of a cat sitting on a red chair")
    g.add_argument("--negative-prompt", default=None, help="default: ' ' for true-CFG models, none otherwise")
    g.add_argument("--true-cfg-scale", type=float, default=None, help="default: 4.0 for true-CFG models (Qwen-Image-Edit), else 1.0 (off)")
    g.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="edit input image; repeat for several (Edit-2509: up to 3); default: a generated test image")
    g.add_argument("--height", type=int, default=None, help=f"default: {TINY_SIDE} (tiny), 1024 (--weights)")
    g.add_argument("--width", type=int, default=None, help=f"default: {TINY_SIDE} (tiny), 1024 (--weights)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps; default: the model's (28 FLUX, 50 Qwen edit, 8 Lightning)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, metavar="PATH.png",
                   help="default: MODEL.png in the current folder; PATH.npy: the float32 image array (HxWx3 in [0, 1]) "
                        "before 8-bit rounding, for exact comparisons")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="where each rank runs: auto = NPU when torch_npu imports, else CUDA, else CPU; "
                        "each rank takes its LOCAL_RANK device")
    g.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bfloat16 on NPU/CUDA, float32 on the CPU")
    g.add_argument("--ulysses", "--ulysses-degree", dest="ulysses", type=int, default=None,
                   help="Ulysses degree; default: the torchrun world size (1 without torchrun)")
    g.add_argument("--async-ulysses", "--ulysses-async", dest="async_ulysses", action="store_true",
                   help="overlap the all-to-alls with the Q/K/V projections")
    g.add_argument("--comm-dtype", default=None, metavar="|".join(COMM_DTYPES),
                   help="send Q, V and the attention output through Ulysses' all-to-alls in this dtype (K and "
                        "everything else keep the compute dtype); default: no compression")
    g.add_argument("--tp", "--tp-degree", dest="tp", type=int, default=1, help="tensor parallel degree (Ulysses takes world / tp); the full weights are released")
    g.add_argument("--cfg-parallel", "--parallel-cfg", dest="cfg_parallel", action="store_true",
                   help="true CFG: the prompt's and the negative prompt's transformer calls of each step on two halves "
                        "of the ranks at once (Ulysses / TP inside each half); needs a run with true CFG")
    g.add_argument("--text-encoder-parallel", "--parallel-text-encoder", dest="text_encoder_parallel", action="store_true",
                   help="shard the text encoders over the world (TEP: tensor parallelism of T5 / the Qwen2.5-VL language model)")
    g.add_argument("--vae-parallel", "--parallel-vae", dest="vae_parallel", action="store_true",
                   help="decode (and encode) the image in row bands across the ranks, exactly (spatial_degree = world size)")
    g.add_argument("--cache", nargs="?", const="{}", default=None, metavar="PRESET|JSON",
                   help="hybrid cache: a preset FnBm (e.g. F1B0), or JSON options; bare --cache: cache-dit's defaults (F8B0)")
    g.add_argument("--attention-backend", default="auto", help="auto, sdpa, npu_fia, npu_fa, flash, cudnn, efficient, math")
    g.add_argument("--compile", dest="inner_compiler", nargs="?", const="inductor", default="eager",
                   choices=("eager", "inductor", "npugraph_ex"), help="inner compiler for the rewritten graph; bare --compile: inductor")
    g.add_argument("--warmup", type=int, default=0, help="untimed generations before the timed one (compiles happen there)")
    g.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="timed generations (default 1); the report keeps the fastest: its stages and steps, and each "
                        "rank's least CPU seconds (steady timings on a busy machine)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--quiet", action="store_true",
                   help="print only the final tables: no compile lines, progress bars or library warnings, on any rank")


PIXEL_MULTIPLE = 16  # every seed pipeline: the VAE downsamples 8x, the transformer packs 2x2 latents


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_args(args: argparse.Namespace, spec, world: int) -> None:
    """Every flag's value, before anything is built: a ValueError naming the flag, the value and what
    is allowed (the CLI prints it on one line and exits with status 2)."""
    from npu_dit.pipelines import check_weights_dir
    from npu_dit.pipelines.lora import check_lora_file

    for flag, value in (("--steps", args.steps), ("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % PIXEL_MULTIPLE:
            lower = max(PIXEL_MULTIPLE, value // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
            raise ValueError(
                f"{flag} {value}: must be a multiple of {PIXEL_MULTIPLE} for {spec.name} (the VAE downsamples 8x and "
                f"the transformer packs 2x2 latents), e.g. {lower} or {lower + PIXEL_MULTIPLE}"
            )
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: must be 0 or more")
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat}: must be 1 or more (the number of timed generations)")
    for flag, value in (("--true-cfg-scale", args.true_cfg_scale), ("--lora-scale", args.lora_scale)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} {value}: must be a finite number")
    if args.cfg_parallel:
        negative, scale = true_cfg_settings(args, spec)
        if negative is None or scale <= 1:
            why = "no negative prompt" if negative is None else f"true_cfg_scale {scale:g} <= 1"
            raise ValueError(
                f"--cfg-parallel: this {spec.name} run calls the transformer once per step ({why}), so there is no "
                f"second CFG branch to run in parallel; drop --cfg-parallel, or give --negative-prompt TEXT and "
                f"--true-cfg-scale above 1"
            )
        if world % 2:
            raise ValueError(f"--cfg-parallel: the two CFG branches need an even number of processes, got {world}; "
                             f"launch with torchrun --nproc-per-node {max(2, world + 1)}")
    branches = 2 if args.cfg_parallel else 1
    if args.tp < 1 or world % (args.tp * branches):
        per = " x 2 (--cfg-parallel)" if branches > 1 else ""
        raise ValueError(f"--tp {args.tp}: {'--tp' + per + ' ' if per else ''}must divide the number of processes, "
                         f"{world} (allowed: {_divisors(world // branches)})"
                         + (f"; for --tp {args.tp} launch with torchrun --nproc-per-node {args.tp * branches}"
                            if args.tp * branches > world else ""))
    if args.ulysses is not None and (args.ulysses < 1 or args.ulysses * args.tp * branches != world):
        allowed = world // (args.tp * branches)
        per = " x 2 (--cfg-parallel)" if branches > 1 else ""
        raise ValueError(f"--ulysses {args.ulysses}: --ulysses x --tp{per} must equal the number of processes, {world}; "
                         f"with --tp {args.tp} that is --ulysses {allowed} (the default when --ulysses is left out)")
    if args.comm_dtype is not None and args.comm_dtype not in COMM_DTYPES:
        raise ValueError(f"--comm-dtype {args.comm_dtype}: must be one of {', '.join(COMM_DTYPES)} (Q, V and the attention "
                         f"output in FP8 through the all-to-alls); leave it out for no compression")
    if args.comm_dtype is not None and (args.ulysses or world // (args.tp * branches)) < 2:
        raise ValueError(f"--comm-dtype {args.comm_dtype}: compresses Ulysses' all-to-alls, and this run has none "
                         f"(Ulysses degree 1); launch with torchrun --nproc-per-node 2 or more, or leave --comm-dtype out")
    out = args.out or f"{spec.name}.png"
    if os.path.splitext(out)[1].lower() not in (".png", ".npy"):
        raise ValueError(f"--out {out}: must end in .png (the image) or .npy (the float32 array)")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first or write elsewhere")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: the folder {folder} is not writable")
    if args.weights is not None:
        check_weights_dir(args.weights, spec)
    if args.lora is not None:
        try:
            check_lora_file(args.lora)
        except ValueError as exc:
            raise ValueError(f"--lora {args.lora}: {exc}") from None
    images = args.image or []
    if images and not spec.max_input_images:
        raise ValueError(f"--image: {spec.name} is a text-to-image model; --image is for the edit models")
    if len(images) > spec.max_input_images:
        raise ValueError(f"--image: {spec.name} takes at most {spec.max_input_images} input image(s), got {len(images)}")
    for path in images:
        from PIL import Image, UnidentifiedImageError

        try:
            Image.open(path).close()
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"--image {path}: not a readable image ({exc})") from None


def parse_cache(text: str | None) -> dict[str, Any] | None:
    """'F1B0' -> {'Fn_compute_blocks': 1, 'Bn_compute_blocks': 0}; JSON object -> dict; None -> None."""
    if text is None:
        return None
    match = re.fullmatch(r"[Ff](\d+)[Bb](\d+)", text.strip())
    if match:
        return {"Fn_compute_blocks": int(match[1]), "Bn_compute_blocks": int(match[2])}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"--cache {text!r}: expected a preset such as F1B0 (Fn/Bn compute blocks) or a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError(f"--cache {text!r}: expected a JSON object of cache options")
    return value


def _quiet_libraries() -> None:
    """--quiet, on every rank: no library warnings, no progress bars (transformers' first, so the
    warnings diffusers' imports trigger in it are already silenced)."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _quiet_library_logs() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


def _test_image(index: int, side: int = 256):
    """A deterministic RGB gradient (the default edit input when no --image is given)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([(x * 255 // side + 80 * index) % 256, y * 255 // side, ((x + y) * 127 // side) % 256], axis=-1)
    return Image.fromarray(rgb.astype("uint8"), "RGB")


def _timed(fn, totals: dict[str, float], stage: str, cpu: dict[str, float], calls: list[float] | None = None):
    """Time `fn` into `totals[stage]`, less the compiles that ran inside it (they go to "compile");
    its CPU seconds (compiles included) into `cpu[stage]`; each call's seconds into `calls` when given."""
    from npu_dit.progress import compile_seconds

    def wrapper(*args, **kwargs):
        start, start_cpu, compiled_before = time.perf_counter(), time.process_time(), compile_seconds()
        try:
            return fn(*args, **kwargs)
        finally:
            compiling = compile_seconds() - compiled_before
            seconds = time.perf_counter() - start - compiling
            totals["compile"] += compiling
            totals[stage] += seconds
            cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - start_cpu
            if calls is not None:
                calls.append(seconds)

    return wrapper


class _StepClock:
    """The transformer's wall seconds per denoising step: its calls' times (`calls`, compiles left out),
    cut at each step's end by the pipeline's own `callback_on_step_end` where it has one (so the
    pipeline's CFG combination and scheduler step are outside), else in equal runs of calls."""

    def __init__(self, pipe) -> None:
        self.calls: list[float] = []
        self.ends: list[int] = []  # len(calls) at each step's end
        self.hooked = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters

    def reset(self) -> None:
        self.calls.clear()
        self.ends.clear()

    def step_end(self, pipe, step, timestep, tensors):
        self.ends.append(len(self.calls))
        return tensors

    def pipe_kwargs(self) -> dict[str, Any]:
        return {"callback_on_step_end": self.step_end} if self.hooked else {}

    def report(self, steps: int) -> dict[str, Any]:
        ends = self.ends if self.ends and self.ends[-1] == len(self.calls) else []
        if not ends and steps and len(self.calls) % steps == 0:
            ends = [len(self.calls) // steps * (i + 1) for i in range(steps)]
        per_step = [sum(self.calls[a:b]) for a, b in zip([0, *ends], ends)]
        total = sum(self.calls)
        return {
            "total": total, "calls": len(self.calls), "steps": len(per_step) or steps,
            "per_step": total / (len(per_step) or steps or 1),
            # beyond the first step (where CFG parallelism learns the pairing of a first generation)
            "per_step_after_first": sum(per_step[1:]) / (len(per_step) - 1) if len(per_step) > 1 else None,
            "steps_s": per_step,
        }


def _record_tokens(fn, seen: list[list[int]]):
    """Note each distinct (image tokens, text tokens) of the transformer's calls (true CFG: two)."""
    def wrapper(*args, **kwargs):
        image, text = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
        if image is not None and text is not None and [image.shape[1], text.shape[1]] not in seen:
            seen.append([image.shape[1], text.shape[1]])
        return fn(*args, **kwargs)

    return wrapper


def _peak_memory_mib(device: torch.device) -> dict[str, float]:
    from npu_dit.runtime.devices import peak_memory_mib

    peak = {"host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    device_mib = peak_memory_mib(device)
    if device_mib is not None:
        peak["device_mib"] = device_mib
    return peak


def true_cfg_settings(args: argparse.Namespace, spec) -> tuple[str | None, float]:
    """(negative prompt, true_cfg_scale) of the run: the pipelines call the transformer twice per step
    when both a negative prompt is given and the scale is above 1."""
    negative = args.negative_prompt if args.negative_prompt is not None else (" " if spec.true_cfg else None)
    scale = args.true_cfg_scale if args.true_cfg_scale is not None else (4.0 if spec.true_cfg else 1.0)
    return negative, scale


def call_kwargs(args: argparse.Namespace, spec, steps: int) -> dict[str, Any]:
    from PIL import Image

    side = 1024 if args.weights else TINY_SIDE
    kwargs: dict[str, Any] = dict(
        prompt=args.prompt, height=args.height or side, width=args.width or side,
        num_inference_steps=steps, generator=torch.Generator().manual_seed(args.seed), output_type="pil",
    )
    images = args.image or []
    if images and not spec.max_input_images:
        raise ValueError(f"{spec.name} is a text-to-image model; --image is for the edit models")
    if len(images) > spec.max_input_images:
        raise ValueError(f"{spec.name} takes at most {spec.max_input_images} input image(s), got {len(images)}")
    if spec.max_input_images:
        loaded = [Image.open(p).convert("RGB") for p in images] or [_test_image(0)]
        kwargs["image"] = loaded if spec.max_input_images > 1 else loaded[0]
    negative, scale = true_cfg_settings(args, spec)
    if spec.transformer_cls != "FluxTransformer2DModel" or negative is not None:
        kwargs["true_cfg_scale"] = scale
    if negative is not None:
        kwargs["negative_prompt"] = negative
    return kwargs


def run(args: argparse.Namespace) -> dict[str, Any]:
    import npu_dit
    from npu_dit.models import get_model
    from npu_dit.pipeline_parallel import _check_flags, build_options
    from npu_dit.pipelines import load_pipeline

    spec = get_model(args.model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cache = parse_cache(args.cache)
    steps = args.steps or spec.default_steps
    settings = dict(ulysses_degree=args.ulysses, tp_degree=args.tp, cfg_parallel=args.cfg_parallel,
                    async_ulysses=args.async_ulysses,
                    attention_backend=args.attention_backend, cache=cache, inner_compiler=args.inner_compiler,
                    comm_dtype=args.comm_dtype)
    # every option is checked before the (possibly large) pipeline is loaded
    check_args(args, spec, world)
    _check_flags(args.tp, args.text_encoder_parallel, args.vae_parallel)
    build_options(num_inference_steps=steps, dump_dir=None, world_size=world, **settings)
    from npu_dit.runtime.devices import default_dtype, resolve_device

    device = resolve_device(args.device)  # this rank's LOCAL_RANK device; a UserError if it is not there
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if args.quiet:
        _quiet_libraries()
        from npu_dit.progress import set_verbose

        set_verbose(False)
    elif int(os.environ.get("RANK", "0")) != 0:
        _quiet_library_logs()  # rank 0 shows the libraries' messages once; the others would repeat them
    if world > 1 and not torch.distributed.is_initialized():
        from npu_dit.runtime.dist import ensure_process_group

        # HCCL / NCCL / Gloo for the device, and the CPU Gloo group for host decisions beside it
        ensure_process_group(world, device=device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    pipe = load_pipeline(spec, weights=args.weights, size=args.size, lora=args.lora, lora_scale=args.lora_scale, dtype=dtype, seed=args.seed)
    pipe.set_progress_bar_config(disable=args.quiet or rank != 0)
    npu_dit.parallelize(pipe, text_encoder_parallel=args.text_encoder_parallel, vae_parallel=args.vae_parallel,
                        num_inference_steps=steps, device=device, **settings)
    totals = {"text encoding": 0.0, "denoising": 0.0, "VAE": 0.0, "compile": 0.0}
    cpu: dict[str, float] = {}
    pipe.encode_prompt = _timed(pipe.encode_prompt, totals, "text encoding", cpu)
    pipe.vae.decode = _timed(pipe.vae.decode, totals, "VAE", cpu)
    pipe.vae.encode = _timed(pipe.vae.encode, totals, "VAE", cpu)
    clock = _StepClock(pipe)
    pipe.transformer.forward = _timed(pipe.transformer.forward, totals, "denoising", cpu, clock.calls)
    tokens: list[list[int]] = []
    pipe.transformer.forward = _record_tokens(pipe.transformer.forward, tokens)
    kwargs = call_kwargs(args, spec, steps)
    out = args.out or f"{spec.name}.png"
    if out.lower().endswith(".npy"):
        kwargs["output_type"] = "np"
    for _ in range(args.warmup):
        pipe(**{**kwargs, "generator": torch.Generator().manual_seed(args.seed)}, **clock.pipe_kwargs())
    warmup_compile_s = totals["compile"]
    runs: list[tuple[dict[str, float], float, dict[str, float], dict[str, Any]]] = []
    for repeat in range(args.repeat):
        for stage in totals:
            totals[stage] = 0.0
        cpu.clear()
        clock.reset()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank starts each timed run together
        start, start_cpu = time.perf_counter(), time.process_time()
        # the same seed each time: every repeat makes the same image
        timed = {**kwargs, "generator": torch.Generator().manual_seed(args.seed)} if repeat else kwargs
        image = pipe(**timed, **clock.pipe_kwargs()).images[0]
        total = time.perf_counter() - start
        cpu_s = time.process_time() - start_cpu
        # denoising = the transformer calls; the scheduler steps and latent packing go to "other"
        runs.append(({**totals, "other": max(0.0, total - sum(totals.values())), "total": total}, cpu_s, dict(cpu),
                     clock.report(steps)))
    # the fastest run's stages and steps; this process's least CPU seconds (with more ranks than cores,
    # wall time exceeds them)
    stages, _, _, transformer_s = min(runs, key=lambda run: run[0]["total"])
    _, cpu_s, cpu_per_stage, _ = min(runs, key=lambda run: run[1])
    memory = {**_peak_memory_mib(device), "cpu_s": cpu_s, "cpu_s_per_stage": cpu_per_stage}
    if torch.distributed.is_initialized():
        from npu_dit.runtime import planes

        gathered = planes.host_all_gather_object(memory, "peak memory")  # host information: the host plane
    else:
        gathered = [memory]
    if rank == 0:
        if out.lower().endswith(".npy"):
            import numpy as np

            np.save(out, np.asarray(image, dtype=np.float32))
        else:
            image.save(out)
    from npu_dit.runtime.cache import latest

    controller = latest() if cache is not None else None
    patterns = ({str(branch): controller.pattern(branch=branch) for branch in controller.summary()["branches"]}
                if controller is not None else None)
    if args.cfg_parallel and controller is not None:
        from npu_dit.runtime import planes

        # each CFG branch's ranks hold that branch's cache (one call per step): the first rank of each
        # branch reports it, labelled with the branch as one process labels its two
        per_rank = planes.host_all_gather_object(controller.pattern(branch=0), "cache patterns")
        patterns = {str(b): per_rank[b * world // 2] for b in range(2)}
    return {
        "model": spec.name, "weights": args.weights or f"{args.size or 'tiny'} random (offline)", "world_size": world,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "options": build_options(num_inference_steps=steps, dump_dir=None, world_size=world, **settings),
        "height": kwargs["height"], "width": kwargs["width"], "steps": steps, "stages_s": stages,
        # the wall seconds inside the transformer's calls on this rank (the denoising stage), per step
        "transformer_s": transformer_s,
        "transformer_tokens": tokens,
        "peak_memory_per_rank": gathered, "out": os.path.abspath(out), "rank": rank,
        "cache_summary": controller.format_summary() if controller is not None else None,
        "cache_patterns": patterns,
        "compiled_graphs": _compiled_graphs(),
        "warmup_runs": args.warmup, "warmup_compile_s": warmup_compile_s,
        "timed_runs": args.repeat, "timed_totals_s": [run[0]["total"] for run in runs],
        "text_encoder_parallel": args.text_encoder_parallel,
        # CFG parallelism: steps whose two branches ran at once (the first step learns the pairing)
        "cfg_parallel_steps": getattr(getattr(pipe.transformer, "pairing", None), "parallel_steps", None),
    }


def _compiled_graphs() -> list[dict[str, Any]]:
    """What the backend did with each graph it compiled in this process (kept: the latest 16)."""
    from npu_dit.backend import RECORDS

    return [{"tag": r.tag, "fell_back": r.report.fell_back, "reason": r.report.fallback_reason,
             "counts": dict(r.report.counts)} for r in RECORDS]


def format_tokens(pairs: list[list[int]]) -> str:
    """[[4352, 98], [4352, 35]] -> '4352 image + 98 / 35 text' (true CFG: the negative prompt's length)."""
    if len({image for image, _ in pairs}) > 1:
        return "; ".join(f"{image} image + {text} text" for image, text in pairs)
    return f"{pairs[0][0]} image + {' / '.join(str(text) for _, text in pairs)} text"


def format_report(r: dict[str, Any]) -> str:
    o = r["options"]
    lines = [
        f"{r['model']}  ({r['weights']}), {r['height']}x{r['width']}, {r['steps']} steps, {r['world_size']} process(es)"
        f"{', ' + r['device'] + ' ' + r['dtype'] if 'device' in r else ''}",
        f"  {'cfg_degree=' + str(o['cfg_degree']) + ' ' if o.get('cfg_degree', 1) > 1 else ''}ulysses_degree={o['ulysses_degree']} tp_degree={o['tp_degree']} text_encoder_parallel={r.get('text_encoder_parallel', False)} async_ulysses={o['async_ulysses']} attention_backend={o['attention_backend']} "
        f"inner_compiler={o['inner_compiler']} cache={o.get('cache')}"
        f"{' comm_dtype=' + o['comm_dtype'] if o.get('comm_dtype') else ''}",
        *([f"  tokens per transformer call: {format_tokens(r['transformer_tokens'])}"] if r.get("transformer_tokens") else []),
        "",
        "| stage | seconds | share |",
        "| --- | ---: | ---: |",
    ]
    total = r["stages_s"]["total"]
    for stage, seconds in r["stages_s"].items():
        share = f"{100 * seconds / total:.0f} %" if total and stage != "total" else ""
        lines.append(f"| {stage} | {seconds:.3f} | {share} |")
    t = r.get("transformer_s")
    if t and t["calls"]:
        lines.append(f"| transformer per step ({t['calls']} calls, {t['steps']} steps) | {t['per_step']:.3f} | |")
        if t["per_step_after_first"] is not None:
            lines.append(f"| transformer per step after the first | {t['per_step_after_first']:.3f} | |")
    if not r["warmup_runs"]:
        lines.append("(first run: it compiles; use --warmup 1 for steady-state timings)")
    elif r.get("warmup_compile_s"):
        lines.append(f"(compiled in the untimed warm-up run: {r['warmup_compile_s']:.3f} s)")
    runs = r.get("timed_runs", 1)
    if runs > 1:
        lines.append(f"(the fastest of {runs} timed runs: {', '.join(f'{t:.3f}' for t in r['timed_totals_s'])} s)")
    cpu_label = "CPU s (timed run)" if runs == 1 else f"CPU s (least of {runs})"
    lines += ["", f"| rank | peak host RSS (MiB) | peak device memory (MiB) | {cpu_label} |", "| ---: | ---: | ---: | ---: |"]
    for rank, mem in enumerate(r["peak_memory_per_rank"]):
        device = f"{mem['device_mib']:.0f}" if "device_mib" in mem else "-"
        lines.append(f"| {rank} | {mem['host_rss_mib']:.0f} | {device} | {mem['cpu_s']:.2f} |")
    if r["cache_summary"]:
        lines += ["", r["cache_summary"]]
    lines += ["", f"wrote {r['out']}"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = run(args)
    if report["rank"] == 0:
        print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    if torch.distributed.is_initialized():
        # leave together and close the group: a rank exiting while a peer's Gloo threads still hold
        # the connection can abort that peer at exit ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
