"""Whole diffusers pipelines for the seed models: tiny offline ones, or real weights from a local folder.

    pipe = load_pipeline("flux.1-dev")                       # tiny, random, built offline
    pipe = load_pipeline("flux.1-dev", size="bench")         # bench-size transformer, encoders and VAE
    pipe = load_pipeline("qwen-image-edit", weights="/ckpt/Qwen-Image-Edit")   # from_pretrained(local dir)
    pipe = load_pipeline("qwen-image-edit-lightning", weights=..., lora="lightning-8steps.safetensors")
"""

from __future__ import annotations

import os

import torch

from npu_dit.models import ModelSpec, get_model
from npu_dit.pipelines.lora import fuse_lora
from npu_dit.pipelines.tiny import LIGHTNING_SCHEDULER, tiny_pipeline


def check_weights_dir(weights: str | os.PathLike, spec: ModelSpec) -> str:
    """The folder, once it looks like a diffusers checkpoint (a model_index.json): checked before loading."""
    weights = os.fspath(weights)
    if not os.path.isdir(weights):
        raise ValueError(
            f"--weights {weights!r} is not a directory; pass a local diffusers checkpoint folder (one with "
            f"model_index.json), e.g. a download of {spec.hf_repo}"
        )
    if not os.path.isfile(os.path.join(weights, "model_index.json")):
        raise ValueError(
            f"--weights {weights!r} has no model_index.json, so it is not a diffusers checkpoint folder; pass the "
            f"folder a download of {spec.hf_repo} created (it holds model_index.json, transformer/, vae/, ...)"
        )
    return weights


def load_pipeline(
    model: str | ModelSpec,
    *,
    weights: str | os.PathLike | None = None,
    size: str | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """The model's diffusers pipeline: small random components (weights=None; `size` "tiny", the default,
    or "bench") or `from_pretrained(weights)`.

    A LoRA is fused into the transformer here, before any compile or sharding. Lightning variants get
    the Lightning scheduler settings (also when loading a base checkpoint plus the Lightning LoRA).
    """
    import diffusers

    spec = model if isinstance(model, ModelSpec) else get_model(model)
    if weights is None:
        pipe = tiny_pipeline(spec, size=size or "tiny", seed=seed, dtype=dtype)
    else:
        if size is not None:
            raise ValueError(f"size={size!r} picks an offline random pipeline, but weights={os.fspath(weights)!r} "
                             f"brings the checkpoint's own config: pass one or the other")
        weights = check_weights_dir(weights, spec)
        pipe = getattr(diffusers, spec.pipeline).from_pretrained(weights, dtype=dtype, local_files_only=True)
        if "lightning" in spec.name:
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
    if lora is not None:
        fuse_lora(pipe.transformer, lora, scale=lora_scale)
    return pipe


__all__ = ["check_weights_dir", "fuse_lora", "load_pipeline", "tiny_pipeline"]
