"""FLUX.1-dev: FluxTransformer2DModel (19 double-stream + 38 single-stream blocks, 24 heads x 128).

FluxPipeline encodes the prompt with T5 padded to 512 tokens, packs the 1024x1024 latent into 4096
image tokens, and calls the transformer once per step (28 steps) with embedded guidance 3.5.
"""

from __future__ import annotations

from typing import Any

import torch

from npu_dit.models.spec import PIXELS_PER_TOKEN_SIDE, ModelSpec, random_tensor

FULL_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

TINY_CONFIG: dict[str, Any] = {
    **FULL_CONFIG,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}

# large enough that compute dominates on a CPU: hidden 1024, 2 double + 2 single blocks
BENCH_CONFIG: dict[str, Any] = {
    **FULL_CONFIG,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 8,
    "joint_attention_dim": 1024,
    "pooled_projection_dim": 256,
}


def image_ids(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """FluxPipeline's latent image ids: (rows*cols, 3) with [0, row, col]."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


def make_inputs(
    config: dict[str, Any],
    *,
    height: int,
    width: int,
    prompt_len: int,
    batch: int,
    input_images: list[tuple[int, int]],
    text_mask: bool,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> dict[str, Any]:
    # FLUX's T5 prompt is padded to a fixed length and attends without a mask: text_mask is ignored
    rows, cols = height // PIXELS_PER_TOKEN_SIDE, width // PIXELS_PER_TOKEN_SIDE
    in_channels = config["in_channels"]
    meta = device.type == "meta"
    inputs = {
        "hidden_states": random_tensor((batch, rows * cols, in_channels), generator, device, dtype),
        "encoder_hidden_states": random_tensor((batch, prompt_len, config["joint_attention_dim"]), generator, device, dtype),
        "pooled_projections": random_tensor((batch, config["pooled_projection_dim"]), generator, device, dtype),
        "timestep": torch.full((batch,), 0.75, device=device, dtype=dtype),
        "img_ids": torch.empty(rows * cols, 3, device=device, dtype=dtype) if meta else image_ids(rows, cols, device).to(dtype),
        "txt_ids": torch.zeros(prompt_len, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    return inputs


# the full depth (19 double + 38 single blocks) at a small width, for cache benchmarks: the share of
# work in the first/last blocks is what it is in FLUX.1-dev
BENCH_DEEP_CONFIG: dict[str, Any] = {
    **FULL_CONFIG,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 256,
    "pooled_projection_dim": 128,
}

FLUX_1_DEV = ModelSpec(
    name="flux.1-dev",
    hf_repo="black-forest-labs/FLUX.1-dev",
    pipeline="FluxPipeline",
    transformer_cls="FluxTransformer2DModel",
    full_config=FULL_CONFIG,
    tiny_config=TINY_CONFIG,
    bench_config=BENCH_CONFIG,
    extra_configs={"bench-deep": BENCH_DEEP_CONFIG},
    default_steps=28,
    true_cfg=False,
    embedded_guidance=3.5,
    max_input_images=0,
    default_prompt_len=512,
    make_inputs=make_inputs,
    aliases=("flux", "flux-dev", "flux1-dev"),
    notes="T5 prompt padded to 512 tokens; one transformer call per step",
)
