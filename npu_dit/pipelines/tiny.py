"""Tiny offline pipelines for the six seed models: the real diffusers pipeline classes with every
component built from a tiny config, random weights, and the tokenizers/processor shipped in
`npu_dit/pipelines/assets/` (see `tokenizers.py`). Nothing is downloaded.

FLUX.1-dev: FluxPipeline(CLIPTextModel, T5EncoderModel, AutoencoderKL, FluxTransformer2DModel).
Qwen-Image family: QwenImagePipeline / QwenImageEditPipeline / QwenImageEditPlusPipeline with
Qwen2_5_VLForConditionalGeneration (a vision tower, so the edit text encoder sees the input image)
and AutoencoderKLQwenImage. The transformers use the seed specs' tiny configs; the text encoders'
widths match them (T5 d_model = joint_attention_dim, CLIP hidden = pooled_projection_dim, Qwen2.5-VL
hidden = joint_attention_dim), and both VAEs downsample by 8 as the real ones do (one token per
16x16 pixels after 2x2 packing).

`size="bench"` builds the same pipelines around the specs' bench transformer configs, with text
encoders and VAEs scaled down from the real ones by about the same factor (`COMPONENTS`), for
whole-pipeline timings on a CPU (`npu-dit bench seed`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from npu_dit.models import ModelSpec, build_transformer
from npu_dit.pipelines.tokenizers import asset, load_qwen_processor

# the schedulers' published configs (scheduler/scheduler_config.json of each checkpoint)
FLUX_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
QWEN_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
# lightx2v/Qwen-Image-Lightning's README: constant shift log(3), no terminal shift
LIGHTNING_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "max_image_seq_len": 8192, "max_shift": math.log(3),
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None, "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def scheduler_config(spec: ModelSpec) -> dict[str, Any]:
    if spec.transformer_cls == "FluxTransformer2DModel":
        return FLUX_SCHEDULER
    return LIGHTNING_SCHEDULER if "lightning" in spec.name else QWEN_SCHEDULER


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


# widths of the non-transformer components per size. The real ones: CLIP-L (768 wide, 12 layers), T5
# v1.1-XXL (4096 wide, 64 heads x 64, d_ff 10240, 24 layers), FLUX's VAE (128..512 channels, 2 resnets
# per block); Qwen2.5-VL-7B's language model (3584 wide, 28 heads / 4 key-value heads, 18944 MLP, 28
# layers) and Qwen-Image's VAE (base_dim 96, 2 resnets per block).
COMPONENTS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "clip": {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2},
        "t5": {"d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8},
        "flux_vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
        # 4 query / 2 key-value heads (grouped, as the real 28 / 4): TEP shards the attention on 2 and 4
        # ranks; an MLP width no rank count divides stays replicated
        "qwen_lm": {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "mrope_section": [2, 1, 1]},
        "qwen_vision": {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2},
        "qwen_vae": {"base_dim": 8, "num_res_blocks": 1},
    },
    "bench": {
        "clip": {"intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4},
        "t5": {"d_kv": 64, "d_ff": 2816, "num_layers": 2, "num_heads": 16, "relative_attention_num_buckets": 32},
        "flux_vae": {"block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16},
        "qwen_lm": {"intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "mrope_section": [8, 12, 12]},
        "qwen_vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2},
        "qwen_vae": {"base_dim": 8, "num_res_blocks": 1},  # the edit pipelines encode their input at 1024x1024
    },
}
SIZES = tuple(COMPONENTS)


def flux_components(spec: ModelSpec, seed: int, size: str = "tiny") -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg, widths = spec.config(size), COMPONENTS[size]
    clip_tok = AutoTokenizer.from_pretrained(asset("clip_tokenizer"))
    t5_tok = AutoTokenizer.from_pretrained(asset("t5_tokenizer"))
    clip = _seeded(seed + 1, lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=cfg["pooled_projection_dim"], **widths["clip"],
        max_position_embeddings=77, projection_dim=32,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )))
    t5 = _seeded(seed + 2, lambda: T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=cfg["joint_attention_dim"], **widths["t5"], decoder_start_token_id=0,
    )))
    vae = _seeded(seed + 3, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg["in_channels"] // 4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        **widths["flux_vae"], sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ))
    return {"text_encoder": clip, "tokenizer": clip_tok, "text_encoder_2": t5, "tokenizer_2": t5_tok, "vae": vae}


def qwen_components(spec: ModelSpec, seed: int, size: str = "tiny") -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg, widths = spec.config(size), COMPONENTS[size]
    lm = dict(widths["qwen_lm"])
    mrope_section = lm.pop("mrope_section")  # the LM head dim's rotary half, split over (t, h, w)
    tokenizer = AutoTokenizer.from_pretrained(asset("qwen2_tokenizer"))
    hidden = cfg["joint_attention_dim"]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, **lm,
            "rope_scaling": {"mrope_section": mrope_section, "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**widths["qwen_vision"], "out_hidden_size": hidden, "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = _seeded(seed + 1, lambda: Qwen2_5_VLForConditionalGeneration(config))
    z_dim = cfg["out_channels"]
    vae = _seeded(seed + 3, lambda: AutoencoderKLQwenImage(
        **widths["qwen_vae"], z_dim=z_dim, dim_mult=[1, 2, 4, 4],
        temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    ))
    components = {"text_encoder": text_encoder, "tokenizer": tokenizer, "vae": vae}
    if spec.max_input_images:
        components["processor"] = load_qwen_processor(asset("qwen2_5_vl_processor"))
    return components


def tiny_pipeline(spec: ModelSpec, *, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """The spec's diffusers pipeline, every component small and random (seeded), on the CPU.
    `size`: "tiny" (tests) or "bench" (the spec's bench transformer, `COMPONENTS["bench"]` around it)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    if size not in COMPONENTS:
        raise ValueError(f"offline pipeline size {size!r}: choose one of {', '.join(SIZES)} (or load real weights)")
    transformer_config = spec.config(size)  # a ValueError naming the spec's sizes if it lacks this one
    build = flux_components if spec.transformer_cls == "FluxTransformer2DModel" else qwen_components
    # built in `dtype` (no .to(dtype): diffusers would warn about fp32 modules on every build)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        components = build(spec, seed, size)
    finally:
        torch.set_default_dtype(previous)
    components["transformer"] = build_transformer(spec, transformer_config, seed=seed, dtype=dtype)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(**scheduler_config(spec))
    pipe = getattr(diffusers, spec.pipeline)(**components)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe
