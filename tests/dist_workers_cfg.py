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


def _own_loop(pipe, model: str, *, change_at: int) -> torch.Tensor:
    """A user's own true-CFG sampler on the pipeline's transformer: per step the prompt's call, then the
    negative prompt's (other text, same latents and timestep); at step `change_at` the latents change
    between the two calls, so that second call is not the one CFG parallelism predicted. Every output."""
    from npu_dit.models import get_model

    spec = get_model(model)
    config = dict(pipe.transformer.config)
    prompt = spec.example_inputs(config, height=64, width=64, prompt_len=8, seed=0)
    negative = spec.example_inputs(config, height=64, width=64, prompt_len=8, seed=1)
    negative = {k: v for k, v in negative.items() if k in ("encoder_hidden_states", "pooled_projections")}
    latents, outs = prompt["hidden_states"], []
    for step in range(STEPS):
        t = torch.tensor([1.0 - step / STEPS])
        cond = pipe.transformer(**dict(prompt, hidden_states=latents, timestep=t))[0]
        moved = latents + 0.1 if step == change_at else latents
        uncond = pipe.transformer(**dict(prompt, **negative, hidden_states=moved, timestep=t))[0]
        outs += [cond, uncond]
        latents = latents - 0.1 * (uncond + 2.0 * (cond - uncond))
    return torch.stack(outs)


def generate(model: str, *, true_cfg: bool = True, cache: dict | None = None, change_prompt: bool = False,
             own_loop_change_at: int | None = None, negatives: tuple[str, ...] = (), **options):
    """The image (float32) of one generation, with what CFG parallelism did and the warnings raised;
    with `own_loop_change_at`, every output of `_own_loop` in place of the image; with `negatives`,
    one generation per negative prompt on the same pipeline (images stacked, parallel steps listed)."""
    import npu_dit
    from npu_dit.backend import RECORDS
    from npu_dit.pipelines import load_pipeline

    RECORDS.clear()
    pipe = load_pipeline(model)
    if options or cache is not None:
        npu_dit.parallelize(pipe, cache=cache, **options)
    if own_loop_change_at is not None:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            image = _own_loop(pipe, model, change_at=own_loop_change_at)
    else:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            extra = ({"callback_on_step_end": _change_prompt, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
                     if change_prompt else {})
            images, parallel_steps = [], []
            for negative in negatives or (None,):
                kwargs = case_kwargs(model, true_cfg=true_cfg)
                if negative is not None:
                    kwargs["negative_prompt"] = negative
                images.append(torch.as_tensor(pipe(**kwargs, **extra).images).float())
                pairing = getattr(pipe.transformer, "pairing", None)
                parallel_steps.append(pairing.parallel_steps if pairing is not None else 0)
            image = torch.stack(images) if negatives else images[0]
    pairing = getattr(pipe.transformer, "pairing", None)
    result = {
        "image": torch.as_tensor(image).float(),
        "warnings": [str(w.message) for w in caught if "CFG parallelism" in str(w.message)],
        "parallel_steps": (parallel_steps if negatives else parallel_steps[0]) if own_loop_change_at is None
        else (pairing.parallel_steps if pairing is not None else 0),
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
