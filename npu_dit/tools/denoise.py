"""A denoising loop like the seed pipelines': FlowMatch Euler steps over a transformer callable.

FLUX: one call per step. Qwen-Image-Edit with true CFG: a positive and a negative call per step with
the same timestep, combined as neg + scale * (pos - neg). Edit models keep the input image's latents
appended to the sequence and update only the target part (the pipelines slice
`noise_pred[:, :latents.size(1)]`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from npu_dit.models.spec import PIXELS_PER_TOKEN_SIDE


def denoise(
    transformer: Callable,
    inputs: dict[str, Any],
    *,
    steps: int = 28,
    height: int,
    width: int,
    true_cfg: bool = False,
    true_cfg_scale: float = 4.0,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run `steps` FlowMatch Euler steps from seeded noise; return the final target latents."""
    hidden = inputs["hidden_states"]
    target_tokens = (height // PIXELS_PER_TOKEN_SIDE) * (width // PIXELS_PER_TOKEN_SIDE)
    condition = hidden[:, target_tokens:]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(hidden[:, :target_tokens].shape, generator=generator, dtype=torch.float32).to(hidden)
    negative = None
    if true_cfg:
        negative = torch.randn(inputs["encoder_hidden_states"].shape, generator=generator).to(inputs["encoder_hidden_states"])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    batch = hidden.shape[0]
    for index, t in enumerate(scheduler.timesteps):
        call = dict(inputs, hidden_states=torch.cat([latents, condition], dim=1),
                    timestep=(t / 1000).expand(batch).to(hidden.dtype))
        prediction = transformer(**call)[0][:, :target_tokens]
        if negative is not None:
            negative_prediction = transformer(**dict(call, encoder_hidden_states=negative))[0][:, :target_tokens]
            prediction = negative_prediction + true_cfg_scale * (prediction - negative_prediction)
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(index)
    return latents
