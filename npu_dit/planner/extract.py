"""Read a model's costs from its graphs once (the slow part: a Dynamo capture of the full-size transformer on
the meta device, ~35 s on a 2-core machine, and one Ulysses-2 and one TP-2 pass run, ~8 s each); the result is
a plain dict that `model.py` evaluates for every configuration in milliseconds. It is cached on disk
(`~/.cache/npu-dit/plan/`, or $NPU_DIT_PLAN_CACHE) per model, size, geometry, dtype and torch/diffusers version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from npu_dit.planner.costs import graph_cost, module_cost, overlap_windows, split_by_degree

CACHE_VERSION = 5
# the text encoders' and VAE's costs: cheap to count again (meta-device module runs), so a change to them
# refreshes a cached entry's stages without capturing the transformer again
STAGES_VERSION = 3


def cache_dir() -> Path:
    return Path(os.environ.get("NPU_DIT_PLAN_CACHE", Path.home() / ".cache" / "npu-dit" / "plan"))


# the edit pipelines resize their input image to about 1024x1024 pixels whatever the output size
# (QwenImageEditPipeline: calculate_dimensions(1024 * 1024, aspect ratio))
EDIT_INPUT_IMAGE = (1024, 1024)


def model_costs(model: str, *, size: str = "full", height: int = 1024, width: int = 1024, prompt_len: int | None = None,
                input_images: list[tuple[int, int]] | None = None, dtype: torch.dtype = torch.bfloat16,
                use_cache: bool = True, log=None) -> dict[str, Any]:
    import diffusers

    from npu_dit.models import get_model

    if input_images is None:
        input_images = [EDIT_INPUT_IMAGE] if get_model(model).max_input_images else []
    input_images = [tuple(map(int, hw)) for hw in input_images]
    key = json.dumps([CACHE_VERSION, model, size, height, width, prompt_len, input_images, str(dtype),
                      torch.__version__, diffusers.__version__])
    path = cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if use_cache and path.is_file():
        costs = json.loads(path.read_text())
        if costs.get("stages_version") != STAGES_VERSION:
            spec = get_model(model)
            costs["stages"] = stage_costs(spec, size, height=height, width=width, input_images=input_images,
                                          prompt_len=prompt_len or spec.default_prompt_len, dtype=dtype)
            costs["stages_version"] = STAGES_VERSION
            path.write_text(json.dumps(costs))
        return costs
    costs = _extract(model, size=size, height=height, width=width, prompt_len=prompt_len, input_images=input_images,
                     dtype=dtype, log=log)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(costs))
    return costs


def _extract(model: str, *, size: str, height: int, width: int, prompt_len: int | None,
             input_images: list[tuple[int, int]], dtype: torch.dtype, log) -> dict[str, Any]:
    from npu_dit.config import CompileConfig
    from npu_dit.models import build_transformer, get_model
    from npu_dit.passes.analysis import attention_sites
    from npu_dit.passes.infra import run_passes
    from npu_dit.passes.pipeline import build_pipeline
    from npu_dit.plans import SHARDING_META_KEY, TP_META_KEY
    from npu_dit.runtime.dist import inspection_context
    from npu_dit.tools.capture import capture_graph
    from npu_dit.tools.collective_report import collective_report, tp_collectives

    say = log or (lambda *a: None)
    spec = get_model(model)
    config = spec.config(size)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    transformer = build_transformer(spec, config, device="meta", dtype=dtype)
    inputs = spec.example_inputs(config, height=height, width=width, prompt_len=prompt_len, input_images=input_images,
                                 device="meta", dtype=dtype)
    say(f"capturing {spec.transformer_cls} ({size}) on the meta device")
    captured = capture_graph(transformer, inputs, dynamic=True)
    gm = captured.gm
    timings["capture_s"] = time.perf_counter() - t0
    sites = attention_sites(gm)
    heads = sites[0].num_heads if sites else 1
    head_dim = sites[0].head_dim if sites else 0
    serial = graph_cost(gm)

    result: dict[str, Any] = {
        "model": spec.name, "size": size, "height": height, "width": width, "dtype": str(dtype).removeprefix("torch."),
        "prompt_len": prompt_len or spec.default_prompt_len, "input_images": input_images, "heads": heads, "head_dim": head_dim,
        "default_steps": spec.default_steps, "true_cfg": spec.true_cfg, "transformer": serial.to_dict(),
        "ulysses": None, "tp": None,
    }

    t0 = time.perf_counter()
    say("async Ulysses-2 passes (rank 0)")
    ctx = inspection_context(2, rank=0)
    # the async schedule: the same nodes and collectives as the synchronous graph, plus the windows between
    # each collective's start and its wait that the transfers can hide behind
    options = {"ulysses_degree": 2, "async_ulysses": True}
    rewritten, report = run_passes(gm, build_pipeline(CompileConfig.from_options(options), ctx, None))
    plan = rewritten.meta.get(SHARDING_META_KEY) if not report.fell_back else None
    if plan is not None:
        comm = collective_report(rewritten, plan, ctx, captured.real_inputs, len(sites), heads * head_dim)
        kinds = comm["collectives"]
        result["ulysses"] = {
            "split": split_by_degree(serial, graph_cost(rewritten)),
            "qkv_bytes_at_2": sum(v["bytes"] for k, v in kinds.items() if "seq->heads" in k),
            "out_bytes_at_2": sum(v["bytes"] for k, v in kinds.items() if "seq->heads" not in k),
            "collectives_at_2": sum(v["count"] for v in kinds.values()),
            "async_windows_at_2": overlap_windows(rewritten),
        }
    else:
        result["ulysses_refused"] = report.fallback_reason
    timings["ulysses_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("TP-2 pass (rank 0)")
    tp_ctx = inspection_context(2, rank=0)
    rewritten, report = run_passes(gm, build_pipeline(CompileConfig.from_options({"tp_degree": 2}), None, tp_ctx))
    tp_plan = rewritten.meta.get(TP_META_KEY) if not report.fell_back else None
    if tp_plan is not None:
        kinds = tp_collectives(rewritten, tp_plan, captured.real_inputs)
        at_two = graph_cost(rewritten)
        at_two.parameter_bytes = tp_plan.local_parameter_bytes
        split = split_by_degree(dataclasses.replace(serial, parameter_bytes=tp_plan.parameter_bytes), at_two)
        result["tp"] = {
            "split": split,
            "all_reduce_bytes": sum(v["bytes"] for k, v in kinds.items() if "all_reduce" in k),
            "all_gather_bytes_at_2": sum(v["bytes"] for k, v in kinds.items() if "all_reduce" not in k),
            "collectives": sum(v["count"] for v in kinds.values()),
        }
    else:
        result["tp_refused"] = report.fallback_reason
    timings["tp_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("text encoders and VAE on the meta device")
    result["stages"] = stage_costs(spec, size, height=height, width=width, input_images=input_images,
                                   prompt_len=prompt_len or spec.default_prompt_len, dtype=dtype)
    result["stages_version"] = STAGES_VERSION
    timings["stages_s"] = time.perf_counter() - t0
    result["extract_timings"] = timings
    return result


def stage_costs(spec, size: str, *, height: int, width: int, input_images: list[tuple[int, int]], prompt_len: int,
                dtype: torch.dtype) -> dict[str, Any]:
    """{"text_encoders": [cost...], "text_encodes": n, "vae": [cost...]} for one image: each encoder once per
    prompt (true CFG: a positive and a negative prompt), the VAE's decode and an edit model's encode of each
    input image."""
    flux = spec.transformer_cls == "FluxTransformer2DModel"
    encoders, vae_parts = [], []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if size == "full":
            from npu_dit.models.text_encoders import (
                QWEN25_VL_7B_LM,
                T5_XXL,
                build_text_encoder,
            )
            from npu_dit.models.vae import build_vae

            if flux:
                from transformers import CLIPTextConfig, CLIPTextModel

                with torch.device("meta"):  # CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14)
                    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, max_position_embeddings=77))
                encoders = [(clip, 77), (build_text_encoder(T5_XXL, T5_XXL.config("full"), device="meta"), 512)]
            else:
                lm = build_text_encoder(QWEN25_VL_7B_LM, QWEN25_VL_7B_LM.config("full"), device="meta")
                encoders = [(lm, prompt_len)]
            # built under the default dtype set above (a .to(dtype) would make diffusers warn)
            vae = build_vae("flux" if flux else "qwen-image", "full", device="meta")
        else:
            from npu_dit.pipelines.tiny import flux_components, qwen_components

            if flux:
                parts = flux_components(spec, 0, size)
                encoders = [(parts["text_encoder"], 77), (parts["text_encoder_2"], 512)]
            else:
                parts = qwen_components(spec, 0, size)
                encoders = [(parts["text_encoder"].model.language_model, prompt_len)]
            vae = parts["vae"]
    finally:
        torch.set_default_dtype(previous)

    text = []
    for module, tokens in encoders:
        cost = module_cost(module, lambda m, n=tokens: m(input_ids=torch.zeros(1, n, dtype=torch.long, device="meta")))
        c = module.config  # TEP's two all-reduces per layer carry the hidden states
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "num_layers", 0)
        hidden = getattr(c, "hidden_size", None) or getattr(c, "d_model", 0)
        text.append({**cost.to_dict(), "layers": layers, "hidden_bytes": tokens * hidden * dtype.itemsize})
    vae = vae.to("meta")
    channels = vae.config.latent_channels if flux else vae.config.z_dim
    frame = () if flux else (1,)
    vae_parts.append(module_cost(vae, lambda v: v.decode(
        torch.zeros(1, channels, *frame, height // 8, width // 8, device="meta", dtype=dtype))).to_dict())
    for image_height, image_width in input_images:
        vae_parts.append(module_cost(vae, lambda v, h=image_height, w=image_width: v.encode(
            torch.zeros(1, 3, *frame, h, w, device="meta", dtype=dtype))).to_dict())
    return {"text_encoders": text, "text_encodes": 2 if spec.true_cfg else 1, "vae": vae_parts}
