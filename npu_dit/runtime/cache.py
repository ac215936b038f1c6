"""The cache controller: runs the front region, decides, runs or skips the middle, runs the back.

One controller per compiled graph. It keeps DBCache/TaylorSeer state per CFG branch and per
generation:
  - a new generation starts when the timestep goes up compared with the previous step (diffusion
    timesteps decrease within one), or after `reset()`;
  - a call with the same timestep as the call before it is the next CFG branch of the same step
    (true CFG: cond, then uncond), each branch with its own state (unless separate_cfg=False).
Under Ulysses every rank holds a different chunk of the image stream; the diff's two means are
all-reduced before dividing (as sums and counts, so they are the exact global means) and every rank
takes the same decision, so the collectives inside the middle region stay matched.

`controllers()`, `latest()`, `summaries()` and `reset_all()` reach the live controllers from user code.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

from npu_dit.config import CacheConfig
from npu_dit.passes.cache_regions import CachePlan, rebuild_outputs
from npu_dit.runtime.cache_policy import DBCachePolicy, Decision, TaylorSeer

_CONTROLLERS: list["weakref.ref[CacheController]"] = []


@dataclasses.dataclass
class BranchState:
    policy: DBCachePolicy
    residual_prev: torch.Tensor | None = None  # R of the last computed step
    stored: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # middle residuals
    taylor: dict[int, TaylorSeer] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepRecord:
    generation: int
    branch: int
    step: int
    computed: bool
    reason: str
    diff: float | None
    local_diff: float | None = None  # this rank's diff before the all-reduce (equal to diff without one)


class CacheController:
    def __init__(
        self,
        plan: CachePlan,
        cfg: CacheConfig,
        regions: tuple[Callable, Callable, Callable],
        *,
        group: Any = None,  # process group for the diff all-reduce (None: single process)
    ) -> None:
        self.plan = plan
        self.cfg = cfg
        self.front, self.middle, self.back = regions
        self.group = group
        self.records: list[StepRecord] = []
        self.generation = -1
        self._reset_pending = True
        self._last_t: float | None = None
        self._last_branch0_t: float | None = None
        self._branch = 0
        self._step = -1
        self.states: dict[int, BranchState] = {}
        _CONTROLLERS.append(weakref.ref(self))

    # -- generations and CFG branches -------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation at the next call."""
        self._reset_pending = True

    def _locate(self, args: tuple) -> tuple[int, int]:
        t = None
        if self.plan.timestep_arg is not None:
            value = args[self.plan.timestep_arg]
            t = float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)
        separate = self.cfg.separate_cfg is not False
        if separate and t is not None and self._last_t is not None and t == self._last_t and not self._reset_pending:
            self._branch += 1
        else:
            self._branch = 0
            new = self._reset_pending or (t is not None and self._last_branch0_t is not None and t > self._last_branch0_t)
            if new:
                self.generation += 1
                self._step = -1
                self.states = {}
                self._reset_pending = False
            self._step += 1
            self._last_branch0_t = t
        self._last_t = t
        return self._branch, self._step

    def _state(self, branch: int) -> BranchState:
        if branch not in self.states:
            self.states[branch] = BranchState(DBCachePolicy(self.cfg, self.cfg.num_inference_steps))
        return self.states[branch]

    # -- the decision ------------------------------------------------------------------------------
    def _diff(self, previous: torch.Tensor, current: torch.Tensor) -> tuple[float, float]:
        """(diff, this rank's diff): mean|R_prev - R| / mean|R_prev| over all ranks' tokens."""
        stats = torch.stack(
            [(previous - current).abs().sum(), previous.abs().sum(), torch.tensor(float(previous.numel()), device=previous.device)]
        ).to(torch.float64)
        local = _ratio(stats)
        if self.group is not None:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        return _ratio(stats), local

    # -- the call ---------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        branch, step = self._locate(args)
        state = self._state(branch)
        values: dict[str, Any] = {"arg": args}
        values["front"] = self.front(*[values[k][i] for k, i in self.plan.front.inputs])
        middle_in = [values[k][i] for k, i in self.plan.middle.inputs]
        residual = values["front"][self.plan.image_fn] - values["front"][self.plan.image_in]
        decision = state.policy.pre_check(step)
        local_diff = None
        if decision is None:
            diff = None
            if state.residual_prev is not None:
                diff, local_diff = self._diff(state.residual_prev, residual)
            decision = state.policy.by_diff(step, diff)
        state.policy.record(decision)
        if decision.compute:
            values["middle"] = self.middle(*middle_in)
            state.residual_prev = residual
            for out_pos, in_pos, _ in self.plan.residual_pairs:
                delta = values["middle"][out_pos] - middle_in[in_pos]
                if self.cfg.taylorseer_order > 0:
                    state.taylor.setdefault(out_pos, TaylorSeer(self.cfg.taylorseer_order)).update(delta, step)
                else:
                    state.stored[out_pos] = delta
        else:
            outs: list[Any] = [None] * len(self.plan.residual_pairs)
            for out_pos, in_pos, _ in self.plan.residual_pairs:
                delta = state.taylor[out_pos].predict(step) if self.cfg.taylorseer_order > 0 else state.stored[out_pos]
                outs[out_pos] = middle_in[in_pos] + delta
            values["middle"] = tuple(outs)
        values["back"] = self.back(*[values[k][i] for k, i in self.plan.back.inputs])
        self.records.append(StepRecord(self.generation, branch, step, decision.compute, decision.reason, decision.diff, local_diff))
        return rebuild_outputs(self.plan, values)

    # -- observability ----------------------------------------------------------------------------
    def summary(self, generation: int | None = None) -> dict[str, Any]:
        """Which steps computed, which cached, and the diffs, per CFG branch of one generation."""
        generation = self.generation if generation is None else generation
        records = [r for r in self.records if r.generation == generation]
        branches: dict[int, dict[str, Any]] = {}
        for r in records:
            b = branches.setdefault(r.branch, {"computed": [], "cached": [], "diffs": {}, "reasons": {}})
            (b["computed"] if r.computed else b["cached"]).append(r.step)
            b["reasons"][r.step] = r.reason
            if r.diff is not None:
                b["diffs"][r.step] = r.diff
        return {"generation": generation, "branches": branches}

    def format_summary(self, generation: int | None = None) -> str:
        s = self.summary(generation)
        lines = [f"cache summary, generation {s['generation']}:"]
        for branch, b in sorted(s["branches"].items()):
            total = len(b["computed"]) + len(b["cached"])
            pattern = "".join("1" if step in b["computed"] else "0" for step in range(total))
            lines.append(
                f"  branch {branch}: computed {len(b['computed'])}/{total} steps, cached {len(b['cached'])}  [{pattern}]"
            )
            if b["diffs"]:
                diffs = ", ".join(f"{step}:{d:.3f}" for step, d in sorted(b["diffs"].items()))
                lines.append(f"    diffs: {diffs}")
        return "\n".join(lines)

    def pattern(self, generation: int | None = None, branch: int = 0) -> str:
        b = self.summary(generation)["branches"].get(branch, {"computed": [], "cached": []})
        total = len(b["computed"]) + len(b["cached"])
        return "".join("1" if step in b["computed"] else "0" for step in range(total))


def _ratio(stats: torch.Tensor) -> float:
    mean_diff, mean_prev = stats[0] / stats[2], stats[1] / stats[2]
    return float(mean_diff / mean_prev) if float(mean_prev) > 0 else float("inf")


def controllers() -> list[CacheController]:
    """Live controllers, oldest first (one per compiled graph that has a cache)."""
    alive = [ref() for ref in _CONTROLLERS]
    _CONTROLLERS[:] = [ref for ref, c in zip(_CONTROLLERS, alive) if c is not None]
    return [c for c in alive if c is not None]


def summaries() -> list[dict[str, Any]]:
    return [c.summary() for c in controllers()]


def reset_all() -> None:
    """Start a new generation on every controller (e.g. before reusing a pipeline)."""
    for controller in controllers():
        controller.reset()


def latest() -> CacheController | None:
    live = controllers()
    return live[-1] if live else None
