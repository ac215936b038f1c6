"""Rank functions for tests/test_sound_sharding.py (importable by spawned processes). Each compiles
through the public API only."""

from __future__ import annotations

import time
import warnings

import torch

warnings.filterwarnings("ignore")


def build(model_name, config_overrides, kwargs):
    from npu_dit.models import build_transformer, get_model

    spec = get_model(model_name)
    config = spec.config("tiny", **config_overrides)
    model = build_transformer(spec, config, seed=0)
    return model, spec.example_inputs(config, **kwargs)


def public_cases(rank, world_size, cases):
    from npu_dit.backend import RECORDS
    from npu_dit.plans import SHARDING_META_KEY

    results = {}
    for name, model_name, config_overrides, kwargs, options in cases:
        model, inputs = build(model_name, config_overrides, kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size, **options})
        with torch.no_grad():
            out = compiled(**inputs)[0]
        record = RECORDS[-1]
        plan = record.graph.meta.get(SHARDING_META_KEY)
        streams = [(s.name, s.sharded, s.reason) for s in plan.streams] if plan is not None else []
        results[name] = (out, record.report.fell_back, record.report.fallback_reason, streams)
    return results


def token_mixing(rank, world_size, kinds):
    from npu_dit.backend import RECORDS
    from npu_dit.plans import SHARDING_META_KEY
    from tests.synthetic import JointAttention, TokenMixing

    results = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = (TokenMixing(kind) if kind != "none" else JointAttention(2, 8)).eval()
        inputs = model.example_inputs(1, 5, 12, masked=False)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
        with torch.no_grad():
            out = compiled(**inputs)[0]
        record = RECORDS[-1]
        plan = None if record.report.fell_back else record.graph.meta.get(SHARDING_META_KEY)
        # the image tokens stay whole if the pass refused, or kept their stream replicated (with the reason)
        image = [s for s in plan.streams if "image" in s.name] if plan is not None else []
        image_whole = plan is None or not any(s.sharded for s in image)
        reason = record.report.fallback_reason or "; ".join(s.reason for s in image if not s.sharded)
        results[kind] = (out, record.report.fell_back, image_whole, reason)
    return results


def mismatched_shapes(rank, world_size):
    """Rank 1 is given a longer prompt than rank 0: every rank must raise RankMismatchError."""
    model, inputs = build("flux.1-dev", {}, dict(height=128, width=128, prompt_len=12 + 3 * rank))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
    start = time.monotonic()
    try:
        with torch.no_grad():
            compiled(**inputs)
    except Exception as exc:  # noqa: BLE001
        cause = exc
        while cause.__cause__ is not None and type(cause).__name__ != "RankMismatchError":
            cause = cause.__cause__
        return type(cause).__name__, str(cause), time.monotonic() - start
    return None, "no error", time.monotonic() - start


def patch_cases():
    """(name, model factory, inputs) of DiTs whose tokens are patchified inside the graph."""
    from tests.synthetic import PairMaskedAttention, PatchDiT, tiny_pixart, tiny_sd3

    def sd3():
        return tiny_sd3(10, 8, torch.Generator().manual_seed(1))

    def pixart():  # at its own sample size: the pos_embed buffer is the grid's size, the grid static
        return tiny_pixart(10, 10, torch.Generator().manual_seed(1))

    def synthetic(height=10, **kwargs):
        def make():
            torch.manual_seed(0)
            model = PatchDiT(**kwargs).eval()
            return model, model.example_inputs(1, height, 8)  # 5 patch rows: uneven on 2 and 4 ranks
        return make

    def pair_masked(tail):
        def make():
            torch.manual_seed(0)
            model = PairMaskedAttention(tail).eval()
            return model, model.example_inputs(2, 11)  # 11 tokens: uneven on 2 and 4 ranks
        return make

    return {"pair-mask": pair_masked("none"), "pair-mask-drop-first": pair_masked("drop_first"),
            "pair-mask-token-mean": pair_masked("token_mean"), "pair-mask-pooled-query": pair_masked("pooled_query"),
            "conv-patchify": synthetic(), "reshape-patchify": synthetic(patchify="reshape"),
            "tokens-out": synthetic(patchify="reshape", unpatchify=False),
            "overlapping-conv": synthetic(kernel=3), "sd3": sd3, "pixart": pixart,
            "three-patch-rows": synthetic(height=6),
            "mixed-after-patchify": synthetic(patchify="reshape", mix=True)}  # fewer patch rows than 4 ranks: one rank holds none


PATCH_OPTIONS = {"sd3": {"async_ulysses": True}}  # beyond ulysses_degree, per case


def patch_models(rank, world_size, names, options=None):
    from npu_dit.backend import RECORDS
    from npu_dit.passes.analysis.token_dims import input_name
    from npu_dit.plans import SHARDING_META_KEY

    results = {}
    for name in names:
        model, inputs = patch_cases()[name]()
        torch._dynamo.reset()
        case_options = {"ulysses_degree": world_size, **PATCH_OPTIONS.get(name, {}), **(options or {}).get(name, {})}
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=case_options)
        with torch.no_grad():
            out = compiled(**inputs)[0]
        record = RECORDS[-1]
        plan = record.graph.meta.get(SHARDING_META_KEY)
        names = {i: input_name(n) for i, n in enumerate(
            n for n in record.graph.graph.nodes if n.op == "placeholder")}
        structure = None
        if plan is not None:
            structure = {
                "shard_inputs": sorted((names[ph], dim) for ph, dim, _ in plan.shard_inputs),
                "grids": [(names[s.grid[0]],) + tuple(s.grid[1:]) for s in plan.streams if s.grid and s.sharded],
                "output_gathers": [(o.index, o.dim) for o in plan.outputs],
                "counts": dict(record.report.counts) if hasattr(record.report, "counts") else {},
            }
        results[name] = (out, record.report.fell_back, record.report.fallback_reason or "", structure)
    return results
