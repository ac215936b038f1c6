"""DBCache decisions, TaylorSeer and the steps mask: the host-side half of the hybrid cache.

Pure Python over recorded numbers, no graph: the controller (`runtime/cache.py`) feeds it one step
at a time. The definitions follow cache-dit's DBCache so users can carry their settings over:

For step i (0-based within a generation, one per transformer call of a CFG branch), compute the
middle blocks unless all of these allow caching, checked in this order:
  1. warmup: i in range(0, W, warmup_interval) computes, where W = max_warmup_steps (truncated to
     the steps mask's leading run of 1s when a mask is given);
  2. steps mask: mask[i] == 1 computes; mask[i] == 0 caches at once under the "static" policy and
     goes on to the checks below under "dynamic" (the default);
  3. max_cached_steps: once that many steps were cached in this generation, compute;
  4. max_continuous_cached_steps: after that many cached steps in a row, compute one (cache N,
     compute 1);
  5. threshold: cache when diff < residual_diff_threshold, where diff = mean|R_prev - R| / mean|R_prev|,
     R = image-stream output of the first Fn blocks minus their input, R_prev the R of the last
     computed step; a threshold <= 0 never caches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from npu_dit.config import CacheConfig

# compute bins / cache bins for 28 steps (1 = compute): e.g. fast = 1111110100010000100000100001
STEPS_MASK_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
    "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
    "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
    "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
}
PRESET_STEPS = 28


def mask_from_bins(compute_bins: Sequence[int], cache_bins: Sequence[int]) -> list[int]:
    mask: list[int] = []
    for i, n in enumerate(compute_bins):
        mask += [1] * n
        if i < len(cache_bins):
            mask += [0] * cache_bins[i]
    return mask


def steps_mask(preset: str, num_steps: int = PRESET_STEPS) -> list[int]:
    """The preset's mask for `num_steps` steps: the 28-step bins scaled by num_steps / 28 (each bin
    at least 1), then trimmed or extended at the end so the last step always computes."""
    compute_bins, cache_bins = STEPS_MASK_PRESETS[preset]
    if num_steps == PRESET_STEPS:
        return mask_from_bins(compute_bins, cache_bins)
    scale = num_steps / PRESET_STEPS
    compute = [max(1, round(n * scale)) for n in compute_bins]
    cache = [max(1, round(n * scale)) for n in cache_bins]
    mask = mask_from_bins(compute, cache)
    if len(mask) >= num_steps:
        mask = mask[: num_steps - 1] + [1]
    else:
        mask = mask + [1] * (num_steps - len(mask))
    return mask


def resolve_mask(cfg: CacheConfig, num_steps: int | None) -> list[int] | None:
    if cfg.steps_mask is None:
        return None
    if isinstance(cfg.steps_mask, str):
        # CacheConfig.from_options requires num_inference_steps with a preset; 28 only for direct use
        return steps_mask(cfg.steps_mask, num_steps or cfg.num_inference_steps or PRESET_STEPS)
    return list(cfg.steps_mask)


@dataclasses.dataclass
class Decision:
    step: int
    compute: bool
    reason: str  # warmup | mask | max_cached | max_continuous | threshold | first | diff
    diff: float | None = None


class DBCachePolicy:
    """Decisions for one CFG branch of one generation."""

    def __init__(self, cfg: CacheConfig, num_steps: int | None = None) -> None:
        self.cfg = cfg
        self.mask = resolve_mask(cfg, num_steps)
        warmup_limit = cfg.max_warmup_steps
        if self.mask is not None:
            leading = next((i for i, m in enumerate(self.mask) if m == 0), len(self.mask))
            warmup_limit = min(warmup_limit, leading)
        self.warmup_limit = warmup_limit  # steps [0, limit) with step % warmup_interval == 0 compute
        self.cached_steps: list[int] = []
        self.continuous = 0
        self.history: list[Decision] = []

    def pre_check(self, step: int) -> Decision | None:
        """The checks that need no diff; None means 'decide by the diff'."""
        cfg = self.cfg
        if step < self.warmup_limit and step % cfg.warmup_interval == 0:
            return Decision(step, True, "warmup")
        if self.mask is not None and step < len(self.mask):
            if self.mask[step] == 1:
                return Decision(step, True, "mask")
            if cfg.steps_mask_policy == "static":
                return Decision(step, False, "mask")
        if cfg.max_cached_steps >= 0 and len(self.cached_steps) >= cfg.max_cached_steps:
            return Decision(step, True, "max_cached")
        if cfg.max_continuous_cached_steps >= 0 and self.continuous >= cfg.max_continuous_cached_steps:
            return Decision(step, True, "max_continuous")
        if cfg.residual_diff_threshold <= 0.0:
            return Decision(step, True, "threshold")
        return None

    def by_diff(self, step: int, diff: float | None) -> Decision:
        if diff is None:
            return Decision(step, True, "first")
        return Decision(step, diff >= self.cfg.residual_diff_threshold, "diff", diff)

    def record(self, decision: Decision) -> None:
        self.history.append(decision)
        if decision.compute:
            self.continuous = 0
        else:
            self.cached_steps.append(decision.step)
            self.continuous += 1


class TaylorSeer:
    """Order-k Taylor extrapolation of a residual from the computed steps (finite differences).

    Differences are taken only from step FIRST_DIFFERENCE_STEP of a generation on, as cache-dit 1.5.3
    does (its calibrator state counts steps from -1 and differences once its count exceeds 1): the
    first derivative first exists at step 3, the second at the next computed step, each difference
    against the previous computed step's ladder over the steps between them. The first steps of a
    flow-matching run change fastest, and a ladder built from them extrapolates badly: on a tiny
    28-step FLUX pipeline (F1B0, threshold 0.5, 4 warmup steps, 3 continuous cached), order 2 with
    differences from step 1 ended 0.0375 (max abs) from the uncached run, with cache-dit's rule 0.0184
    (and bitwise equal to cache-dit).
    """

    FIRST_DIFFERENCE_STEP = 3

    def __init__(self, order: int) -> None:
        self.order = order
        self.derivatives: list[torch.Tensor] = []
        self.last_step: int | None = None

    def update(self, value: torch.Tensor, step: int) -> None:
        fresh = [value]
        if self.last_step is not None and self.derivatives and step >= self.FIRST_DIFFERENCE_STEP:
            w = step - self.last_step
            for i in range(self.order):
                if i >= len(self.derivatives):
                    break
                fresh.append((fresh[i] - self.derivatives[i]) / w)
        self.derivatives = fresh
        self.last_step = step

    def predict(self, step: int) -> torch.Tensor:
        k = step - (self.last_step or 0)
        out = self.derivatives[0]
        for i in range(1, len(self.derivatives)):
            out = out + self.derivatives[i] * (k**i / math.factorial(i))
        return out
