"""Rank function for tests/test_released_weights.py (importable by spawned processes)."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore")


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def released_weights(rank, world_size):
    """Compile with tensor parallelism (release_weights defaults to True), then read the released
    parameters every way a user might; record each error instead of crashing."""
    from npu_dit.backend import RECORDS

    torch.manual_seed(0)
    model = MLP()
    x, longer = torch.randn(2, 5, 8), torch.randn(2, 9, 8)
    with torch.no_grad():
        expected, expected_longer = model(x), model(longer)
    torch._dynamo.reset()
    before = _unique_graphs()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"tp_degree": world_size})
    with torch.no_grad():
        out = compiled(x)
    uses = {
        "attribute": lambda: model.fc1.weight.sum(),
        "torch_function": lambda: torch.sum(model.fc1.weight),
        "operator": lambda: model.fc2.weight * 2,
        "state_dict": lambda: sum(v.sum() for v in model.state_dict().values()),
        "eager_forward": lambda: model(x),
        "parameters_values": lambda: [p.sum() for p in model.parameters()],
        "named_parameters_values": lambda: [p * 2 for _, p in model.fc1.named_parameters()],
        "to_dtype": lambda: model.to(torch.float64),
        "half": lambda: model.fc1.half(),
    }
    errors = {}
    for key, use in uses.items():
        try:
            use()
            errors[key] = None
        except RuntimeError as exc:
            errors[key] = str(exc)
    metadata = (tuple(model.fc1.weight.shape), str(model.fc1.weight.dtype))
    with torch.no_grad():
        again = compiled(x)
        out_longer = compiled(longer)
    graphs = _unique_graphs() - before
    # a fresh compile of the same module (a recompile): Dynamo traces the parameters, not the stand-ins
    torch._dynamo.reset()
    with torch.no_grad():
        fresh = torch.compile(model, backend="npu_dit", dynamic=True, options={"tp_degree": world_size})(x)
    return {
        "fell_back": RECORDS[-1].report.fell_back, "reason": RECORDS[-1].report.fallback_reason,
        "counts": RECORDS[-1].report.counts,
        "errors": errors, "metadata": metadata, "graphs": graphs,
        "err": max((a - b).abs().max().item() for a, b in ((out, expected), (again, expected),
                                                           (out_longer, expected_longer), (fresh, expected))),
        "storage_bytes": model.fc1._parameters["weight"].untyped_storage().nbytes(),
        "parameters_metadata": [tuple(p.shape) for p in model.parameters()],
        "dtype_after": str(next(model.parameters()).dtype),
    }
