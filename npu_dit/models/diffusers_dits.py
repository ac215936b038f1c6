"""The DiT transformers diffusers ships, at the tiny size of diffusers' own model tests.

One `DiTEntry` per class: the class name, the init config of its test in diffusers'
`tests/models/transformers/test_models_*` (`get_init_dict`), and a builder of the forward kwargs shaped
like that test's `get_dummy_inputs` (random tensors from a seeded generator, float32, CPU). The configs
and shapes are diffusers' public test data (huggingface/diffusers at 58eb52c, 2026-08-23), written here as
data; `npu-dit bench dits` (`tools/dit_survey.py`) runs each entry through the Ulysses backend.

Every other model class in `diffusers.models.transformers` is in `NOT_SURVEYED` with the reason (audio
models, UNet blocks, PRX's test config too large for a 2-core survey, Kandinsky5's inputs only in its pipeline
tests, classes newer than the diffusers tests read here).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

SEED = 0


@dataclasses.dataclass(frozen=True)
class DiTEntry:
    class_name: str
    config: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Any]]  # forward kwargs, given a seeded generator
    note: str = ""  # where the entry departs from the diffusers test, and why

    @property
    def name(self) -> str:
        """The short name used on the command line: the class name without `Transformer...Model`."""
        for suffix in ("Transformer2DModel", "Transformer3DModel", "2DModel"):
            if self.class_name.endswith(suffix):
                return self.class_name[: -len(suffix)]
        return self.class_name

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model with random weights (seed `SEED`), in eval mode."""
        import diffusers

        torch.manual_seed(SEED)
        with torch.device(device):
            model = getattr(diffusers, self.class_name)(**self.config)
        return model.eval()  # float32: the default dtype; `.to()` would warn about keep-in-fp32 modules

    def example_inputs(self) -> dict[str, Any]:
        return self.inputs(torch.Generator().manual_seed(SEED))


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _steps(g: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=g)


def _one(batch: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((batch,), value)


# ---- inputs, one builder per test's get_dummy_inputs ------------------------------------------------


def _flux_like(g, *, batch=1, hw=4, channels=4, text=48, dim=32, pooled=None, guidance=None):
    """Flux / Chroma / Bria / LongCat / Ovis: packed latents, 3-axis ids without a batch dim."""
    kw = {"hidden_states": _randn(g, batch, hw * hw, channels), "encoder_hidden_states": _randn(g, batch, text, dim)}
    if pooled:
        kw["pooled_projections"] = _randn(g, batch, pooled)
    kw["img_ids"] = _randn(g, hw * hw, 3)
    kw["txt_ids"] = _randn(g, text, 3)
    kw["timestep"] = _one(batch)
    if guidance is not None:
        kw["guidance"] = _one(batch, guidance)
    return kw


def _flux2(g, batch=1, hw=4, text=48):
    image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(hw), torch.arange(hw), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    return {"hidden_states": _randn(g, batch, hw * hw, 4), "encoder_hidden_states": _randn(g, batch, text, 32),
            "img_ids": image_ids.unsqueeze(0).expand(batch, -1, -1), "txt_ids": text_ids.unsqueeze(0).expand(batch, -1, -1),
            "timestep": _one(batch), "guidance": _one(batch)}


def _image(g, *, batch, channels, hw, text, dim, **extra):
    """[B, C, H, W] latents + text states + integer timesteps: SD3, Sana, AuraFlow, ..."""
    kw = {"hidden_states": _randn(g, batch, channels, hw, hw), "encoder_hidden_states": _randn(g, batch, text, dim),
          "timestep": _steps(g, batch)}
    kw.update(extra)
    return kw


def _video(g, *, batch, channels, frames, hw, text, dim, **extra):
    """[B, C, F, H, W] latents + text states + integer timesteps: Wan, SkyReels, Mochi, ..."""
    kw = {"hidden_states": _randn(g, batch, channels, frames, hw, hw), "encoder_hidden_states": _randn(g, batch, text, dim),
          "timestep": _steps(g, batch)}
    kw.update(extra)
    return kw


def _sd3(g, batch=2):
    kw = _image(g, batch=batch, channels=4, hw=32, text=154, dim=32)
    return {**kw, "pooled_projections": _randn(g, batch, 64), "timestep": _steps(g, batch)}


def _pixart(g, batch=4):
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _steps(g, batch),
            "encoder_hidden_states": _randn(g, batch, 8, 8), "added_cond_kwargs": {"aspect_ratio": None, "resolution": None}}


