"""Compile options, parsed once into validated dataclasses.

`torch.compile(model, backend="npu_dit", options={...})` hands the options dict to the backend; every
key is checked here so that a typo or a bad value is a `ValueError` naming the key, the value and what
is allowed, never a silent default. Option names follow the ecosystem: `*_degree` as in diffusers'
`ContextParallelConfig`, the cache keys as in cache-dit's `DBCacheConfig`.

Features whose passes have not landed yet are listed in `UNAVAILABLE_FEATURES`; their options are
accepted only at their defaults, so a user never believes a feature is on when it is not.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

ATTENTION_BACKENDS = ("auto", "sdpa", "npu_fia", "npu_fa", "flash", "cudnn", "efficient", "math")
INNER_COMPILERS = ("eager", "inductor", "npugraph_ex")
COMM_DTYPES = ("float8_e4m3fn",)  # Ulysses all-to-alls: Q, V and the attention output in this dtype
STEPS_MASK_PRESETS = ("slow", "medium", "fast", "ultra")
DUMP_DIR_ENV = "NPU_DIT_DUMP_DIR"

# feature name -> the option that turns it on; removed from here as each pass lands.
UNAVAILABLE_FEATURES: dict[str, str] = {}


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_int(key: str, value: Any, *, minimum: int | None = None, allow_minus_one: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"option {key!r} must be an int, got {value!r} ({_type_name(value)})")
    if allow_minus_one and value == -1:
        return value
    if minimum is not None and value < minimum:
        extra = " or -1 (no limit)" if allow_minus_one else ""
        raise ValueError(f"option {key!r} must be >= {minimum}{extra}, got {value}")
    return value


def _check_float(key: str, value: Any, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"option {key!r} must be a number, got {value!r} ({_type_name(value)})")
    if not math.isfinite(value):
        raise ValueError(f"option {key!r} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"option {key!r} must be >= {minimum}, got {value}")
    return float(value)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"option {key!r} must be True or False, got {value!r} ({_type_name(value)})")
    return value


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"option {key!r} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _reject_unknown(section: str, given: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown {section} option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """DBCache + TaylorSeer + steps mask, with cache-dit's names and defaults (F8B0, 8 warmup steps)."""

    Fn_compute_blocks: int = 8
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    taylorseer_order: int = 0
    steps_mask: str | tuple[int, ...] | None = None
    steps_mask_policy: str = "dynamic"  # "static": masked-out steps always cache
    num_inference_steps: int | None = None
    separate_cfg: bool | None = None

    @staticmethod
    def from_options(options: Mapping[str, Any]) -> "CacheConfig":
        if not isinstance(options, Mapping):
            raise ValueError(
                f"option 'cache' must be a dict of cache settings (or None), got {options!r}; "
                f"for example {{'Fn_compute_blocks': 1, 'residual_diff_threshold': 0.08}}"
            )
        names = tuple(f.name for f in dataclasses.fields(CacheConfig))
        _reject_unknown("cache", options, names)
        o = dict(options)
        kw: dict[str, Any] = {}
        if "Fn_compute_blocks" in o:
            kw["Fn_compute_blocks"] = _check_int("cache.Fn_compute_blocks", o["Fn_compute_blocks"], minimum=1)
        if "Bn_compute_blocks" in o:
            kw["Bn_compute_blocks"] = _check_int("cache.Bn_compute_blocks", o["Bn_compute_blocks"], minimum=0)
        if "residual_diff_threshold" in o:
            kw["residual_diff_threshold"] = _check_float(
                "cache.residual_diff_threshold", o["residual_diff_threshold"], minimum=0.0
            )
        if "max_warmup_steps" in o:
            kw["max_warmup_steps"] = _check_int("cache.max_warmup_steps", o["max_warmup_steps"], minimum=0)
        if "warmup_interval" in o:
            kw["warmup_interval"] = _check_int("cache.warmup_interval", o["warmup_interval"], minimum=1)
        for key in ("max_cached_steps", "max_continuous_cached_steps"):
            if key in o:
                kw[key] = _check_int(f"cache.{key}", o[key], minimum=1, allow_minus_one=True)
        if "taylorseer_order" in o:
            order = _check_int("cache.taylorseer_order", o["taylorseer_order"], minimum=0)
            if order > 2:
                raise ValueError(f"option 'cache.taylorseer_order' must be 0, 1 or 2, got {order}")
            kw["taylorseer_order"] = order
        if "steps_mask" in o:
            kw["steps_mask"] = _parse_steps_mask(o["steps_mask"])
        if "steps_mask_policy" in o:
            kw["steps_mask_policy"] = _check_choice("cache.steps_mask_policy", o["steps_mask_policy"], ("dynamic", "static"))
        if o.get("num_inference_steps") is not None:
            kw["num_inference_steps"] = _check_int(
                "cache.num_inference_steps", o["num_inference_steps"], minimum=1
            )
        if o.get("separate_cfg") is not None:
            kw["separate_cfg"] = _check_bool("cache.separate_cfg", o["separate_cfg"])
        cfg = CacheConfig(**kw)
        cfg._check_steps()
        return cfg

    def _check_steps(self) -> None:
        steps = self.num_inference_steps
        if isinstance(self.steps_mask, str) and steps is None:
            raise ValueError(
                f"option 'cache.steps_mask'={self.steps_mask!r} is a preset, which is scaled to the number of "
                f"denoising steps: also give 'cache.num_inference_steps' (e.g. 28 for FLUX.1-dev, 8 or 4 for "
                f"a Lightning LoRA)"
            )
        if steps is not None and self.warmup_interval == 1 and self.max_warmup_steps >= steps:
            raise ValueError(
                f"option 'cache.max_warmup_steps'={self.max_warmup_steps} covers all {steps} steps "
                f"('cache.num_inference_steps'), so no step could ever be cached; lower max_warmup_steps "
                f"(e.g. 2 for an 8-step run, 1 for a 4-step run)"
            )


def _parse_steps_mask(value: Any) -> str | tuple[int, ...] | None:
    """A preset name, a bit string such as "1110100", or a sequence of 0/1 (1 = compute)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value in STEPS_MASK_PRESETS:
            return value
        if value and set(value) <= {"0", "1"}:
            return tuple(int(c) for c in value)
        raise ValueError(
            f"option 'cache.steps_mask' must be one of {', '.join(STEPS_MASK_PRESETS)}, a bit string "
            f"such as '1111010' (1 = compute the step), or a list of 0/1; got {value!r}"
        )
    if isinstance(value, (list, tuple)) and value and all(type(v) is int and v in (0, 1) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(
        f"option 'cache.steps_mask' must be a preset name, a bit string or a non-empty list of 0/1; got {value!r}"
    )


def _check_dump_dir(path: str) -> str:
    """The directory must exist or be creatable now: a failure later would surface mid-compile."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"option 'dump_dir' (or ${DUMP_DIR_ENV}) {path!r} is a file, not a directory; give a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"option 'dump_dir' (or ${DUMP_DIR_ENV}) {path!r} cannot be created ({exc.strerror}); give a writable directory"
        ) from None
    return path


def _check_comm_dtype(value: Any) -> str:
    """A name ("float8_e4m3fn") or the torch dtype itself."""
    import torch

    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if not isinstance(value, str) or value not in COMM_DTYPES:
        raise ValueError(
            f"option 'comm_dtype' must be None (all-to-alls in the compute dtype) or one of "
            f"{', '.join(COMM_DTYPES)} (Q, V and the attention output sent in FP8); got {value!r}"
        )
    return value


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    ulysses_degree: int = 1
    tp_degree: int = 1
    # CFG parallelism: the world is cfg_degree branches of ulysses x tp ranks; this graph's collectives
    # and decisions stay inside its branch (the pairing of the calls: runtime/cfg_parallel.py)
    cfg_degree: int = 1
    # tensor parallelism frees the full weights once each rank holds its shards (runtime/weights.py)
    release_weights: bool = True
    spatial_degree: int = 1  # convolutional graphs (the VAE): height bands over this many ranks
    async_ulysses: bool = False
    attention_backend: str = "auto"
    cache: CacheConfig | None = None
    inner_compiler: str = "eager"
    dump_dir: str | None = None
    comm_dtype: str | None = None  # None: the all-to-alls carry the compute dtype

    @staticmethod
    def from_options(options: Mapping[str, Any] | None) -> "CompileConfig":
        options = dict(options or {})
        names = tuple(f.name for f in dataclasses.fields(CompileConfig))
        _reject_unknown("npu_dit", options, names)
        kw: dict[str, Any] = {}
        if "ulysses_degree" in options:
            kw["ulysses_degree"] = _check_int("ulysses_degree", options["ulysses_degree"], minimum=1)
        if "tp_degree" in options:
            kw["tp_degree"] = _check_int("tp_degree", options["tp_degree"], minimum=1)
        if "cfg_degree" in options:
            value = _check_int("cfg_degree", options["cfg_degree"], minimum=1)
            if value > 2:
                raise ValueError(
                    f"option 'cfg_degree' must be 1 or 2 (true CFG has two branches: the prompt and the "
                    f"negative prompt), got {value}"
                )
            kw["cfg_degree"] = value
        if "release_weights" in options:
            kw["release_weights"] = _check_bool("release_weights", options["release_weights"])
        if "spatial_degree" in options:
            kw["spatial_degree"] = _check_int("spatial_degree", options["spatial_degree"], minimum=1)
        if "async_ulysses" in options:
            kw["async_ulysses"] = _check_bool("async_ulysses", options["async_ulysses"])
        if "attention_backend" in options:
            kw["attention_backend"] = _check_choice(
                "attention_backend", options["attention_backend"], ATTENTION_BACKENDS
            )
        if options.get("cache") is not None:
            kw["cache"] = CacheConfig.from_options(options["cache"])
        if "inner_compiler" in options:
            kw["inner_compiler"] = _check_choice("inner_compiler", options["inner_compiler"], INNER_COMPILERS)
        if options.get("comm_dtype") is not None:
            kw["comm_dtype"] = _check_comm_dtype(options["comm_dtype"])
        dump_dir = options.get("dump_dir", os.environ.get(DUMP_DIR_ENV) or None)
        if dump_dir is not None:
            if not isinstance(dump_dir, (str, os.PathLike)):
                raise ValueError(f"option 'dump_dir' must be a directory path, got {dump_dir!r}")
            kw["dump_dir"] = _check_dump_dir(os.fspath(dump_dir))
        cfg = CompileConfig(**kw)
        cfg._check_available()
        cfg._check_combinations()
        return cfg

    def _check_combinations(self) -> None:
        if self.spatial_degree > 1:
            others = [f"{k}={getattr(self, k)!r}" for k, default in
                      (("ulysses_degree", 1), ("tp_degree", 1), ("cfg_degree", 1), ("cache", None),
                       ("async_ulysses", False))
                      if getattr(self, k) != default]
            if others:
                raise ValueError(
                    f"option 'spatial_degree={self.spatial_degree}' is for convolutional graphs (the VAE) and "
                    f"cannot be combined with {', '.join(others)} (options of the transformer); compile the VAE "
                    f"and the transformer separately, each with its own options"
                )
        if self.comm_dtype is not None and self.ulysses_degree == 1:
            raise ValueError(
                f"option 'comm_dtype={self.comm_dtype}' compresses Ulysses' all-to-alls and needs 'ulysses_degree' "
                f"> 1; set ulysses_degree to the number of ranks or drop comm_dtype"
            )
        if self.async_ulysses and self.ulysses_degree == 1:
            raise ValueError(
                "option 'async_ulysses=True' needs 'ulysses_degree' > 1 (it overlaps Ulysses' all-to-all "
                "with compute); set ulysses_degree to the number of ranks or drop async_ulysses"
            )

    def _check_available(self) -> None:
        defaults = CompileConfig()
        for feature, key in UNAVAILABLE_FEATURES.items():
            value = getattr(self, key)
            if value != getattr(defaults, key):
                raise ValueError(
                    f"option {key}={value!r} asks for {feature.replace('_', ' ')}, which is not available "
                    f"in this version of npu-dit yet; leave {key!r} at its default "
                    f"({getattr(defaults, key)!r})"
                )

    @property
    def world_degree(self) -> int:
        """How many ranks the rewritten program expects (both CFG branches)."""
        return self.cfg_degree * self.ulysses_degree * self.tp_degree
