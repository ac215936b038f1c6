"""Qwen-Image family: QwenImageTransformer2DModel (60 blocks, 24 heads x 128).

The edit pipelines append each input image's latents to the image sequence and describe every image
in `img_shapes` (target first), so RoPE is built per image inside the transformer. Qwen-Image-Edit
takes one input image, Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline) up to three, possibly of
different sizes. Both run about 50 steps with true CFG (a second transformer call per step for the
negative prompt). The Lightning variants are the same transformers with distilled weights, run for
8 (or 4) steps without true CFG. The text length is that of the encoded prompt (Qwen2.5-VL, 3584 wide).
"""

from __future__ import annotations

from typing import Any

import torch

from npu_dit.models.spec import PIXELS_PER_TOKEN_SIDE, ModelSpec, random_tensor

FULL_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}

TINY_CONFIG: dict[str, Any] = {
    **FULL_CONFIG,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}

# for whole-pipeline benchmarks on a CPU (`npu-dit bench seed`): the real head dim and RoPE axes, 4
# heads (Ulysses-4 keeps one per rank), 2 blocks. Narrower than FLUX's bench config because the edit
# pipelines always encode their input image at 1024x1024: 4096 input-image tokens ride along every call.
BENCH_CONFIG: dict[str, Any] = {
    **FULL_CONFIG,
    "num_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 4,
    "joint_attention_dim": 512,
}


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
    shapes = [(1, height // PIXELS_PER_TOKEN_SIDE, width // PIXELS_PER_TOKEN_SIDE)]
    shapes += [(1, h // PIXELS_PER_TOKEN_SIDE, w // PIXELS_PER_TOKEN_SIDE) for h, w in input_images]
    tokens = sum(f * h * w for f, h, w in shapes)
    mask = None
    if text_mask:
        # prompts of different lengths padded to the longest: prompt b keeps prompt_len - b * prompt_len // 4
        mask = torch.ones(batch, prompt_len, dtype=torch.long)
        for b in range(1, batch):
            mask[b, prompt_len - (b * prompt_len) // 4 :] = 0
        mask = mask.to(device)
    return {
        "hidden_states": random_tensor((batch, tokens, config["in_channels"]), generator, device, dtype),
        "encoder_hidden_states": random_tensor((batch, prompt_len, config["joint_attention_dim"]), generator, device, dtype),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.full((batch,), 0.75, device=device, dtype=dtype),
        "img_shapes": [list(shapes)] * batch,
        "return_dict": False,
    }


def _spec(name: str, repo: str, pipeline: str, *, steps: int, true_cfg: bool, images: int, aliases: tuple[str, ...], notes: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        hf_repo=repo,
        pipeline=pipeline,
        transformer_cls="QwenImageTransformer2DModel",
        full_config=FULL_CONFIG,
        tiny_config=TINY_CONFIG,
        bench_config=BENCH_CONFIG,
        default_steps=steps,
        true_cfg=true_cfg,
        embedded_guidance=None,
        max_input_images=images,
        default_prompt_len=128,
        make_inputs=make_inputs,
        aliases=aliases,
        notes=notes,
    )


QWEN_IMAGE_EDIT = _spec(
    "qwen-image-edit", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline",
    steps=50, true_cfg=True, images=1, aliases=("qwen-edit",),
    notes="one input image appended to the sequence; true CFG (two calls per step)",
)
QWEN_IMAGE_EDIT_2509 = _spec(
    "qwen-image-edit-2509", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline",
    steps=50, true_cfg=True, images=3, aliases=("qwen-edit-2509", "qwen-image-edit-plus"),
    notes="up to three input images, each appended to the sequence; true CFG",
)
QWEN_IMAGE_LIGHTNING = _spec(
    "qwen-image-lightning", "lightx2v/Qwen-Image-Lightning", "QwenImagePipeline",
    steps=8, true_cfg=False, images=0, aliases=("qwen-lightning",),
    notes="distilled Qwen-Image weights: 8 (or 4) steps, no true CFG",
)
QWEN_IMAGE_EDIT_LIGHTNING = _spec(
    "qwen-image-edit-lightning", "lightx2v/Qwen-Image-Lightning", "QwenImageEditPipeline",
    steps=8, true_cfg=False, images=1, aliases=("qwen-edit-lightning",),
    notes="distilled Qwen-Image-Edit weights: 8 (or 4) steps, no true CFG",
)
QWEN_IMAGE_EDIT_2509_LIGHTNING = _spec(
    "qwen-image-edit-2509-lightning", "lightx2v/Qwen-Image-Lightning", "QwenImageEditPlusPipeline",
    steps=8, true_cfg=False, images=3, aliases=("qwen-edit-2509-lightning",),
    notes="distilled Qwen-Image-Edit-2509 weights: 8 (or 4) steps, no true CFG",
)
