"""CFG parallelism (`parallelize(cfg_parallel=True)`, `generate --cfg-parallel`): the two true-CFG
calls of each step on two rank groups at once, every image equal to the one-process image."""

import itertools

import numpy as np
import pytest

import npu_dit
from npu_dit.pipelines import load_pipeline
from tests.dist_utils import run_ranks
from tests.dist_workers_cfg import CACHE, STEPS, cfg_cases, generate

TOL = 1e-4


_REFERENCES: dict[str, dict] = {}  # one-process results by (model, reference arguments), for the session


def _references(cases):
    """The one-process image of each case: the plain pipeline (with the cache: parallelize on one process).
    Cases with the same reference (CFG-2 x Ulysses-2 and CFG-2 x TP-2 of one model; FLUX.1-dev in both
    multi-rank tests) share one generation: it is deterministic (seeded weights, inputs and generator)."""
    out = {}
    for name, model, kw in cases:
        reference = {k: v for k, v in kw.items()
                     if k in ("true_cfg", "cache", "change_prompt", "own_loop_change_at", "negatives")}
        key = repr((model, sorted(reference.items())))
        if key not in _REFERENCES:
            _REFERENCES[key] = generate(model, **reference)
        out[name] = _REFERENCES[key]
    return out


def _check(records, references, cases, *, paired_steps):
    for name, _, kw in cases:
        want = references[name]
        for rank, record in enumerate(records):
            got = record["result"][name]
            diff = float((got["image"] - want["image"]).abs().max())
            assert diff <= TOL, (name, rank, diff)
            if kw.get("change_prompt"):  # learnt at step 0, paired at step 1; step 2 no longer fits: serial, one warning
                assert got["parallel_steps"] == 1 and len(got["warnings"]) == 1, (name, rank, got)
                assert "text inputs are not those" in got["warnings"][0]
            elif kw.get("own_loop_change_at") is not None:
                # paired from step 1 on; the second call of the changed step was not the predicted one:
                # computed by the negative branch after the first, one warning, every output exact
                assert got["parallel_steps"] == paired_steps and len(got["warnings"]) == 1, (name, rank, got)
                assert "second call of a step was not the predicted one" in got["warnings"][0]
            elif kw.get("negatives"):
                # generations on one pipeline: the first learns the pairing at its first step; a later one
                # with the same negative prompt runs every step paired (the pattern carried over); a new
                # negative prompt misses the carried guess at the first step and learns there, silently
                negatives = kw["negatives"]
                steps = [paired_steps] + [paired_steps + (new == old) for old, new in itertools.pairwise(negatives)]
                assert got["parallel_steps"] == steps and not got["warnings"], (name, rank, got["parallel_steps"], got["warnings"])
            elif kw.get("true_cfg", True):
                # the first step learns the pattern (serial); every later step ran both branches at once
                assert got["parallel_steps"] == paired_steps, (name, rank, got)
                assert not got["warnings"], (name, rank, got["warnings"])
            else:
                assert got["parallel_steps"] == 0 and len(got["warnings"]) == 1, (name, rank, got)
                assert "one after the other" in got["warnings"][0]


@pytest.mark.slow
def test_cfg_2_on_two_ranks_equals_one_process(tmp_path):
    cases = [
        ("edit-2509", "qwen-image-edit-2509", {"cfg_parallel": True}),
        ("flux", "flux.1-dev", {"cfg_parallel": True}),
        ("edit+cache", "qwen-image-edit",  # three generations on one pipeline: same, same, new negative prompt
         {"cfg_parallel": True, "cache": CACHE, "negatives": ("blurry", "blurry", "blurry, dark, low quality, noisy")}),
        ("flux, one call per step", "flux.1-dev", {"cfg_parallel": True, "true_cfg": False}),
        ("flux, prompt changed after step 1", "flux.1-dev", {"cfg_parallel": True, "change_prompt": True}),
        ("flux, own loop, latents changed between the calls of step 2", "flux.1-dev",
         {"cfg_parallel": True, "own_loop_change_at": 2}),
    ]
    references = _references(cases)
    records = run_ranks(cfg_cases, 2, tmp_path, timeout=900, group_timeout=300, cases=cases)
    _check(records, references, cases, paired_steps=STEPS - 1)
    # the cache under CFG-2: each branch (rank) keeps its own state and caches steps, as one process does
    cached = [r["result"]["edit+cache"]["cached"] for r in records]
    assert cached[0] and cached[1] and any(steps for steps in cached[0].values()), cached


@pytest.mark.slow
def test_cfg_2_times_ulysses_2_or_tp_2_on_four_ranks_equals_one_process(tmp_path):
    cases = [
        ("edit", "qwen-image-edit", {"cfg_parallel": True, "async_ulysses": True}),
        ("flux", "flux.1-dev", {"cfg_parallel": True}),
        ("edit, TP-2", "qwen-image-edit", {"cfg_parallel": True, "tp_degree": 2}),  # CFG-2 x TP-2
    ]
    references = _references(cases)
    records = run_ranks(cfg_cases, 4, tmp_path, timeout=900, group_timeout=300, cases=cases)
    _check(records, references, cases, paired_steps=STEPS - 1)
    for rank, record in enumerate(records):  # Ulysses ran inside each branch (no graph fell back)
        for name, _, _ in cases:
            rewritten = record["result"][name]["rewritten"]
            assert rewritten and all(rewritten), (name, rank, rewritten)


def test_cfg_parallel_needs_two_processes_per_branch_layout():
    pipe = load_pipeline("flux.1-dev")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        npu_dit.parallelize(pipe, cfg_parallel=True)
    with pytest.raises(ValueError, match="True or False"):
        npu_dit.parallelize(pipe, cfg_parallel="yes")
    with pytest.raises(ValueError, match="cfg_degree"):
        npu_dit.config.CompileConfig.from_options({"cfg_degree": 3})
    assert not hasattr(pipe, "_npu_dit_parallel")


def test_cfg_degree_alone_is_an_error_naming_parallelize():
    # a backend sees graphs, not the model's calls: the compile option alone cannot pair the two
    # calls of a step (every rank would compute every call), so it names the public path that does
    import torch

    from tests.conftest import tiny_model_and_inputs
    from tests.test_backend import _root_cause

    _, model, inputs = tiny_model_and_inputs("flux")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"cfg_degree": 2, "ulysses_degree": 2})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(**inputs)
    message = str(_root_cause(info.value))
    assert isinstance(_root_cause(info.value), ValueError), message
    assert "npu_dit.parallelize(pipe, cfg_parallel=True, ulysses_degree=2)" in message, message
    assert "--cfg-parallel" in message and "drop cfg_degree" in message
