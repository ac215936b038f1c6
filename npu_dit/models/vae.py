"""The seed models' VAEs: FLUX.1-dev's `AutoencoderKL` and Qwen-Image's `AutoencoderKLQwenImage`.

`full` is the published config (FLUX.1-dev's vae/config.json; Qwen-Image's equals the class
defaults), `tiny` the test config the offline pipelines use (`npu_dit/pipelines/tiny.py`): the same
block structure (4 levels, downsampling by 8, a mid-block attention), few channels.
"""

from __future__ import annotations

from typing import Any

import torch

VAE_KINDS = ("flux", "qwen-image")

FLUX_VAE_FULL: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=1024,
    use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
)
FLUX_VAE_TINY: dict[str, Any] = dict(
    FLUX_VAE_FULL, latent_channels=4, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
    sample_size=32,
)
QWEN_VAE_FULL: dict[str, Any] = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)
QWEN_VAE_TINY: dict[str, Any] = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
)


def vae_config(kind: str, size: str = "tiny") -> dict[str, Any]:
    if kind not in VAE_KINDS or size not in ("tiny", "full"):
        raise ValueError(f"unknown VAE {kind!r}/{size!r}; kinds: {', '.join(VAE_KINDS)}; sizes: tiny, full")
    if kind == "flux":
        return dict(FLUX_VAE_FULL if size == "full" else FLUX_VAE_TINY)
    return dict(QWEN_VAE_FULL if size == "full" else QWEN_VAE_TINY)


def build_vae(kind: str, size: str = "tiny", *, seed: int = 0, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The real diffusers VAE class with random (seeded) weights, in eval mode; `device="meta"` for
    full-size inspection without memory."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    cls = AutoencoderKL if kind == "flux" else AutoencoderKLQwenImage
    config = vae_config(kind, size)
    torch.manual_seed(seed)
    with torch.device(device):
        vae = cls(**config)
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def latent_channels(kind: str, size: str = "tiny") -> int:
    config = vae_config(kind, size)
    return config["latent_channels"] if kind == "flux" else config["z_dim"]


def example_input(kind: str, size: str, *, height: int, width: int, encode: bool, batch: int = 1,
                  seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The image (encode) or latent (decode, height/8 x width/8) the pipelines hand the VAE; Qwen-Image's
    VAE takes one frame: [B, C, 1, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    if encode:
        shape = [batch, 3, height, width]
    else:
        shape = [batch, latent_channels(kind, size), height // 8, width // 8]
    if kind == "qwen-image":
        shape.insert(2, 1)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)