def _cogview(g, batch=2):
    sizes = torch.tensor([64, 64]).unsqueeze(0).repeat(batch, 1)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 8),
            "timestep": _steps(g, batch), "original_size": sizes, "target_size": sizes.clone(),
            "crop_coords": torch.tensor([0, 0]).unsqueeze(0).repeat(batch, 1)}


def _cogvideox(g, batch=2):  # CogVideoX and ConsisID take [B, F, C, H, W]
    return {"hidden_states": _randn(g, batch, 1, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 8, 8),
            "timestep": _steps(g, batch)}


def _consisid(g, batch=2):
    return {**_cogvideox(g, batch), "id_vit_hidden": [torch.ones(batch, 2, 2)], "id_cond": torch.ones(batch, 2)}


def _wan_vace(g, batch=1):
    kw = _video(g, batch=batch, channels=16, frames=2, hw=16, text=12, dim=32)
    return {**kw, "control_hidden_states": _randn(g, batch, 48, 2, 16, 16), "timestep": _steps(g, batch)}


def _hunyuan_video(g, batch=1):
    return {"hidden_states": _randn(g, batch, 4, 1, 16, 16), "timestep": _steps(g, batch).float(),
            "encoder_hidden_states": _randn(g, batch, 12, 16), "pooled_projections": _randn(g, batch, 8),
            "encoder_attention_mask": torch.ones(batch, 12), "guidance": _steps(g, batch).float()}


def _framepack(g, batch=1, frames=3, hw=4):
    history = frames - 1
    return {"hidden_states": _randn(g, batch, 4, frames, hw, hw), "timestep": _steps(g, batch),
            "encoder_hidden_states": _randn(g, batch, 12, 16), "pooled_projections": _randn(g, batch, 8),
            "encoder_attention_mask": torch.ones(batch, 12), "guidance": _steps(g, batch),
            "image_embeds": _randn(g, batch, 12, 16), "indices_latents": torch.ones(frames),
            "latents_clean": _randn(g, batch, 4, history, hw, hw), "indices_latents_clean": torch.ones(history),
            "latents_history_2x": _randn(g, batch, 4, history, hw, hw), "indices_latents_history_2x": torch.ones(history),
            "latents_history_4x": _randn(g, batch, 4, history * 4, hw, hw),
            "indices_latents_history_4x": torch.ones(history * 4)}


def _hunyuan_dit(g, batch=2):
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 4, 8),
            "text_embedding_mask": torch.ones(batch, 4), "encoder_hidden_states_t5": _randn(g, batch, 4, 8),
            "text_embedding_mask_t5": torch.ones(batch, 4), "timestep": _steps(g, batch).float(),
            "image_meta_size": torch.tensor([[1024, 1024, 16, 16, 0, 0]] * batch, dtype=torch.float32),
            "style": torch.zeros(batch, dtype=torch.long),
            "image_rotary_emb": [torch.ones(1, 8), torch.zeros(1, 8)]}


def _lumina2(g, batch=2):
    return {"hidden_states": _randn(g, batch, 4, 16, 16), "encoder_hidden_states": _randn(g, batch, 16, 32),
            "timestep": torch.rand(batch, generator=g), "encoder_attention_mask": torch.ones(batch, 16, dtype=torch.bool)}


def _lumina_next(g, batch=2):
    return {"hidden_states": _randn(g, batch, 4, 16, 16), "encoder_hidden_states": _randn(g, batch, 16, 32),
            "timestep": torch.rand(batch, generator=g), "encoder_mask": _randn(g, batch, 16),
            "image_rotary_emb": _randn(g, 384, 384, 4), "cross_attention_kwargs": {}}


