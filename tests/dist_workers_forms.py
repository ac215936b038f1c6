"""Rank functions for tests/test_op_forms.py: each form compiled through the public call."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore")


def _compile_and_call(model, options, *args, **kwargs):
    """(first output, None), or (None, the error) where the compiled call raised."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
    try:
        with torch.no_grad():
            return compiled(*args, **kwargs)[0], None
    except Exception as exc:  # noqa: BLE001 - reported per form
        return None, f"{type(exc).__name__}: {exc}"


def token_forms(rank, world_size, forms):
    from npu_dit.backend import RECORDS
    from npu_dit.plans import SHARDING_META_KEY
    from tests.forms import TokenForm

    results = {}
    for form in forms:
        torch.manual_seed(0)
        model = TokenForm(form).eval()
        inputs = model.example_inputs(1, 5, 13, masked=False)
        out, error = _compile_and_call(model, {"ulysses_degree": world_size}, **inputs)
        if error is not None:
            results[form] = (None, None, error)
            continue
        record = RECORDS[-1]
        plan = None if record.report.fell_back else record.graph.meta.get(SHARDING_META_KEY)
        # the image tokens (the form's operand) stay whole if the pass refused or kept their stream replicated
        image_whole = plan is None or not any(s.sharded and "image" in s.name for s in plan.streams)
        results[form] = (out, image_whole, record.report.fallback_reason or "; ".join(
            f"{s.name}: {s.reason}" for s in plan.streams if not s.sharded) if plan else record.report.fallback_reason)
    return results


def single_stream_forms(rank, world_size, forms):
    """(output, fell back, tokens gathered into an op, reason) of each form on one token stream."""
    from npu_dit.backend import RECORDS
    from tests.forms import SingleStreamForm

    results = {}
    for form in forms:
        torch.manual_seed(0)
        model = SingleStreamForm(form).eval()
        image = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(3))
        out, error = _compile_and_call(model, {"ulysses_degree": world_size}, image)
        if error is not None:
            results[form] = (None, None, 0, error)
            continue
        report = RECORDS[-1].report
        gathers = dict(getattr(report, "counts", {}) or {}).get("gather_before_mixing", 0)
        results[form] = (out, report.fell_back, gathers, report.fallback_reason or "")
    return results


def feature_forms(rank, world_size, forms):
    from npu_dit.backend import RECORDS
    from npu_dit.plans import TP_META_KEY
    from tests.forms import FeatureForm

    results = {}
    for form in forms:
        torch.manual_seed(0)
        model = FeatureForm(form).eval()
        x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
        out, error = _compile_and_call(model, {"tp_degree": world_size, "release_weights": False}, x)
        if error is not None:
            results[form] = (None, {}, error)
            continue
        record = RECORDS[-1]
        plan = record.graph.meta.get(TP_META_KEY)
        placements = {module: kind for module, kind, _ in plan.placements} if plan is not None else {}
        results[form] = (out, placements, record.report.fallback_reason or "")
    return results
