"""Analyses are pure functions of a graph; their results are cached on the GraphModule.

The pass runner drops the cache whenever a pass reports `modified=True`, so a cached fact never
describes a graph that has since changed.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch.fx as fx

from npu_dit.passes.infra import ANALYSIS_CACHE_KEY

T = TypeVar("T")


def cached_analysis(fn: Callable[[fx.GraphModule], T]) -> Callable[[fx.GraphModule], T]:
    @functools.wraps(fn)
    def wrapper(gm: fx.GraphModule) -> T:
        cache = gm.meta.setdefault(ANALYSIS_CACHE_KEY, {})
        key = fn.__module__ + "." + fn.__qualname__
        if key not in cache:
            cache[key] = fn(gm)
        return cache[key]

    return wrapper