def _ltx(g, batch=2, frames=2, hw=16):
    return {"hidden_states": _randn(g, batch, frames * hw * hw, 4), "encoder_hidden_states": _randn(g, batch, 16, 16),
            "timestep": _steps(g, batch), "encoder_attention_mask": torch.ones(batch, 16, dtype=torch.bool),
            "num_frames": frames, "height": hw, "width": hw}


def _qwen_image(g, batch=1, hw=4, text=8):
    return {"hidden_states": _randn(g, batch, hw * hw, 16), "encoder_hidden_states": _randn(g, batch, text, 16),
            "encoder_hidden_states_mask": torch.ones(batch, text, dtype=torch.long), "timestep": _one(batch),
            "img_shapes": [(1, hw, hw)] * batch}


def _hidream(g, batch=2):
    return {"hidden_states": _randn(g, batch, 4, 32, 32), "encoder_hidden_states_t5": _randn(g, batch, 8, 8),
            "encoder_hidden_states_llama3": _randn(g, batch, batch, 8, 4), "pooled_embeds": _randn(g, batch, 8),
            "timesteps": _steps(g, batch)}


def _cosmos(g, batch=1):
    return {"hidden_states": _randn(g, batch, 4, 1, 16, 16), "timestep": _steps(g, batch),
            "encoder_hidden_states": _randn(g, batch, 12, 16), "attention_mask": torch.ones(batch, 12), "fps": 30,
            "padding_mask": torch.zeros(batch, 1, 16, 16)}


