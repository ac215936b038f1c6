"""Cache robustness (issue 9): generations found from what the graph does, per-thread state, shape
changes, Inductor with batch > 1, gradients, bounded settings. Everything through torch.compile."""

import threading
import tracemalloc

import pytest
import torch

import npu_dit
from npu_dit.config import CacheConfig
from npu_dit.runtime import cache as cache_runtime
from npu_dit.runtime.cache_policy import DBCachePolicy
from npu_dit.tools.denoise import denoise
from tests.conftest import tiny_model_and_inputs

CACHE = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.3, "max_warmup_steps": 2}


def compile_cached(model, cache, **extra):
    torch._dynamo.reset()
    return torch.compile(model, backend="npu_dit", dynamic=True, options={"cache": cache, **extra})


def euler_loop(fn, inputs, timesteps, *, positional=False):
    """A plain Euler loop over the given timesteps (1 = start, 0 = clean), the call as a user writes it."""
    latents = inputs["hidden_states"].clone()
    for t in timesteps:
        call = dict(inputs, hidden_states=latents, timestep=torch.tensor([t], dtype=latents.dtype))
        if positional:  # FluxTransformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
            head = [call.pop(k) for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")]
            prediction = fn(*head, **call)[0]
        else:
            prediction = fn(**call)[0]
        latents = latents - 0.1 * prediction
    return latents


TIMESTEPS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


def test_positional_timestep_starts_new_generations():
    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, CACHE)
    with torch.no_grad():
        first = euler_loop(compiled, inputs, TIMESTEPS, positional=True)
        second = euler_loop(compiled, inputs, TIMESTEPS, positional=True)
    controller = cache_runtime.latest()
    assert controller.generation == 1
    assert "0" in controller.pattern(1)  # the run cached steps, so reused state would show
    assert torch.equal(first, second)


def test_new_generation_at_an_equal_or_lower_timestep():
    # an interrupted run, then img2img-style runs starting at (or below) the last timestep
    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, CACHE)
    later = [0.3, 0.25, 0.2, 0.15, 0.1, 0.05]
    with torch.no_grad():
        euler_loop(compiled, inputs, TIMESTEPS)
        npu_dit.reset_cache()
        expected = euler_loop(compiled, inputs, later)  # a generation by explicit request
        euler_loop(compiled, inputs, TIMESTEPS)
        actual = euler_loop(compiled, inputs, later)  # detected: 0.3 is not below the previous 0.3
    assert cache_runtime.latest().generation == 3
    assert torch.equal(actual, expected)


def test_generation_ends_at_the_configured_step_count():
    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, dict(CACHE, num_inference_steps=4))
    with torch.no_grad():
        npu_dit.reset_cache()
        expected = euler_loop(compiled, inputs, [0.4, 0.3, 0.2, 0.1])
        euler_loop(compiled, inputs, [0.9, 0.8, 0.7, 0.6])
        # below the last timestep: only the step count says this is a new generation
        actual = euler_loop(compiled, inputs, [0.4, 0.3, 0.2, 0.1])
    assert cache_runtime.latest().generation == 2
    assert torch.equal(actual, expected)


def test_true_cfg_branches_follow_the_call_rhythm():
    # Qwen-Image true CFG: cond + uncond per step; a new generation at the last timestep of the old one
    _, model, inputs = tiny_model_and_inputs("qwen-edit")
    compiled = compile_cached(model, dict(CACHE, residual_diff_threshold=0.2))
    with torch.no_grad():
        denoise(compiled, inputs, steps=6, height=128, width=128, true_cfg=True)
        controller = cache_runtime.latest()
        summary = controller.summary()
        assert sorted(summary["branches"]) == [0, 1]
        assert all(len(b["reasons"]) == 6 for b in summary["branches"].values())


def test_threads_keep_their_own_cache_state():
    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, dict(CACHE, residual_diff_threshold=0.5))
    with torch.no_grad():
        alone = [denoise(compiled, inputs, steps=8, height=128, width=128, seed=s) for s in (0, 1)]
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def worker(seed):
        try:
            with torch.no_grad():
                results[seed] = denoise(compiled, inputs, steps=8, height=128, width=128, seed=seed,
                                        on_step=lambda _: barrier.wait())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert "0" in cache_runtime.latest().pattern()
    for seed in (0, 1):
        assert torch.equal(results[seed], alone[seed])


