"""Shared by the pipeline tests and their multi-process workers: one small generation per model."""

from __future__ import annotations

import torch

HEIGHT = WIDTH = 128
STEPS = 2


def edit_image(index: int = 0, side: int = 64):
    from npu_dit.tools.generate import _test_image

    return _test_image(index, side)


def call_kwargs(spec, *, prompt: str = "a cat on a chair", images=None, seed: int = 0, output_type: str = "np",
                steps: int = STEPS, negative: bool = False) -> dict:
    kwargs = dict(prompt=prompt, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed), output_type=output_type)
    if spec.max_input_images:
        images = images if images is not None else [edit_image(0)]
        kwargs["image"] = images if spec.max_input_images > 1 else images[0]
    if spec.transformer_cls != "FluxTransformer2DModel":
        kwargs["true_cfg_scale"] = 4.0 if negative else 1.0
    if negative:
        kwargs["negative_prompt"] = "blurry"
    return kwargs


def generate(pipe, spec, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoised latents, decoded image) of one generation: the latents after the last step are taken
    by the pipeline's step-end callback."""
    seen = {}

    def keep_latents(pipe, step, timestep, tensors):
        seen["latents"] = tensors["latents"].detach().clone()
        return tensors

    with torch.no_grad():
        image = pipe(**call_kwargs(spec, output_type="np", **kw), callback_on_step_end=keep_latents).images
    return seen["latents"].float(), torch.as_tensor(image).float()
