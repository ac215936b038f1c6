"""Which generation, CFG branch and step a transformer call is: the cache's clock.

One `StepTracker` per thread per compiled graph. Calls of one generation come in a fixed rhythm:
`branches` calls per denoising step (2 with true CFG and separate state per branch, else 1), the
branches of a step sharing one timestep, and the timestep going strictly down from step to step.

    call index k of a generation  ->  branch k % branches, step k // branches

A call starts a new generation when
  - `reset()` was asked for (npu_dit.reset_cache());
  - the previous generation has had its `num_steps` steps (cache.num_inference_steps, as cache-dit
    ends a generation by its step count);
  - its timestep breaks the rhythm: a step's first branch whose timestep is not below the previous
    step's (with separate_cfg=False every call is a step and the timestep may repeat), or a later
    branch whose timestep differs from its step's first branch.
So an interrupted run, or img2img starting at a lower timestep, is a new generation even when its
first timestep equals the old run's last one: branches are paired by the rhythm, never by equal
timesteps alone. With separate_cfg left unset, the first generation's second call fixes the rhythm:
the same timestep as the first call means two branches per step.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Position:
    generation: int
    branch: int
    step: int
    new_generation: bool


class StepTracker:
    def __init__(self, *, separate_cfg: bool | None, num_steps: int | None) -> None:
        self.separate_cfg = separate_cfg
        self.num_steps = num_steps
        self.branches: int | None = {True: 2, False: 1}.get(separate_cfg)  # None: learnt from the first generation
        self.generation = -1
        self.calls = 0  # index of the last call within the generation
        self.step_t: float | None = None  # the timestep of the current step's first branch
        self.reset_pending = True

    def reset(self) -> None:
        self.reset_pending = True

    def locate(self, t: float | None) -> Position:
        index = self.calls + 1
        if self.reset_pending or not self._continues(index, t):
            self.generation += 1
            self.calls = 0
            self.step_t = t
            self.reset_pending = False
            return Position(self.generation, 0, 0, True)
        self.calls = index
        branch, step = index % self.branches, index // self.branches
        if branch == 0:
            self.step_t = t
        return Position(self.generation, branch, step, False)

    def _continues(self, index: int, t: float | None) -> bool:
        branches = self.branches
        if branches is None:  # second call of a generation, rhythm not known yet
            branches = 2 if t is not None and t == self.step_t else 1
        branch, step = index % branches, index // branches
        if self.num_steps is not None and step >= self.num_steps:
            return False
        if t is None or self.step_t is None:
            fits = True
        elif branch > 0:
            fits = t == self.step_t
        elif self.separate_cfg is False:
            fits = t <= self.step_t
        else:
            fits = t < self.step_t
        if fits:
            self.branches = branches
        return fits
