"""Rank functions for tests/test_cfg_parallel.py: whole tiny pipelines through `npu_dit.parallelize`."""

from __future__ import annotations

import warnings

import torch

CACHE = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 1, "residual_diff_threshold": 0.5}
STEPS = 3


def case_kwargs(model: str, *, true_cfg: bool = True, steps: int = STEPS) -> dict:
    """One generation's arguments: the prompt and a shorter negative prompt (other text lengths);
    FLUX.1-dev with true_cfg_scale=2 (or without true CFG: one transformer call per step)."""
    from npu_dit.models import get_model
    from tests.pipeline_cases import call_kwargs

    spec = get_model(model)
    kwargs = call_kwargs(spec, negative=true_cfg, steps=steps)
    if true_cfg and spec.transformer_cls == "FluxTransformer2DModel":
        kwargs["true_cfg_scale"] = 2.0
    return kwargs


def _change_prompt(pipe, step, timestep, tensors):
    """A step-end callback that changes the prompt's embeddings after the second step (a public way to
    change one branch's text inputs mid-run, once the pairing is learnt and used: it no longer fits)."""
    if step == 1:
        tensors["prompt_embeds"] = tensors["prompt_embeds"] * 0.5
    return tensors


def generate(model: str, *, true_cfg: bool = True, cache: dict | None = None, change_prompt: bool = False, **options):
    """The image (float32) of one generation, with what CFG parallelism did and the warnings raised."""
    import npu_dit
    from npu_dit.backend import RECORDS
    from npu_dit.pipelines import load_pipeline

    RECORDS.clear()
    pipe = load_pipeline(model)
    if options or cache is not None:
        npu_dit.parallelize(pipe, cache=cache, **options)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        extra = ({"callback_on_step_end": _change_prompt, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
                 if change_prompt else {})
        image = pipe(**case_kwargs(model, true_cfg=true_cfg), **extra).images
    pairing = getattr(pipe.transformer, "pairing", None)
    result = {
        "image": torch.as_tensor(image).float(),
        "warnings": [str(w.message) for w in caught if "CFG parallelism" in str(w.message)],
        "parallel_steps": pairing.parallel_steps if pairing is not None else 0,
        "rewritten": [not r.report.fell_back and r.parallel is not None for r in RECORDS],
    }
    if cache is not None:
        from npu_dit.runtime.cache import latest

        result["cached"] = {b: v["cached"] for b, v in latest().summary()["branches"].items()}
    return result


def cfg_cases(rank, world_size, cases):
    """Each (name, model, kwargs) case's result on this rank."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    return {name: generate(model, **kw) for name, model, kw in cases}
