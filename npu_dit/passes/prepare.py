"""Metadata every pass relies on, set once on the graph Dynamo hands the backend."""

from __future__ import annotations

import torch.fx as fx


def prepare_meta(gm: fx.GraphModule) -> None:
    """Normalise Dynamo's metadata before any pass runs.

    Every node gets `meta["val"]` (Dynamo records `example_value`; passes keep `val` up to date), and
    every placeholder its user-facing input name (Dynamo drops its `grapharg` after compiling).
    """
    from npu_dit.passes.analysis.token_dims import source_name

    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
        if node.op == "placeholder" and "npu_dit.input_name" not in node.meta:
            node.meta["npu_dit.input_name"] = source_name(node)
