"""Tensor parallelism releases the full weights (release_weights=True, the default): reading a released
parameter or running the module uncompiled raises a clear error naming release_weights=False, never
a crash, and the compiled model keeps working with no recompile."""

import pytest

from tests.dist_utils import run_ranks
from tests.dist_workers_release import released_weights


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_released_parameters_raise_a_clear_error_and_the_compiled_model_runs(tmp_path):
    records = run_ranks(released_weights, 2, tmp_path, timeout=600)
    for record in records:
        assert record["ok"], record.get("traceback")
        result = record["result"]
        assert not result["fell_back"], result["reason"]
        assert result["counts"].get("all_reduce", 0) > 0  # the MLP really is tensor-parallel
        assert result["storage_bytes"] == 0  # the memory is released
        for use, message in result["errors"].items():
            assert message is not None, f"{use} did not raise"
            assert "'release_weights': False" in message and "fc" in message, (use, message)
        assert result["metadata"] == ((32, 8), "torch.float32")  # shape and dtype stay readable
        assert result["parameters_metadata"] == [(32, 8), (32,), (8, 32), (8,)]
        assert result["dtype_after"] == "torch.float32"  # .to(float64) raised before casting anything
        assert result["graphs"] == 1  # the stand-ins trigger no recompile
        assert result["err"] <= 1e-5, result
