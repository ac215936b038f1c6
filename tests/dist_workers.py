"""Functions the multi-process tests run on every rank (importable by spawned processes)."""

from __future__ import annotations

import os
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def compile_and_run(model, inputs, options):

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
    with torch.no_grad():
        return compiled(**inputs)[0]


def run_cases(rank, world_size, cases):
    """cases: list of (name, tiny-call key, input overrides, config overrides, options).
    Returns {name: (output, report counts, fell_back)}."""
    from npu_dit.backend import RECORDS
    from tests.conftest import tiny_model_and_inputs

    results = {}
    for name, key, overrides, config_overrides, options in cases:
        _, model, inputs = tiny_model_and_inputs(key, config_overrides=config_overrides, **overrides)
        out = compile_and_run(model, inputs, {"ulysses_degree": world_size, **options})
        report = RECORDS[-1].report
        results[name] = (out, report.counts, report.fell_back, report.fallback_reason)
    return results


def fail_midway(rank, world_size):
    """Rank 1 dies between two denoising steps; the others must fail within the group timeout."""
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux")
    compiled_out = compile_and_run(model, inputs, {"ulysses_degree": world_size})
    if rank == 1:
        os._exit(3)

    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
    start = time.monotonic()
    try:
        with torch.no_grad():
            for _ in range(3):
                compiled(**inputs)
    except Exception as exc:  # noqa: BLE001
        return {"error_type": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start,
                "first_output_finite": bool(torch.isfinite(compiled_out).all())}
    return {"error_type": None, "seconds": time.monotonic() - start}


def hypothesis_attention(rank, world_size, max_examples):
    """Property test on every rank with the same derandomised examples (ranks stay in lockstep).

    hypothesis draws the examples; each model (head count, head dim) is compiled once and serves
    every example drawn for it, as a user's compiled model serves calls of other lengths (Dynamo
    recompiles by itself where a guard fails: a mask, a batch of 1)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from npu_dit.backend import RECORDS
    from tests.synthetic import JointAttention

    examples = []

    @settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(
        # length 1 is specialised by Dynamo and falls back (tested separately); 2..P-1 leaves ranks empty
        text_len=st.integers(2, 13),
        image_len=st.integers(2, 40),
        heads=st.integers(1, 5),
        head_dim=st.sampled_from([4, 8]),
        batch=st.integers(1, 2),
        masked=st.booleans(),
    )
    def draw(text_len, image_len, heads, head_dim, batch, masked):
        examples.append((text_len, image_len, heads, head_dim, batch, masked))

    draw()
    failures = []
    for heads, head_dim in sorted({(e[2], e[3]) for e in examples}):
        torch._dynamo.reset()
        torch.manual_seed(heads * 100 + head_dim)
        model = JointAttention(heads=heads, head_dim=head_dim).eval()
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
        last = RECORDS[-1] if RECORDS else None
        for text_len, image_len, _, _, batch, masked in (e for e in examples if e[2:4] == (heads, head_dim)):
            torch.manual_seed(text_len * 1000 + image_len)
            inputs = model.example_inputs(batch, text_len, image_len, masked=masked)
            with torch.no_grad():
                expected = model(**inputs)[0]
                out = compiled(**inputs)[0]
            err = (out - expected).abs().max().item()
            if not err <= 1e-5:
                failures.append((text_len, image_len, heads, head_dim, batch, masked, err, None))
        new = []
        for record in reversed(RECORDS):  # the graphs compiled for this model
            if record is last:
                break
            new.append(record)
        if not new:
            failures.append((heads, head_dim, "never compiled"))
        failures += [(heads, head_dim, r.report.fallback_reason) for r in new if r.report.fell_back]
    return failures
