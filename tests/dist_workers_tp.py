"""Rank functions for tests/test_tensor_parallel.py (importable by spawned processes). Each compiles
through the public API only and compares with the eager run of the same model on the same rank
(taken before compiling: tensor parallelism releases the full weights)."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore")


def _compile_counter():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def transformer_cases(rank, world_size, cases):
    """cases: (name, model, config overrides, input kwargs, options). Returns per case the max abs
    error against eager, the placements, the report counts and the parameter bytes."""
    from npu_dit.backend import RECORDS
    from npu_dit.models import build_transformer, count_parameters, get_model
    from npu_dit.plans import TP_META_KEY
    from npu_dit.runtime.weights import held_bytes

    results = {}
    for name, model_name, overrides, kwargs, options in cases:
        spec = get_model(model_name)
        config = spec.config("tiny", **overrides)
        model = build_transformer(spec, config, seed=0)
        inputs = spec.example_inputs(config, **kwargs)
        with torch.no_grad():
            expected = model(**inputs)[0]
        torch._dynamo.reset()
        before = _compile_counter()
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
        with torch.no_grad():
            out = compiled(**inputs)[0]
            again = compiled(**inputs)[0]
        record = RECORDS[-1]
        tp = record.graph.meta.get(TP_META_KEY)
        results[name] = {
            "err": (out - expected).abs().max().item(),
            "err_again": (again - expected).abs().max().item(),
            "fell_back": record.report.fell_back,
            "reason": record.report.fallback_reason,
            "placements": tp.placements if tp is not None else [],
            "counts": record.report.counts,
            "graphs": _compile_counter() - before,
            "param_bytes": count_parameters(model)[1],
            "held_bytes": held_bytes(model),
            "plan_local_bytes": tp.local_parameter_bytes if tp is not None else None,
            "plan_bytes": tp.parameter_bytes if tp is not None else None,
        }
    return results


def encoder_cases(rank, world_size, cases):
    """cases: (name, text encoder spec name, config overrides, length, options) — TEP through the
    public call on T5EncoderModel and the Qwen2.5-VL language model."""
    from npu_dit.backend import RECORDS
    from npu_dit.models import count_parameters
    from npu_dit.models.text_encoders import TEXT_ENCODERS, build_text_encoder
    from npu_dit.plans import TP_META_KEY
    from npu_dit.runtime.weights import held_bytes

    results = {}
    for name, encoder, overrides, length, options in cases:
        spec = TEXT_ENCODERS[encoder]
        config = spec.config("tiny", **overrides)
        model = build_text_encoder(spec, config, seed=0)
        inputs = spec.example_inputs(config, 1, length)
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state
        torch._dynamo.reset()
        before = _compile_counter()
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
        with torch.no_grad():
            out = compiled(**inputs).last_hidden_state
            again = compiled(**inputs).last_hidden_state
        record = RECORDS[-1]
        tp = record.graph.meta.get(TP_META_KEY)
        results[name] = {
            "err": (out - expected).abs().max().item(),
            "err_again": (again - expected).abs().max().item(),
            "fell_back": record.report.fell_back,
            "reason": record.report.fallback_reason,
            "placements": tp.placements if tp is not None else [],
            "counts": record.report.counts,
            "graphs": _compile_counter() - before,
            "param_bytes": count_parameters(model)[1],
            "held_bytes": held_bytes(model),
        }
    return results


TRANSFORMER_CASES_2 = [
    ("flux", "flux.1-dev", {}, dict(height=128, width=128, prompt_len=12), {"tp_degree": 2}),
    ("qwen-edit-2509", "qwen-image-edit-2509", {}, dict(height=96, width=96, prompt_len=8, input_images=[(64, 64), (96, 64)]),
     {"tp_degree": 2}),
]
ENCODER_CASES_2 = [
    ("t5", "t5-v1.1-xxl", {}, 12, {"tp_degree": 2}),
    # one K/V head for 4 query heads: K/V stay replicated, each rank slices its repeated heads
    ("qwen-lm-kv-sliced", "qwen2.5-vl-7b-lm", {"num_key_value_heads": 1}, 12, {"tp_degree": 2}),
]


def grouped_query_attention(rank, world_size):
    """K/V heads grouped by SDPA itself (enable_gqa=True), too few to split: repeated, then sliced."""
    from npu_dit.backend import RECORDS
    from tests.synthetic import GroupedQueryAttention

    torch.manual_seed(0)
    model = GroupedQueryAttention(heads=4, kv_heads=1, head_dim=8)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = model(x)[0]
        out = torch.compile(model, backend="npu_dit", dynamic=True, options={"tp_degree": world_size})(x)[0]
    report = RECORDS[-1].report
    return {"err": (out - expected).abs().max().item(), "fell_back": report.fell_back, "counts": report.counts}


def two_rank_cases(rank, world_size):
    results = {"gqa": grouped_query_attention(rank, world_size)}
    results.update(transformer_cases(rank, world_size, TRANSFORMER_CASES_2))
    results.update(encoder_cases(rank, world_size, ENCODER_CASES_2))
    results["pipeline"] = pipeline_tep(rank, world_size, "flux.1-dev")
    return results


FOUR_RANK_CASES = [
    ("flux-ulysses2-tp2", "flux.1-dev", {}, dict(height=128, width=112, prompt_len=7),
     {"ulysses_degree": 2, "tp_degree": 2}),
    ("flux-tp4", "flux.1-dev", {}, dict(height=96, width=128, prompt_len=9), {"tp_degree": 4}),
    ("qwen-edit-tp4", "qwen-image-edit", {}, dict(height=96, width=128, prompt_len=9), {"tp_degree": 4}),
    ("qwen-edit-2509-tp4", "qwen-image-edit-2509", {}, dict(height=96, width=96, prompt_len=8, input_images=[(64, 64), (96, 64)]),
     {"tp_degree": 4}),
]
ENCODER_CASES_4 = [
    ("t5-tp4", "t5-v1.1-xxl", {}, 12, {"tp_degree": 4}),
    ("qwen-lm-tp4", "qwen2.5-vl-7b-lm", {}, 12, {"tp_degree": 4}),
]


def four_rank_cases(rank, world_size):
    results = transformer_cases(rank, world_size, FOUR_RANK_CASES)
    results.update(encoder_cases(rank, world_size, ENCODER_CASES_4))
    return results


def pipeline_tep(rank, world_size, model_name):
    """npu_dit.parallelize(pipe, tp_degree=world, text_encoder_parallel=True) against the serial
    pipeline: the prompt embeddings and the denoised latents."""
    import npu_dit
    from npu_dit.backend import RECORDS
    from npu_dit.models import get_model
    from npu_dit.pipelines import load_pipeline
    from npu_dit.plans import TP_META_KEY
    from tests.pipeline_cases import generate

    spec = get_model(model_name)
    serial = load_pipeline(spec)
    serial.set_progress_bar_config(disable=True)
    expected, _ = generate(serial, spec)
    torch._dynamo.reset()
    pipe = npu_dit.parallelize(load_pipeline(spec), tp_degree=world_size, text_encoder_parallel=True)
    pipe.set_progress_bar_config(disable=True)
    latents, _ = generate(pipe, spec)
    compiled = {r.tag: (r.report.fell_back, [k for _, k, _ in r.graph.meta[TP_META_KEY].placements]
                        if TP_META_KEY in r.graph.meta else []) for r in RECORDS}
    return {"err": (latents - expected).abs().max().item(), "text_encoders": pipe._npu_dit_parallel["text_encoders"],
            "graphs": compiled}
