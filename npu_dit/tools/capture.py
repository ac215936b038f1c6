"""Capture the Dynamo graph of a transformer call without running npu-dit's passes.

Used by `npu-dit inspect` and by the tests: it compiles the model with a recording backend, so the
graph is exactly the one `backend="npu_dit"` would receive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from npu_dit.passes.prepare import prepare_meta
from npu_dit.tracing import no_duck_shaping


@dataclasses.dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list[Any]  # Dynamo's fake example inputs, in placeholder order
    real_inputs: list[Any]  # the values the graph was first called with, in placeholder order
    num_graphs: int
    outputs: Any


def capture_graph(model: torch.nn.Module, inputs: dict[str, Any], *, dynamic: bool | None = True) -> Captured:
    """Compile `model` with a recording backend, call it once on `inputs`, return the (single) graph.

    Raises RuntimeError if Dynamo splits the call into several graphs (a graph break).
    """
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    real_inputs: list[list[Any]] = []

    def record(gm: fx.GraphModule, example_inputs: list[Any]):
        prepare_meta(gm)  # while Dynamo's `grapharg` metadata is still attached
        graphs.append((gm, list(example_inputs)))

        def run(*args: Any) -> Any:
            if not real_inputs:
                real_inputs.append(list(args))
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, dynamic=dynamic)
    # trace exactly as backend="npu_dit" does (no duck shaping; see npu_dit/tracing.py)
    with torch.no_grad(), no_duck_shaping():
        outputs = compiled(**inputs)
    if not graphs:
        raise RuntimeError("Dynamo captured no graph for this call")
    if len(graphs) > 1:
        raise RuntimeError(
            f"Dynamo split this call into {len(graphs)} graphs (graph breaks); npu-dit needs one graph "
            f"per transformer call. Run with TORCH_LOGS=graph_breaks to see where."
        )
    gm, example_inputs = graphs[0]
    return Captured(gm, example_inputs, real_inputs[0], len(graphs), outputs)
