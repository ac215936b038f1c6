"""What npu-dit knows about a seed model: its published transformer config, a tiny config for tests,
how its pipeline drives the transformer (steps, true CFG, embedded guidance, input images), and how to
build realistic example inputs for a resolution and prompt length.

Configs are plain dicts of constructor arguments of the real diffusers classes; `build_transformer`
instantiates the class on any device, the meta device included (no weights, no memory), so full-size
graphs can be traced and inspected on a laptop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

# VAE downsampling x 2x2 patch packing: one token per 16x16 pixels for FLUX and Qwen-Image
PIXELS_PER_TOKEN_SIDE = 16


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_repo: str
    pipeline: str
    transformer_cls: str
    full_config: dict[str, Any]
    tiny_config: dict[str, Any]
    default_steps: int
    true_cfg: bool  # the pipeline runs the transformer twice per step (positive and negative prompt)
    embedded_guidance: float | None  # FLUX-style guidance embedding value, None if the model has none
    max_input_images: int  # edit pipelines append each input image's latents to the sequence
    default_prompt_len: int
    make_inputs: Callable[..., dict[str, Any]]
    bench_config: dict[str, Any] | None = None
    extra_configs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def config(self, size: str = "full", **overrides: Any) -> dict[str, Any]:
        if size == "full":
            base = self.full_config
        elif size == "tiny":
            base = self.tiny_config
        elif size == "bench" and self.bench_config is not None:
            base = self.bench_config
        elif size in self.extra_configs:
            base = self.extra_configs[size]
        else:
            known = ", ".join(["full", "tiny"] + (["bench"] if self.bench_config is not None else []) + list(self.extra_configs))
            raise ValueError(f"model {self.name!r} has no {size!r} config; choose one of: {known}")
        return {**base, **overrides}

    def example_inputs(
        self,
        config: dict[str, Any],
        *,
        height: int = 1024,
        width: int = 1024,
        prompt_len: int | None = None,
        batch: int = 1,
        input_images: list[tuple[int, int]] | None = None,
        text_mask: bool | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Keyword arguments for one transformer call, as this model's pipeline would pass them.

        `input_images` are the (height, width) in pixels of the edit pipeline's input images; by
        default one image of the output size for edit models, none otherwise. `text_mask` asks for a
        text attention mask (models that take one): by default there is one only for batch > 1, where
        prompts of different lengths are padded (the Qwen pipelines drop an all-ones mask).
        """
        for side, value in (("height", height), ("width", width)):
            if value % PIXELS_PER_TOKEN_SIDE:
                raise ValueError(
                    f"{side}={value} is not a multiple of {PIXELS_PER_TOKEN_SIDE} pixels (VAE x8, 2x2 packing); "
                    f"use for example {value - value % PIXELS_PER_TOKEN_SIDE or PIXELS_PER_TOKEN_SIDE}"
                )
        if input_images is None:
            input_images = [(height, width)] if self.max_input_images else []
        if len(input_images) > self.max_input_images:
            raise ValueError(
                f"{self.name} takes at most {self.max_input_images} input image(s), got {len(input_images)}"
            )
        for h, w in input_images:
            if h % PIXELS_PER_TOKEN_SIDE or w % PIXELS_PER_TOKEN_SIDE:
                raise ValueError(f"input image size {h}x{w} must be a multiple of {PIXELS_PER_TOKEN_SIDE} pixels")
        generator = torch.Generator().manual_seed(seed)
        return self.make_inputs(
            config,
            height=height,
            width=width,
            prompt_len=prompt_len or self.default_prompt_len,
            batch=batch,
            input_images=list(input_images),
            text_mask=batch > 1 if text_mask is None else text_mask,
            device=torch.device(device),
            dtype=dtype,
            generator=generator,
        )


def random_tensor(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def build_transformer(
    spec: ModelSpec,
    config: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.nn.Module:
    """The real diffusers transformer class with random weights (or none, on the meta device)."""
    import diffusers

    cls = getattr(diffusers, spec.transformer_cls)
    device = torch.device(device)
    if device.type != "meta":
        torch.manual_seed(seed)
    # built in `dtype` rather than cast with .to(dtype), which makes diffusers warn about fp32 modules
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(number of parameters, their bytes) — works on the meta device."""
    numel = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return numel, nbytes