def _omnigen(g, batch=2, hw=8, text=24):
    length = text + 1 + hw * hw // 4
    return {"hidden_states": _randn(g, batch, 4, hw, hw), "timestep": torch.rand(batch, generator=g),
            "input_ids": torch.randint(0, 10, (batch, text), generator=g), "input_img_latents": [_randn(g, 1, 4, hw, hw)],
            "input_image_sizes": {0: [[0, hw * hw // 4]]}, "attention_mask": torch.ones(batch, length, length),
            "position_ids": torch.arange(length).unsqueeze(0).repeat(batch, 1)}


def _dit(g, batch=4):
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _steps(g, batch),
            "class_labels": torch.randint(0, 4, (batch,), generator=g)}


def _bria_fibo(g, batch=1, hw=16, text=32):
    kw = _flux_like(g, batch=batch, hw=hw, channels=48, text=text, dim=64)
    states = kw["encoder_hidden_states"]
    return {**kw, "text_encoder_layers": [states[:, :, :32], states[:, :, :32]]}


def _z_image(g):
    return {"x": [_randn(g, 16, 1, 16, 16)], "cap_feats": [_randn(g, 16, 16)], "t": torch.tensor([0.0])}


def _hunyuan_video15(g, batch=1):
    return {"hidden_states": _randn(g, batch, 4, 1, 8, 8), "timestep": _one(batch),
            "encoder_hidden_states": _randn(g, batch, 6, 16), "encoder_hidden_states_2": _randn(g, batch, 4, 8),
            "encoder_attention_mask": torch.ones(batch, 6), "encoder_attention_mask_2": torch.ones(batch, 4),
            "image_embeds": torch.zeros(batch, 3, 12)}


def _ltx2(g, batch=2, frames=2, hw=16, audio_frames=9, text=16):
    return {"hidden_states": _randn(g, batch, frames * hw * hw, 4), "audio_hidden_states": _randn(g, batch, audio_frames, 4),
            "encoder_hidden_states": _randn(g, batch, text, 16), "audio_encoder_hidden_states": _randn(g, batch, text, 16),
            "timestep": _randn(g, batch).abs() * 1000, "encoder_attention_mask": torch.ones(batch, text, dtype=torch.bool),
            "num_frames": frames, "height": hw, "width": hw, "audio_num_frames": audio_frames, "fps": 25.0}


def _helios(g, batch=1, frames=2, hw=16):
    kw = {"hidden_states": _randn(g, batch, 4, frames, hw, hw), "timestep": _steps(g, batch),
          "encoder_hidden_states": _randn(g, batch, 12, 16), "indices_hidden_states": torch.ones(batch, frames)}
    for key, length in (("short", frames - 1), ("mid", frames - 1), ("long", (frames - 1) * 4)):
        kw[f"indices_latents_history_{key}"] = torch.ones(batch, length)
    for key, length in (("short", frames - 1), ("mid", frames - 1), ("long", (frames - 1) * 4)):
        kw[f"latents_history_{key}"] = _randn(g, batch, 4, length, hw, hw)
    return kw


def _ernie_image(g, batch=1, hw=16, text=16):
    return {"hidden_states": _randn(g, batch, 16, hw, hw), "timestep": _one(batch), "text_bth": _randn(g, batch, text, 16),
            "text_lens": torch.tensor([text] * batch)}


def _glm_image(g, batch=1, hw=8):
    return {"hidden_states": _randn(g, batch, 4, hw, hw), "encoder_hidden_states": _randn(g, batch, 12, 32),
            "prior_token_id": torch.randint(0, 64, (batch,), generator=g),
            "prior_token_drop": torch.zeros(batch, dtype=torch.bool), "timestep": _steps(g, batch),
            "target_size": torch.tensor([[hw, hw]] * batch, dtype=torch.float32),
            "crop_coords": torch.tensor([[0, 0]] * batch, dtype=torch.float32)}


def _krea2(g, batch=1, grid=2, text=4, layers=3):
    image = grid * grid
    position_ids = torch.zeros(text + image, 3)
    position_ids[text:, 1] = torch.arange(grid).repeat_interleave(grid)
    position_ids[text:, 2] = torch.arange(grid).repeat(grid)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[:, -1] = False
    return {"hidden_states": _randn(g, batch, image, 16), "encoder_hidden_states": _randn(g, batch, text, layers, 16),
            "timestep": torch.tensor([0.5]), "position_ids": position_ids, "encoder_attention_mask": mask}


def _wan_animate(g, batch=1, frames=20, hw=16):
    return {"hidden_states": _randn(g, batch, 12, frames + 1, hw, hw), "timestep": _steps(g, batch),
            "encoder_hidden_states": _randn(g, batch, 12, 16), "encoder_hidden_states_image": _randn(g, batch, 12, 16),
            "pose_hidden_states": _randn(g, batch, 4, frames, hw, hw), "face_pixel_values": _randn(g, batch, 3, 77, 16, 16)}


def _wan_config(**over):
    base = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
            "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}
    return {**base, **over}


_FLUX_CONFIG = {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                "axes_dims_rope": [4, 4, 8]}

ENTRIES: tuple[DiTEntry, ...] = (
    DiTEntry("FluxTransformer2DModel", dict(_FLUX_CONFIG), lambda g: _flux_like(g, pooled=32)),
    DiTEntry("Flux2Transformer2DModel",
             {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 256,
              "axes_dims_rope": [4, 4, 4, 4]}, _flux2),
    DiTEntry("SD3Transformer2DModel",
             {"sample_size": 32, "patch_size": 1, "in_channels": 4, "num_layers": 4, "attention_head_dim": 8,
              "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
              "pooled_projection_dim": 64, "out_channels": 4, "pos_embed_max_size": 96, "dual_attention_layers": (),
              "qk_norm": None}, _sd3),
    DiTEntry("PixArtTransformer2DModel",
             {"sample_size": 8, "num_layers": 1, "patch_size": 2, "attention_head_dim": 2, "num_attention_heads": 2,
              "in_channels": 4, "cross_attention_dim": 8, "out_channels": 8, "attention_bias": True,
              "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 8, "norm_type": "ada_norm_single",
              "norm_elementwise_affine": False, "norm_eps": 1e-6, "use_additional_conditions": False,
              "caption_channels": None}, _pixart),
    DiTEntry("SanaTransformer2DModel",
             {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 1, "attention_head_dim": 4,
              "num_attention_heads": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 4,
              "cross_attention_dim": 8, "caption_channels": 8, "sample_size": 32},
             lambda g: _image(g, batch=2, channels=4, hw=32, text=8, dim=8)),
    DiTEntry("CogView3PlusTransformer2DModel",
             {"patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 2,
              "out_channels": 4, "text_embed_dim": 8, "time_embed_dim": 8, "condition_dim": 2, "pos_embed_max_size": 8,
              "sample_size": 8}, _cogview),
    DiTEntry("CogView4Transformer2DModel",
             {"patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 4,
              "out_channels": 4, "text_embed_dim": 8, "time_embed_dim": 8, "condition_dim": 4}, _cogview),
    DiTEntry("CogVideoXTransformer3DModel",
             {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
              "time_embed_dim": 2, "text_embed_dim": 8, "num_layers": 2, "sample_width": 8, "sample_height": 8,
              "sample_frames": 8, "patch_size": 2, "patch_size_t": None, "temporal_compression_ratio": 4,
              "max_text_seq_length": 8}, _cogvideox),
    DiTEntry("WanTransformer3DModel", _wan_config(),
             lambda g: _video(g, batch=1, channels=4, frames=2, hw=16, text=12, dim=16)),
    DiTEntry("WanVACETransformer3DModel",
             _wan_config(in_channels=16, out_channels=16, text_dim=32, num_layers=4, vace_layers=[0, 2],
                         vace_in_channels=48), _wan_vace),
    DiTEntry("SkyReelsV2Transformer3DModel", _wan_config(),
             lambda g: _video(g, batch=1, channels=4, frames=2, hw=16, text=12, dim=16)),
    DiTEntry("ChronoEditTransformer3DModel",
             {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 16,
              "out_channels": 16, "text_dim": 32, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2,
              "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": None,
              "added_kv_proj_dim": None, "rope_max_seq_len": 64, "pos_embed_seq_len": None,
              "rope_temporal_skip_len": 8},
             lambda g: _video(g, batch=1, channels=16, frames=2, hw=8, text=12, dim=32, encoder_hidden_states_image=None)),
    DiTEntry("HunyuanVideoTransformer3DModel",
             {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10, "num_layers": 1,
              "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 1, "patch_size_t": 1,
              "guidance_embeds": True, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4),
              "image_condition_type": None}, _hunyuan_video),
    DiTEntry("HunyuanVideoFramepackTransformer3DModel",
             {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10, "num_layers": 1,
              "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 2, "patch_size_t": 1,
              "guidance_embeds": True, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4),
              "image_condition_type": None, "has_image_proj": True, "image_proj_dim": 16,
              "has_clean_x_embedder": True}, _framepack),
    DiTEntry("HunyuanVideo15Transformer3DModel",
             {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
              "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 16,
              "text_embed_2_dim": 8, "image_embed_dim": 12, "rope_axes_dim": (2, 2, 4), "target_size": 16,
              "task_type": "t2v"}, _hunyuan_video15),
    DiTEntry("HunyuanDiT2DModel",
             {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 8,
              "num_attention_heads": 2, "cross_attention_dim": 8, "cross_attention_dim_t5": 8,
              "pooled_projection_dim": 4, "hidden_size": 16, "text_len": 4, "text_len_t5": 4,
              "activation_fn": "gelu-approximate"}, _hunyuan_dit),
    DiTEntry("Lumina2Transformer2DModel",
             {"sample_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 24, "num_layers": 2,
              "num_refiner_layers": 1, "num_attention_heads": 3, "num_kv_heads": 1, "multiple_of": 2,
              "ffn_dim_multiplier": None, "norm_eps": 1e-5, "scaling_factor": 1.0, "axes_dim_rope": (4, 2, 2),
              "axes_lens": (128, 128, 128), "cap_feat_dim": 32}, _lumina2),
    DiTEntry("LuminaNextDiT2DModel",
             {"sample_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 24, "num_layers": 2,
              "num_attention_heads": 3, "num_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": None,
              "norm_eps": 1e-5, "learn_sigma": False, "qk_norm": True, "cross_attention_dim": 32,
              "scaling_factor": 1.0}, _lumina_next),
    DiTEntry("MochiTransformer3DModel",
             {"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
              "pooled_projection_dim": 16, "in_channels": 4, "out_channels": None, "qk_norm": "rms_norm",
              "text_embed_dim": 16, "time_embed_dim": 4, "activation_fn": "swiglu", "max_sequence_length": 16},
             lambda g: _video(g, batch=2, channels=4, frames=2, hw=16, text=16, dim=16,
                              encoder_attention_mask=torch.ones(2, 16, dtype=torch.bool))),
    DiTEntry("LTXVideoTransformer3DModel",
             {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
              "cross_attention_dim": 16, "num_layers": 1, "qk_norm": "rms_norm_across_heads", "caption_channels": 16},
             _ltx),
    DiTEntry("AllegroTransformer3DModel",
             {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "num_layers": 1,
              "cross_attention_dim": 16, "sample_width": 8, "sample_height": 8, "sample_frames": 8,
              "caption_channels": 8},
             lambda g: _video(g, batch=2, channels=4, frames=2, hw=8, text=16, dim=8)),
    DiTEntry("LatteTransformer3DModel",
             {"sample_size": 8, "num_layers": 1, "patch_size": 2, "attention_head_dim": 4, "num_attention_heads": 2,
              "caption_channels": 8, "in_channels": 4, "cross_attention_dim": 8, "out_channels": 8,
              "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
              "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6},
             lambda g: _video(g, batch=2, channels=4, frames=1, hw=8, text=8, dim=8, enable_temporal_attentions=True)),
    DiTEntry("AuraFlowTransformer2DModel",
             {"sample_size": 32, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 1, "num_single_dit_layers": 1,
              "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
              "joint_attention_dim": 32, "out_channels": 4, "pos_embed_max_size": 256},
             lambda g: _image(g, batch=2, channels=4, hw=32, text=256, dim=32)),
    DiTEntry("QwenImageTransformer2DModel",
             {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
              "num_attention_heads": 4, "joint_attention_dim": 16, "guidance_embeds": False,
              "axes_dims_rope": (8, 4, 4)}, _qwen_image),
    DiTEntry("ChromaTransformer2DModel",
             {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 4, 8],
              "approximator_num_channels": 8, "approximator_hidden_dim": 16, "approximator_layers": 1},
             lambda g: _flux_like(g)),
    DiTEntry("BriaTransformer2DModel",
             {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
              "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": None,
              "axes_dims_rope": [0, 4, 4]}, lambda g: _flux_like(g)),
    DiTEntry("BriaFiboTransformer2DModel",
             {"patch_size": 1, "in_channels": 48, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
              "num_attention_heads": 2, "joint_attention_dim": 64, "text_encoder_dim": 32,
              "pooled_projection_dim": None, "axes_dims_rope": [0, 4, 4]}, _bria_fibo),
    DiTEntry("LongCatImageTransformer2DModel", dict(_FLUX_CONFIG), lambda g: _flux_like(g, guidance=3.5)),
    DiTEntry("OvisImageTransformer2DModel",
             {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
              "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
              "axes_dims_rope": (4, 4, 8)}, lambda g: _flux_like(g)),
    DiTEntry("HiDreamImageTransformer2DModel",
             {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
              "attention_head_dim": 8, "num_attention_heads": 4, "caption_channels": [8, 4], "text_emb_dim": 8,
              "num_routed_experts": 2, "num_activated_experts": 2, "axes_dims_rope": (4, 2, 2),
              "max_resolution": (32, 32), "llama_layers": (0, 1), "force_inference_output": True}, _hidream),
    DiTEntry("CosmosTransformer3DModel",
             {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 2,
              "mlp_ratio": 2, "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 32, 32),
              "patch_size": (1, 2, 2), "rope_scale": (2.0, 1.0, 1.0), "concat_padding_mask": True,
              "extra_pos_embed_type": "learnable"}, _cosmos),
    DiTEntry("EasyAnimateTransformer3DModel",
             {"attention_head_dim": 16, "num_attention_heads": 2, "in_channels": 4, "mmdit_layers": 2, "num_layers": 2,
              "out_channels": 4, "patch_size": 2, "sample_height": 60, "sample_width": 90, "text_embed_dim": 16,
              "time_embed_dim": 8, "time_position_encoding_type": "3d_rope", "timestep_activation_fn": "silu"},
             lambda g: _video(g, batch=2, channels=4, frames=2, hw=16, text=16, dim=16, timestep_cond=None,
                              encoder_hidden_states_t5=None, inpaint_latents=None, control_latents=None)),
    DiTEntry("OmniGenTransformer2DModel",
             {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 32,
              "num_layers": 20, "pad_token_id": 0, "vocab_size": 1000, "in_channels": 4, "time_step_dim": 4,
              "rope_scaling": {"long_factor": [1, 2], "short_factor": [1, 2]}}, _omnigen),
    DiTEntry("ConsisIDTransformer3DModel",
             {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
              "time_embed_dim": 2, "text_embed_dim": 8, "num_layers": 1, "sample_width": 8, "sample_height": 8,
              "sample_frames": 8, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8,
              "cross_attn_interval": 1, "is_kps": False, "is_train_face": True, "cross_attn_dim_head": 1,
              "cross_attn_num_heads": 1, "LFE_id_dim": 2, "LFE_vit_dim": 2, "LFE_depth": 5, "LFE_dim_head": 8,
              "LFE_num_heads": 2, "LFE_num_id_token": 1, "LFE_num_querie": 1, "LFE_output_dim": 10, "LFE_ff_mult": 1,
              "LFE_num_scale": 1}, _consisid),
    DiTEntry("DiTTransformer2DModel",
             {"in_channels": 4, "out_channels": 8, "activation_fn": "gelu-approximate", "num_attention_heads": 2,
              "attention_head_dim": 4, "attention_bias": True, "num_layers": 1, "norm_type": "ada_norm_zero",
              "num_embeds_ada_norm": 8, "patch_size": 2, "sample_size": 8}, _dit),
    DiTEntry("SanaVideoTransformer3DModel",
             {"in_channels": 16, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 12,
              "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 12,
              "cross_attention_dim": 24, "caption_channels": 16, "mlp_ratio": 2.5, "dropout": 0.0,
              "attention_bias": False, "sample_size": 8, "patch_size": (1, 2, 2), "norm_elementwise_affine": False,
              "norm_eps": 1e-6, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
             lambda g: _video(g, batch=1, channels=16, frames=2, hw=16, text=12, dim=16)),
    DiTEntry("ZImageTransformer2DModel",
             {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 16, "n_layers": 1,
              "n_refiner_layers": 1, "n_heads": 1, "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": 16,
              "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 4, 4], "axes_lens": [256, 32, 32]}, _z_image),

    DiTEntry("LTX2VideoTransformer3DModel",
             {"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
              "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4,
              "audio_num_attention_heads": 2, "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8,
              "num_layers": 2, "qk_norm": "rms_norm_across_heads", "caption_channels": 16,
              "rope_double_precision": False}, _ltx2),
    DiTEntry("HeliosTransformer3DModel",
             {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
              "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
              "qk_norm": "rms_norm_across_heads", "rope_dim": (4, 4, 4), "has_multi_term_memory_patch": True,
              "guidance_cross_attn": True, "zero_history_timestep": True, "is_amplify_history": False}, _helios),
    DiTEntry("MotifVideoTransformer3DModel",
             {"in_channels": 33, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 1,
              "num_single_layers": 1, "num_decoder_layers": 0, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1,
              "qk_norm": "rms_norm", "norm_type": "layer_norm", "text_embed_dim": 32, "image_embed_dim": 4,
              "rope_theta": 256.0, "rope_axes_dim": (4, 4, 4), "enable_text_cross_attention_dual": False,
              "enable_text_cross_attention_single": False},
             lambda g: _video(g, batch=1, channels=33, frames=9, hw=16, text=12, dim=32)),
    DiTEntry("WanAnimateTransformer3DModel",
             _wan_config(in_channels=12, latent_channels=4, image_dim=16,
                         motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
                         motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                         face_encoder_num_heads=2, inject_face_latents_blocks=2), _wan_animate),
    DiTEntry("ErnieImageTransformer2DModel",
             {"hidden_size": 16, "num_attention_heads": 1, "num_layers": 1, "ffn_hidden_size": 16, "in_channels": 16,
              "out_channels": 16, "patch_size": 1, "text_in_dim": 16, "rope_theta": 256, "rope_axes_dim": (8, 4, 4),
              "eps": 1e-6, "qk_layernorm": True}, _ernie_image),
    DiTEntry("GlmImageTransformer2DModel",
             {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "attention_head_dim": 8,
              "num_attention_heads": 2, "text_embed_dim": 32, "time_embed_dim": 16, "condition_dim": 8,
              "prior_vq_quantizer_codebook_size": 64}, _glm_image),
    DiTEntry("NucleusMoEImageTransformer2DModel",
             {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
              "num_attention_heads": 4, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4), "moe_enabled": False,
              "capacity_factors": [8.0, 8.0]}, _qwen_image),
    DiTEntry("JoyImageEditTransformer3DModel",
             {"patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16,
              "num_layers": 2, "rope_dim_list": [4, 6, 6], "theta": 256},
             lambda g: {"hidden_states": _randn(g, 1, 16, 1, 4, 4), "encoder_hidden_states": _randn(g, 1, 12, 16),
                        "timestep": _one(1)}),
    DiTEntry("Krea2Transformer2DModel",
             {"in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 32, "timestep_embed_dim": 8, "text_hidden_dim": 16,
              "num_text_layers": 3, "text_num_attention_heads": 2, "text_num_key_value_heads": 1,
              "text_intermediate_size": 16, "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1,
              "axes_dims_rope": (4, 2, 2), "rope_theta": 1000.0, "norm_eps": 1e-5}, _krea2),
)

_AUDIO = "an audio model, not an image/video DiT"
_UNET_BLOCK = "a UNet's transformer block, not a DiT pipeline's transformer"
_TODO = "diffusers has a model test with a tiny config; not in this table yet"
_NO_TEST = "no model test in the diffusers snapshot read (0.40.0.dev0): a tiny config would have to be invented"

# every other ModelMixin in diffusers.models.transformers (0.42.1), and why it is not surveyed
NOT_SURVEYED: dict[str, str] = {
    "PRXTransformer2DModel": "diffusers' test config is hidden 1792 x 4 blocks (~0.2 B parameters): too large here",
    "Kandinsky5Transformer3DModel": "no model test in diffusers; its inputs are built by the pipeline tests",
    "PriorTransformer": "not a DiT (an unCLIP prior)",
    "Transformer2DModel": _UNET_BLOCK, "TransformerTemporalModel": _UNET_BLOCK, "DualTransformer2DModel": _UNET_BLOCK,
    "AceStepTransformer1DModel": _AUDIO, "LongCatAudioDiTTransformer": _AUDIO, "MiniMaxMusic3Transformer1DModel": _AUDIO,
    "MiniMaxMusic3RVQDepthDecoder": _AUDIO, "StableAudioDiTModel": _AUDIO, "StableAudio3DiTModel": _AUDIO,
    "T5FilmDecoder": _AUDIO, "RFD4ProteinaTransformer": "a protein-structure model, not an image/video DiT",
    "AnyFlowTransformer3DModel": _TODO, "AnyFlowFARTransformer3DModel": _TODO, "Ideogram4Transformer2DModel": _TODO,
    "JoyImageEditPlusTransformer3DModel": _TODO, "MiniMaxH3Transformer3DModel": _TODO,
    "WanAnimate2Transformer3DModel": _TODO, "Cosmos3OmniTransformer": _TODO,
    "BriaFibo2Transformer2DModel": _NO_TEST, "DreamLiteTransformer2DModel": _NO_TEST, "Flux3Transformer2DModel": _NO_TEST,
    "HunyuanImageTransformer2DModel": _NO_TEST, "Kandinsky6Transformer3DModel": _NO_TEST,
    "Kandinsky6SRTransformer3DModel": _NO_TEST, "QwenImage21Transformer2DModel": _NO_TEST,
    "SanaWMTransformer3DModel": _NO_TEST, "SanaWMLTX2RefinerTransformer3DModel": _NO_TEST,
}


def get_entry(name: str) -> DiTEntry:
    """An entry by short name (`Flux`), class name (`FluxTransformer2DModel`), any case."""
    key = name.lower()
    for entry in ENTRIES:
        if key in (entry.name.lower(), entry.class_name.lower()):
            return entry
    raise ValueError(f"no DiT named {name!r}; known: {', '.join(e.name for e in ENTRIES)}")
