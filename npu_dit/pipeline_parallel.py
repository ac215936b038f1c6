"""One call for a whole diffusers pipeline, `npu_dit.parallelize(pipe, ulysses_degree=2, cache={...})`.

Every option is validated here, before anything is compiled (a `ValueError` at this call, not a
`BackendCompilerFailed` at the first denoising step). The transformer is then wrapped in
`torch.compile(..., backend="npu_dit", dynamic=True)` over the torchrun world (compilation itself
happens on the first call, as always with torch.compile). The pipeline's `__call__` is wrapped so the
hybrid cache gets the real step count of each generation (`num_inference_steps`), which decides its
steps mask; a different step count on a later call recompiles with the new count.

`async_ulysses=True` with the default Ulysses degree at 1 (one process, or a world all on the TP axis)
is a no-op, so one script runs under `python` and under `torchrun`; an explicit `ulysses_degree=1`
with it is refused.

`tp_degree` shards the transformer's linears over that many ranks (Ulysses takes the rest of the world
by default: ulysses_degree = world // tp_degree). `text_encoder_parallel=True` (TEP) compiles each text
encoder with `tp_degree` = the world size: T5 whole, a vision-language encoder's language model
(`text_encoder.model.language_model`; its vision tower stays replicated). Tensor parallelism releases
the full weights it shards (`release_weights`, runtime/weights.py).

`device="auto"|"cpu"|"cuda"|"npu"` moves the pipeline to this rank's device first (its LOCAL_RANK
accelerator; auto = NPU when torch_npu imports, else CUDA, else CPU: `runtime/devices.py`); the
process groups then follow the model's device (HCCL / NCCL / Gloo, plus the CPU Gloo host group).
The default, None, leaves the pipeline where it is.

`vae_parallel=True` compiles the VAE's `decode` and `encode` (the edit pipelines encode their input
images) with `options={"spatial_degree": world size}`: each rank decodes a band of rows, exactly (see
`passes/spatial.py`); with one process there is nothing to shard and the VAE is left as it is.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping

import torch

from npu_dit.config import CacheConfig, CompileConfig

_STATE_ATTR = "_npu_dit_parallel"


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_flags(tp_degree: Any, text_encoder_parallel: Any, vae_parallel: Any) -> None:
    for key, value in (("text_encoder_parallel", text_encoder_parallel), ("vae_parallel", vae_parallel)):
        if not isinstance(value, bool):
            raise ValueError(f"parallelize: {key} must be True or False, got {value!r}")

DEFAULT_WARMUP_STEPS = CacheConfig.max_warmup_steps


def short_run_warmup(steps: int) -> int:
    """Warmup steps for a run no longer than cache-dit's default warmup: a quarter of it, at least 1."""
    return max(1, steps // 4)


def build_options(
    *,
    ulysses_degree: int | None,
    tp_degree: int,
    cfg_parallel: bool = False,
    async_ulysses: bool,
    attention_backend: str,
    cache: Mapping[str, Any] | None,
    inner_compiler: str,
    num_inference_steps: int | None,
    dump_dir: str | None,
    world_size: int,
    comm_dtype: str | None = None,
) -> dict[str, Any]:
    """The backend options for the transformer, validated (ValueError) by CompileConfig."""
    if not isinstance(cfg_parallel, bool):
        raise ValueError(f"parallelize: cfg_parallel must be True or False, got {cfg_parallel!r}")
    cfg_degree = 2 if cfg_parallel else 1
    if ulysses_degree is None:  # the world, less the tensor-parallel and CFG axes
        tp = tp_degree if isinstance(tp_degree, int) and not isinstance(tp_degree, bool) and tp_degree > 0 else 1
        rest = tp * cfg_degree
        ulysses_degree = max(1, world_size // rest) if world_size % rest == 0 and world_size >= rest else world_size
        if ulysses_degree == 1 and async_ulysses is True:
            # one process (or a world all on the TP axis): no all-to-all to overlap, so the same script
            # runs with `python` and with `torchrun`; an explicit ulysses_degree=1 is still refused
            async_ulysses = False
        if ulysses_degree == 1:
            comm_dtype = None  # likewise: no all-to-all to compress
    options: dict[str, Any] = {
        "ulysses_degree": ulysses_degree, "tp_degree": tp_degree, "async_ulysses": async_ulysses,
        "attention_backend": attention_backend, "inner_compiler": inner_compiler,
    }
    if cfg_parallel:
        options["cfg_degree"] = cfg_degree
    if dump_dir is not None:
        options["dump_dir"] = dump_dir
    if comm_dtype is not None:
        options["comm_dtype"] = comm_dtype
    if cache is not None:
        if not isinstance(cache, Mapping):
            raise ValueError(
                f"parallelize: cache must be a dict of cache settings, got {cache!r}; for example "
                f"{{'Fn_compute_blocks': 1, 'residual_diff_threshold': 0.08}}"
            )
        cache = dict(cache)
        if num_inference_steps is not None and cache.get("num_inference_steps") is None:
            cache["num_inference_steps"] = num_inference_steps
        steps = cache.get("num_inference_steps")
        if "max_warmup_steps" not in cache and isinstance(steps, int) and steps <= DEFAULT_WARMUP_STEPS:
            # cache-dit's 8 warmup steps would cover a short (Lightning, 4/8-step) run whole: fit them
            cache["max_warmup_steps"] = short_run_warmup(steps)
        options["cache"] = cache
    cfg = CompileConfig.from_options(options)
    if cfg.world_degree > 1 and cfg.world_degree != world_size and cfg.cfg_degree > 1:
        if world_size % (2 * cfg.tp_degree):
            fix = f"launch an even number of processes, a multiple of 2 x tp_degree = {2 * cfg.tp_degree}"
        else:
            fix = f"set ulysses_degree={world_size // (2 * cfg.tp_degree)} (the default: the world / (2 x tp_degree))"
        raise ValueError(
            f"parallelize: cfg_parallel (2 branches) x ulysses_degree x tp_degree = 2 x {cfg.ulysses_degree} x "
            f"{cfg.tp_degree} = {cfg.world_degree} but this run has {world_size} process(es); launch with "
            f"torchrun --nproc-per-node {cfg.world_degree}, or {fix}"
        )
    if cfg.world_degree > 1 and cfg.world_degree != world_size:
        if world_size % cfg.tp_degree:
            divisors = ", ".join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)
            fix = f"set tp_degree to a divisor of {world_size} ({divisors})"
        else:
            fix = f"set ulysses_degree={world_size // cfg.tp_degree} (the default: the world / tp_degree)"
        raise ValueError(
            f"parallelize: ulysses_degree x tp_degree = {cfg.ulysses_degree} x {cfg.tp_degree} = {cfg.world_degree} "
            f"but this run has {world_size} process(es); launch with torchrun --nproc-per-node {cfg.world_degree}, "
            f"or {fix}"
        )
    return options


def parallelize(
    pipe,
    *,
    ulysses_degree: int | None = None,
    tp_degree: int = 1,
    async_ulysses: bool = False,
    attention_backend: str = "auto",
    cache: Mapping[str, Any] | None = None,
    text_encoder_parallel: bool = False,
    vae_parallel: bool = False,
    inner_compiler: str = "eager",
    num_inference_steps: int | None = None,
    dump_dir: str | None = None,
    device: str | torch.device | None = None,
    cfg_parallel: bool = False,
    comm_dtype: str | None = None,
):
    """Compile `pipe.transformer` with the npu_dit backend over the torchrun world; returns `pipe`.

    `cfg_parallel=True` splits the world into two branches (the prompt's and the negative prompt's
    transformer calls of each true-CFG step run at once, `runtime/cfg_parallel.py`); Ulysses and TP
    then work inside each branch (ulysses_degree defaults to world / (2 x tp_degree)).

    `ulysses_degree` defaults to the world size (1 without torchrun). `num_inference_steps` is only a
    first guess for the cache: each call's own `num_inference_steps` replaces it. `device` (auto, cpu,
    cuda, npu) moves the pipeline to this rank's device first; None leaves it where it is.
    `comm_dtype="float8_e4m3fn"` sends Q, V and the attention output through Ulysses' all-to-alls in FP8.
    """
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(
            f"parallelize: {type(pipe).__name__} has no `transformer` module; pass a diffusers DiT pipeline "
            f"(FluxPipeline, QwenImagePipeline, QwenImageEditPipeline, ...)"
        )
    _check_flags(tp_degree, text_encoder_parallel, vae_parallel)
    if getattr(pipe, _STATE_ATTR, None) is not None:
        raise ValueError("parallelize: this pipeline was already parallelized; build a fresh pipeline to change options")
    settings = dict(
        ulysses_degree=ulysses_degree, tp_degree=tp_degree, cfg_parallel=cfg_parallel, async_ulysses=async_ulysses,
        attention_backend=attention_backend, cache=cache, inner_compiler=inner_compiler, dump_dir=dump_dir,
        world_size=_world_size(), comm_dtype=comm_dtype,
    )
    steps = num_inference_steps if num_inference_steps is not None else _default_steps(pipe)
    options = build_options(num_inference_steps=steps, **settings)  # raises before anything compiles
    if device is not None:
        from npu_dit.runtime.devices import resolve_device

        target = resolve_device(device)  # a UserError naming what is missing, before anything compiles
        pipe.to(target)
    original = transformer._orig_mod if hasattr(transformer, "_orig_mod") else transformer
    state = {"original": original, "settings": settings, "steps": steps}
    setattr(pipe, _STATE_ATTR, state)
    pipe.transformer = _compiled_transformer(original, options)
    if text_encoder_parallel:
        state["text_encoders"] = _parallelize_text_encoders(pipe, settings["world_size"])
    if vae_parallel:
        parallelize_vae(pipe, settings["world_size"], inner_compiler=inner_compiler)
    _wrap_call(pipe)
    return pipe


def _compiled_transformer(original: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    compiled = torch.compile(original, backend="npu_dit", dynamic=True, options=options)
    if options.get("cfg_degree", 1) == 1:
        return compiled
    from npu_dit.runtime.cfg_parallel import CFGParallel

    return CFGParallel(compiled, ulysses_degree=options["ulysses_degree"], tp_degree=options["tp_degree"])


def _parallelize_text_encoders(pipe, world_size: int) -> list[str]:
    """TEP: the same tensor-parallel pass on every text encoder, over the whole world. A
    vision-language encoder compiles its language model (the whole model breaks into several graphs);
    its vision tower stays replicated. Returns the attribute paths compiled."""
    if world_size == 1:
        return []
    options = {"tp_degree": world_size}
    done = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if not isinstance(encoder, torch.nn.Module):
            continue
        inner = getattr(getattr(encoder, "model", None), "language_model", None)
        if isinstance(inner, torch.nn.Module):
            encoder.model.language_model = torch.compile(inner, backend="npu_dit", dynamic=True, options=options)
            done.append(f"{name}.model.language_model")
        else:
            setattr(pipe, name, torch.compile(encoder, backend="npu_dit", dynamic=True, options=options))
            done.append(name)
    return done


def parallelize_vae(pipe, world_size: int, *, inner_compiler: str = "eager") -> None:
    """`pipe.vae.decode` / `.encode` compiled with height-band spatial parallelism over the world."""
    vae = getattr(pipe, "vae", None)
    if not isinstance(vae, torch.nn.Module):
        raise ValueError(f"parallelize: vae_parallel=True but {type(pipe).__name__} has no `vae` module")
    if world_size <= 1:
        return  # one process: nothing to shard
    options = {"spatial_degree": world_size, "inner_compiler": inner_compiler}
    CompileConfig.from_options(options)
    for name in ("decode", "encode"):
        method = getattr(type(vae), name, None)
        if method is not None:
            bound = method.__get__(vae, type(vae))
            setattr(vae, name, torch.compile(bound, backend="npu_dit", dynamic=True, options=options))


def _default_steps(pipe) -> int | None:
    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    return parameter.default if parameter is not None and isinstance(parameter.default, int) else None


def _wrap_call(pipe) -> None:
    """Give each generation's step count to the cache (a subclass with the same name, per instance)."""
    base = type(pipe)

    def __call__(self, *args, **kwargs):
        state = getattr(self, _STATE_ATTR)
        if state["settings"]["cache"] is not None:
            steps = kwargs.get("num_inference_steps") or _default_steps(self)
            if steps != state["steps"]:
                options = build_options(num_inference_steps=steps, **state["settings"])
                self.transformer = _compiled_transformer(state["original"], options)
                state["steps"] = steps
            from npu_dit.runtime.cache import reset_all

            reset_all()
        if hasattr(self.transformer, "reset") and hasattr(self.transformer, "pairing"):
            self.transformer.reset()  # CFG parallelism learns each generation's pattern from its first calls
        return base.__call__(self, *args, **kwargs)

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
