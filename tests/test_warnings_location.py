"""Warnings point at the user's call, and a refusal's advice fits how the model was compiled."""

import inspect
import warnings

import torch
import torch.fx as fx

from npu_dit.errors import Refusal
from npu_dit.passes.infra import PassSpec, run_passes


class TimedLinear(torch.nn.Module):
    """No transformer blocks: the hybrid cache refuses this graph, so the backend warns once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, timestep):
        return self.fc(x) * timestep


def test_a_refusal_warning_points_at_the_line_that_called_the_model():
    torch._dynamo.reset()
    model = torch.compile(TimedLinear(), backend="npu_dit", dynamic=True, options={"cache": {"Fn_compute_blocks": 1}})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        call_line = inspect.currentframe().f_lineno + 1
        model(torch.randn(2, 3, 4), torch.tensor([1.0]))
    refusals = [w for w in caught if issubclass(w.category, RuntimeWarning) and "npu_dit" in str(w.message)]
    assert refusals, [str(w.message) for w in caught]
    for w in refusals:
        assert (w.filename, w.lineno) == (__file__, call_line), (w.filename, w.lineno, str(w.message))


def _static_size_refusal(gm: fx.GraphModule):
    raise Refusal("the height of x is static in this graph",
                  fix="compile with dynamic=True (torch.compile(vae.decode, backend='npu_dit', dynamic=True, ...))")


def _refusal_message(assume_static: bool) -> str:
    gm = fx.symbolic_trace(torch.nn.ReLU())
    with torch._dynamo.config.patch(assume_static_by_default=assume_static), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = run_passes(gm, [PassSpec("spatial_like", _static_size_refusal)])
    assert report.fell_back and len(caught) == 1
    assert caught[0].filename == __file__  # the warning names this file, not npu_dit/passes/infra.py
    return str(caught[0].message)


def test_a_static_size_under_dynamic_true_is_explained_not_blamed_on_the_user():
    # compiled without dynamic=True: the advice stands
    assert "compile with dynamic=True" in _refusal_message(assume_static=True)
    # compiled with dynamic=True (Dynamo's assume_static_by_default is off): a size Dynamo made static
    # is 0 or 1 (0/1 specialisation); telling the user to pass dynamic=True would be wrong
    message = _refusal_message(assume_static=False)
    assert "compile with dynamic=True" not in message
    assert "0 or 1" in message and "the height of x is static" in message