def test_inductor_with_batch_2_matches_eager_regions():
    _, model, inputs = tiny_model_and_inputs("flux", batch=2)
    cache = dict(CACHE, residual_diff_threshold=0.5)
    with torch.no_grad():
        expected = euler_loop(compile_cached(model, cache), inputs, TIMESTEPS[:5])
        expected_pattern = cache_runtime.latest().pattern()
        actual = euler_loop(compile_cached(model, cache, inner_compiler="inductor"), inputs, TIMESTEPS[:5])
    assert "0" in expected_pattern and cache_runtime.latest().pattern() == expected_pattern
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_grad_mode_is_refused_with_a_clear_error():
    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, CACHE)
    with pytest.raises(Exception, match="torch.no_grad"):
        compiled(**inputs)


def test_summaries_are_labelled_and_keep_the_last_generations(capsys):
    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, CACHE)
    with torch.no_grad():
        for _ in range(6):
            euler_loop(compiled, inputs, TIMESTEPS[:4])
    mine = [s for s in npu_dit.cache_summaries() if s["graph"] == cache_runtime.latest().label]
    assert [s["generation"] for s in mine] == [2, 3, 4, 5]
    assert all(len(s["branches"][0]["reasons"]) == 4 for s in mine)
    npu_dit.print_cache_summary()
    assert f"{mine[0]['graph']}, generation 5" in capsys.readouterr().out


def test_huge_warmup_costs_nothing():
    tracemalloc.start()
    policy = DBCachePolicy(CacheConfig(max_warmup_steps=10**7))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000
    assert policy.pre_check(9_999_999) is not None and policy.pre_check(9_999_999).reason == "warmup"


@pytest.mark.parametrize(
    "cache, pattern",
    [
        ({"residual_diff_threshold": float("nan")}, "cache.residual_diff_threshold' must be a finite number"),
        ({"residual_diff_threshold": float("inf")}, "cache.residual_diff_threshold' must be a finite number"),
        ({"steps_mask": [True, False]}, "'cache.steps_mask' must be"),
        ({"steps_mask": "fast"}, "also give 'cache.num_inference_steps'"),
        ({"num_inference_steps": 8}, "covers all 8 steps"),
    ],
)
def test_bad_cache_values_are_value_errors_naming_the_key(cache, pattern):
    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, cache)
    with torch.no_grad(), pytest.raises(Exception, match=pattern) as info:
        compiled(**inputs)
    assert isinstance(info.value, ValueError) or isinstance(info.value.__cause__, ValueError) or "ValueError" in str(info.value)


@pytest.mark.slow
def test_inductor_compiles_each_region_once_across_resolutions():
    # issue 9 item 6: the rewritten regions are compiled once with dynamic shapes, as Dynamo's own
    # graph is; new resolutions and prompt lengths reuse that compile (and stay exact)
    from npu_dit.backend import RECORDS

    spec, model, _ = tiny_model_and_inputs("flux")
    cache = dict(CACHE, residual_diff_threshold=0.5)
    calls = [spec.example_inputs(spec.config("tiny"), height=h, width=w, prompt_len=p)
             for h, w, p in ((128, 128, 12), (96, 160, 7), (64, 64, 20))]
    with torch.no_grad():
        eager = compile_cached(model, cache)
        expected = [euler_loop(eager, inputs, TIMESTEPS[:3]) for inputs in calls]
        inductor = compile_cached(model, cache, inner_compiler="inductor")
        last = RECORDS[-1]
        actual = [euler_loop(inductor, inputs, TIMESTEPS[:3]) for inputs in calls]
    controller = cache_runtime.latest()
    records = list(RECORDS)  # a bounded deque: count what came after the last record seen
    position = next((i for i, r in enumerate(records) if r is last), -1)
    assert len(records) - 1 - position == 1  # one Dynamo graph for all three shapes
    assert [r.compiles for r in (controller.front, controller.middle, controller.back)] == [1, 1, 1]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
