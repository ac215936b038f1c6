"""Graph walks shared by analyses and passes."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx


def first_reached(
    start: fx.Node, *, forward: bool, within: set[fx.Node], stop: Callable[[fx.Node], bool]
) -> list[fx.Node]:
    """Nodes matching `stop` first reached from `start` (users if forward, inputs otherwise), without
    walking past them or leaving `within`; in the order they were found."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for nxt in (node.users if forward else node.all_input_nodes):
            if nxt in seen or nxt not in within:
                continue
            seen.add(nxt)
            if stop(nxt):
                found.append(nxt)
            else:
                frontier.append(nxt)
    return found
