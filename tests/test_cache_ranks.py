"""Cache decisions agree across ranks by construction (issue 9, item 2), and grad mode is refused under
Ulysses (item 9): real Gloo processes, 2 ranks, short group timeouts."""

import torch

from tests.dist_utils import run_ranks

# the runtime behaviour under test needs blocks, not many: one double and one single block keep
# each rank's compile short
ONE_BLOCK_EACH = {"num_layers": 1, "num_single_layers": 1}
CACHE = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.3, "max_warmup_steps": 2}
TIMESTEPS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


def _loop(compiled, inputs, timesteps, on_step=None):
    latents = inputs["hidden_states"].clone()
    for i, t in enumerate(timesteps):
        if on_step is not None:
            on_step(i)
        call = dict(inputs, hidden_states=latents, timestep=torch.tensor([t]))
        latents = latents - 0.1 * compiled(**call)[0]
    return latents


def reset_on_one_rank(rank, world_size):
    import warnings

    import npu_dit
    from npu_dit.runtime import cache as cache_runtime
    from tests.conftest import tiny_model_and_inputs

    warnings.filterwarnings("ignore")
    _, model, inputs = tiny_model_and_inputs("flux", ONE_BLOCK_EACH)
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"cache": CACHE, "ulysses_degree": world_size})
    with torch.no_grad():
        out = _loop(compiled, inputs, TIMESTEPS, on_step=lambda i: npu_dit.reset_cache() if rank == 1 and i == 5 else None)
    controller = cache_runtime.latest()
    return {"out": out, "computed": [r.computed for r in controller.records]}


def _one_process_with_reset_at(step):
    """The reference from outside the distributed code: one process, the same cache, reset at `step`."""
    import warnings

    import npu_dit
    from npu_dit.runtime import cache as cache_runtime
    from tests.conftest import tiny_model_and_inputs

    warnings.filterwarnings("ignore")
    _, model, inputs = tiny_model_and_inputs("flux", ONE_BLOCK_EACH)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"cache": CACHE})
    with torch.no_grad():
        out = _loop(compiled, inputs, TIMESTEPS, on_step=lambda i: npu_dit.reset_cache() if i == step else None)
    return {"out": out, "computed": [r.computed for r in cache_runtime.latest().records]}


def test_reset_on_one_rank_keeps_the_ranks_deciding_alike(tmp_path):
    """Rank 1 alone starts a new generation at step 5: its warmup votes make every rank compute, so the
    2-rank run decides as one process that reset at step 5 does, and gives its output."""
    results = [r["result"] for r in run_ranks(reset_on_one_rank, 2, tmp_path, timeout=300, group_timeout=30)]
    expected = _one_process_with_reset_at(5)
    assert not all(expected["computed"])  # some steps are cached
    for result in results:
        assert result["computed"] == expected["computed"]
        torch.testing.assert_close(result["out"], expected["out"], atol=1e-5, rtol=1e-5)


def mismatched_config(rank, world_size):
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux", ONE_BLOCK_EACH)
    options = {"ulysses_degree": world_size}
    if rank == 0:
        options["cache"] = CACHE
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
    with torch.no_grad():
        compiled(**inputs)


def test_cache_on_one_rank_only_is_an_error_on_every_rank(tmp_path):
    records = run_ranks(mismatched_config, 2, tmp_path, timeout=300, group_timeout=30, allow_failures=True)
    for record in records:
        assert not record["ok"]
        assert "different cache options" in record["error"] and "rank 1: cache=None" in record["error"]


def grad_under_ulysses(rank, world_size):
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux", ONE_BLOCK_EACH)
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
    compiled(**inputs)  # grad mode on, parameters require grad


def test_grad_mode_under_ulysses_is_a_clear_error(tmp_path):
    records = run_ranks(grad_under_ulysses, 2, tmp_path, timeout=300, group_timeout=30, allow_failures=True)
    for record in records:
        assert not record["ok"] and "torch.no_grad()" in record["error"]
