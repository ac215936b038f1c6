import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from npu_dit import progress
from npu_dit.backend import RECORDS
from tests.conftest import tiny_model_and_inputs


def _root_cause(exc: BaseException) -> BaseException:
    """The first ValueError in the chain Dynamo wraps around a backend's exception."""
    while not isinstance(exc, ValueError):
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None or inner is exc:
            return exc
        exc = inner
    return exc


def test_backend_found_by_entry_point_in_a_fresh_interpreter():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "npu_dit" not in sys.modules
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        x = torch.randn(3, 8)
        compiled = torch.compile(model, backend="npu_dit", options={"inner_compiler": "eager"})
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))
        from npu_dit.backend import RECORDS
        assert len(RECORDS) == 1, RECORDS
        print("ok", RECORDS[0].num_nodes_captured)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("key", ["flux", "qwen-edit", "qwen-edit-masked", "qwen-edit-2509"])
def test_no_rewrites_is_bitwise_equal_to_eager(key):
    _, model, inputs = tiny_model_and_inputs(key)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True)
    before = progress.compile_time_parts()
    with torch.no_grad():
        expected = model(**inputs)[0]
        actual = compiled(**inputs)[0]
    assert torch.equal(actual, expected)
    assert RECORDS[-1].report.records == [] and not RECORDS[-1].report.fell_back
    # the process's compile accounting took this one compile, its parts within its whole
    spent = {k: v - before[k] for k, v in progress.compile_time_parts().items()}
    assert spent["compiles"] == 1 and spent["tracing"] > 0, spent
    assert spent["tracing"] + spent["passes"] + spent["inner"] <= spent["seconds"] + 1e-6, spent


def test_inductor_inner_compiler_matches_eager():
    _, model, inputs = tiny_model_and_inputs("flux")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"inner_compiler": "inductor"})
    counters.clear()
    with torch.no_grad():
        expected = model(**inputs)[0]
        actual = compiled(**inputs)[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Inductor really compiled the graph npu-dit handed it: its FX-graph cache was consulted (a hit
    # when an earlier test compiled the same graph, a miss otherwise), which the eager inner
    # compiler never does
    inductor = counters["inductor"]
    assert inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_hit"] + inductor["fxgraph_cache_bypass"] >= 1, dict(inductor)


def test_bad_option_surfaces_as_value_error_through_torch_compile():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="npu_dit", options={"ulysses_degre": 2})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    cause = _root_cause(info.value)
    assert isinstance(cause, ValueError)
    assert "unknown npu_dit option(s) 'ulysses_degre'" in str(cause)


def test_mode_is_only_for_inductor():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="npu_dit", mode="max-autotune")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    assert "only applies to inner_compiler='inductor'" in str(_root_cause(info.value))


def test_npugraph_ex_without_torch_npu_is_a_clear_error():
    try:
        import torch_npu  # noqa: F401

        pytest.skip("torch_npu is installed here")
    except Exception:
        pass
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="npu_dit", options={"inner_compiler": "npugraph_ex"})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    message = str(_root_cause(info.value))
    assert "needs torch_npu" in message and "inner_compiler='eager' or 'inductor'" in message
