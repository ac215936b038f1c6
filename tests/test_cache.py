"""Hybrid cache: region split, DBCache/TaylorSeer/steps-mask decisions, CFG branches, generations,
rank consistency under Ulysses."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npu_dit
from npu_dit.config import CacheConfig, CompileConfig
from npu_dit.passes.infra import UserError
from npu_dit.runtime import cache as cache_runtime
from npu_dit.runtime.cache_policy import DBCachePolicy, TaylorSeer, steps_mask
from npu_dit.tools.denoise import denoise
from tests.conftest import tiny_model_and_inputs
from tests.dist_utils import run_ranks

# ---------------------------------------------------------------------------------------------
# an independent, straightforward statement of the rules (shared/DESIGN.md "Algorithms to match")


def reference_pattern(cfg: CacheConfig, diffs: list[float | None], num_steps: int) -> list[int]:
    """diffs[i]: the diff step i would see against the last computed step (None: none yet)."""
    if cfg.steps_mask is None:
        mask = None
    elif isinstance(cfg.steps_mask, str):
        mask = steps_mask(cfg.steps_mask, num_steps)
    else:
        mask = list(cfg.steps_mask)
    warm = cfg.max_warmup_steps
    if mask is not None:
        ones = 0
        while ones < len(mask) and mask[ones] == 1:
            ones += 1
        warm = min(warm, ones)
    pattern, cached, run = [], 0, 0
    for i in range(num_steps):
        if i < warm and i % cfg.warmup_interval == 0:
            compute = True
        elif mask is not None and i < len(mask) and mask[i] == 1:
            compute = True
        elif mask is not None and i < len(mask) and cfg.steps_mask_policy == "static":
            compute = False
        elif 0 <= cfg.max_cached_steps <= cached:
            compute = True
        elif 0 <= cfg.max_continuous_cached_steps <= run:
            compute = True
        elif cfg.residual_diff_threshold <= 0 or diffs[i] is None:
            compute = True
        else:
            compute = not diffs[i] < cfg.residual_diff_threshold
        pattern.append(1 if compute else 0)
        if compute:
            run = 0
        else:
            cached += 1
            run += 1
    return pattern


def run_policy(cfg: CacheConfig, diffs: list[float | None], num_steps: int) -> list[int]:
    policy = DBCachePolicy(cfg, num_steps)
    pattern = []
    for i in range(num_steps):
        decision = policy.pre_check(i) or policy.by_diff(i, diffs[i])
        policy.record(decision)
        pattern.append(1 if decision.compute else 0)
    return pattern


@settings(max_examples=300, deadline=None)
@given(
    num_steps=st.integers(1, 40),
    threshold=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5]),
    warmup=st.integers(0, 10),
    interval=st.integers(1, 3),
    max_cached=st.sampled_from([-1, 1, 3, 10]),
    max_continuous=st.sampled_from([-1, 1, 2, 3]),
    mask=st.sampled_from([None, "slow", "medium", "fast", "ultra", (1, 1, 0, 0, 1, 0)]),
    policy=st.sampled_from(["dynamic", "static"]),
    data=st.data(),
)
def test_policy_matches_the_definitions(num_steps, threshold, warmup, interval, max_cached, max_continuous, mask, policy, data):
    cfg = CacheConfig(
        Fn_compute_blocks=1, residual_diff_threshold=threshold, max_warmup_steps=warmup, warmup_interval=interval,
        max_cached_steps=max_cached, max_continuous_cached_steps=max_continuous, steps_mask=mask,
        steps_mask_policy=policy,
    )
    diffs = data.draw(st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=num_steps, max_size=num_steps))
    assert run_policy(cfg, diffs, num_steps) == reference_pattern(cfg, diffs, num_steps)


def test_steps_mask_presets_for_28_steps():
    assert "".join(map(str, steps_mask("fast"))) == "1111110100010000100000100001"
    assert steps_mask("slow") == [1] * 8 + [0] + [1] * 3 + [0] * 2 + [1] * 3 + [0] * 2 + [1] * 2 + [0] * 2 + [1] + [0] * 3 + [1]
    for preset, computed in [("slow", 18), ("medium", 15), ("fast", 11), ("ultra", 8)]:
        mask = steps_mask(preset)
        assert len(mask) == 28 and sum(mask) == computed and mask[-1] == 1
    for n in (8, 50):  # other step counts: scaled, same length, last step computes
        mask = steps_mask("fast", n)
        assert len(mask) == n and mask[-1] == 1 and 0 < sum(mask) < n


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_extrapolates_polynomials_of_its_order_exactly(order):
    seer = TaylorSeer(order)

    def y(step):
        return torch.tensor([3.0 + 0.5 * step + (0.25 * step**2 if order == 2 else 0.0)], dtype=torch.float64)

    for step in (0, 2, 5, 6):  # computed steps with uneven gaps
        seer.update(y(step), step)
    for cached in (7, 8, 9):
        if order == 1:
            torch.testing.assert_close(seer.predict(cached), y(cached))
    if order == 2:
        # second differences of a quadratic over uneven gaps are not exact derivatives: check the
        # definition instead: dY[1] = (Y(6) - Y(5)) / 1, dY[2] = (dY[1] - dY1_prev) / 1
        d1_prev = (y(5) - y(2)) / 3
        d1 = (y(6) - y(5)) / 1
        d2 = (d1 - d1_prev) / 1
        expected = y(6) + d1 * 2 + d2 * (2**2) / math.factorial(2)
        torch.testing.assert_close(seer.predict(8), expected)


def test_taylorseer_takes_differences_from_step_3_like_cache_dit():
    seer = TaylorSeer(2)
    for step in (0, 1, 2):
        seer.update(torch.tensor([float(step) ** 2]), step)
    assert len(seer.derivatives) == 1  # steps 0..2 only anchor the value
    torch.testing.assert_close(seer.predict(4), torch.tensor([4.0]))
    seer.update(torch.tensor([9.0]), 3)
    assert len(seer.derivatives) == 2  # first difference at step 3, against step 2
    seer.update(torch.tensor([16.0]), 4)
    assert len(seer.derivatives) == 3
    torch.testing.assert_close(seer.derivatives[2], torch.tensor([2.0]))


@pytest.mark.slow
@pytest.mark.parametrize("order", [0, 1, 2])
def test_hybrid_cache_is_bitwise_equal_to_cache_dit(order):
    """The oracle: cache-dit 1.5.3 itself on the same tiny FluxPipeline (when it is installed)."""
    cache_dit = pytest.importorskip("cache_dit")
    from npu_dit.pipelines import load_pipeline

    settings = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5, max_warmup_steps=4,
                    max_continuous_cached_steps=3)

    def generate(pipe):
        with torch.no_grad():
            return pipe("a red cube", height=128, width=128, num_inference_steps=14,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images

    peer = load_pipeline("flux.1-dev")
    cache_dit.enable_cache(
        peer, cache_config=cache_dit.DBCacheConfig(**settings),
        calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None,
    )
    expected = generate(peer)
    ours = npu_dit.parallelize(load_pipeline("flux.1-dev"), cache=dict(settings, taylorseer_order=order))
    actual = generate(ours)
    assert "0" in cache_runtime.latest().pattern()
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------------------------
# the compiled model


def compile_cached(model, cache, **extra):
    torch._dynamo.reset()
    return torch.compile(model, backend="npu_dit", dynamic=True, options={"cache": cache, **extra})


def run_loop(fn, key, steps=12, true_cfg=False, **overrides):
    _, _, inputs = tiny_model_and_inputs(key, **overrides)
    height = overrides.get("height", 128)
    with torch.no_grad():
        return denoise(fn, inputs, steps=steps, height=height, width=overrides.get("width", 128), true_cfg=true_cfg)


@pytest.mark.parametrize("key, true_cfg", [("flux", False), ("qwen-edit", True)])
def test_threshold_zero_is_bitwise_equal_to_the_uncached_run(key, true_cfg):
    _, model, _ = tiny_model_and_inputs(key)
    expected = run_loop(model, key, true_cfg=true_cfg)
    compiled = compile_cached(model, {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "residual_diff_threshold": 0.0})
    actual = run_loop(compiled, key, true_cfg=true_cfg)
    assert torch.equal(actual, expected)
    summary = cache_runtime.latest().summary()
    assert all(not b["cached"] for b in summary["branches"].values())
    assert len(summary["branches"]) == (2 if true_cfg else 1)


@pytest.mark.parametrize(
    "cache",
    [
        {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.3, "max_warmup_steps": 2},
        {"Fn_compute_blocks": 2, "Bn_compute_blocks": 1, "residual_diff_threshold": 0.5, "max_warmup_steps": 3,
         "warmup_interval": 2, "max_continuous_cached_steps": 2, "taylorseer_order": 1},
        {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.5, "max_warmup_steps": 8, "steps_mask": "fast",
         "num_inference_steps": 12, "max_cached_steps": 4, "taylorseer_order": 2},
    ],
)
def test_controller_follows_the_definitions_on_recorded_diffs(cache):
    _, model, _ = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, cache)
    run_loop(compiled, "flux", steps=12)
    controller = cache_runtime.latest()
    records = [r for r in controller.records if r.generation == controller.generation]
    cfg = CacheConfig.from_options(cache)
    # the diff each step saw: recorded when the threshold check ran; recompute-free reference
    diffs = [r.diff for r in records]
    expected = reference_pattern(cfg, diffs, len(records))
    actual = [1 if r.computed else 0 for r in records]
    assert actual == expected
    assert 0 < sum(actual) < len(actual) or cache.get("steps_mask")  # the run really cached something
    assert controller.pattern() == "".join(map(str, actual))


def test_generations_reset_from_the_timesteps_and_on_request():
    _, model, _ = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.3, "max_warmup_steps": 2})
    first = run_loop(compiled, "flux", steps=8)
    controller = cache_runtime.latest()
    second = run_loop(compiled, "flux", steps=8)  # timestep goes back up: a new generation
    assert controller.generation == 1
    assert controller.pattern(0) == controller.pattern(1) and torch.equal(first, second)
    cache_runtime.reset_all()
    _, _, inputs = tiny_model_and_inputs("flux")
    with torch.no_grad():
        # a low timestep (as the loop passes it: an expanded view), but a reset was asked for
        compiled(**dict(inputs, timestep=torch.tensor(0.01).expand(1)))
    assert controller.generation == 2 and controller.records[-1].step == 0


def test_true_cfg_branches_keep_separate_state():
    _, model, _ = tiny_model_and_inputs("qwen-edit")
    compiled = compile_cached(model, {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.2, "max_warmup_steps": 2})
    run_loop(compiled, "qwen-edit", steps=10, true_cfg=True)
    summary = cache_runtime.latest().summary()
    cond, uncond = summary["branches"][0], summary["branches"][1]
    assert len(cond["computed"]) + len(cond["cached"]) == 10 == len(uncond["computed"]) + len(uncond["cached"])
    assert cond["diffs"] != uncond["diffs"]  # each branch compares with its own previous residual
    compiled = compile_cached(model, {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.2, "separate_cfg": False})
    run_loop(compiled, "qwen-edit", steps=10, true_cfg=True)
    summary = cache_runtime.latest().summary()
    assert list(summary["branches"]) == [0] and len(summary["branches"][0]["reasons"]) == 20


def test_regions_have_no_graph_breaks_and_no_item():
    _, model, inputs = tiny_model_and_inputs("flux")
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = compile_cached(model, {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1})
    with torch.no_grad():
        compiled(**inputs)
    assert counters["stats"]["unique_graphs"] == 1  # one Dynamo graph for the whole call
    plan = cache_runtime.latest().plan
    for region in plan.regions:
        ops = [n for n in region.gm.graph.nodes if n.op == "call_method" and n.target in ("item", "tolist")]
        assert ops == [], region.name
    assert [len(r.blocks) for r in plan.regions] == [1, 2, 1]
    assert [s for _, _, s in plan.residual_pairs] == ["text", "image"] or [s for _, _, s in plan.residual_pairs] == ["image", "text"]


def test_regions_compile_with_inductor():
    _, model, _ = tiny_model_and_inputs("flux")
    expected = run_loop(model, "flux", steps=4)
    compiled = compile_cached(model, {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.0}, inner_compiler="inductor")
    actual = run_loop(compiled, "flux", steps=4)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_no_middle_blocks_is_refused_with_one_clear_warning():
    """Fn + Bn covering every block cannot cache anything: the cache refuses (the graph runs
    uncached, exactly as eager) with one warning that says what to lower."""
    import warnings

    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, {"Fn_compute_blocks": 3, "Bn_compute_blocks": 1})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(**inputs)[0]
        expected = model(**inputs)[0]
    messages = [str(w.message) for w in caught if "leaves no middle blocks" in str(w.message)]
    assert len(messages) == 1 and "Fn + Bn <" in messages[0]
    assert torch.allclose(out, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# cache + Ulysses on 2 Gloo ranks


CACHE = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.25, "max_warmup_steps": 2, "taylorseer_order": 1}


def cached_loop_on_rank(rank, world_size):
    import warnings

    warnings.filterwarnings("ignore")
    _, model, _ = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, CACHE, ulysses_degree=world_size)
    out = run_loop(compiled, "flux", steps=10)
    controller = cache_runtime.latest()
    records = [(r.step, r.computed, r.diff, r.local_diff) for r in controller.records]
    return {"out": out, "pattern": controller.pattern(), "records": records}


def test_cache_with_ulysses_decides_alike_on_every_rank(tmp_path):
    _, model, _ = tiny_model_and_inputs("flux")
    compiled = compile_cached(model, CACHE)
    serial = run_loop(compiled, "flux", steps=10)
    serial_pattern = cache_runtime.latest().pattern()
    results = [r["result"] for r in run_ranks(cached_loop_on_rank, 2, tmp_path, timeout=600)]
    assert results[0]["pattern"] == results[1]["pattern"] == serial_pattern
    assert "0" in serial_pattern  # the run cached some steps
    for r in results:
        assert (r["out"] - serial).abs().max().item() <= 1e-5
    # the ranks held different data (their local diffs differ) yet took the same decisions
    local = [[rec[3] for rec in r["records"] if rec[3] is not None] for r in results]
    assert local[0] and any(abs(a - b) > 1e-6 for a, b in zip(local[0], local[1]))
