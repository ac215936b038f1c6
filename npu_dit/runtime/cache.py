"""The cache controller: runs the front region, decides, runs or skips the middle, runs the back.

One controller per compiled graph. It keeps DBCache/TaylorSeer state per thread, per generation and
per CFG branch; `runtime/cache_steps.py` says which generation, branch and step each call is (the
timestep input is found from the graph, `passes/analysis/timestep.py`).
Under Ulysses every rank holds a different chunk of the image stream; every call all-reduces the
diff's sums and counts (the exact global means) together with each rank's vote, and the decision is
taken from the reduced values, so every rank takes the same one even when their cache states have
diverged, and the collectives inside the middle region stay matched. The all-reduce is a host
decision: a CPU float64 tensor over the host plane's Gloo group (`runtime/planes.py`), never the
NCCL/HCCL device group; the diff's statistics are the one device-to-host copy of a step (none on
warmup and steps-mask steps, which need no diff).

`controllers()`, `latest()`, `summaries()` and `reset_all()` reach the live controllers from user code.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import operator
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import torch

from npu_dit.config import CacheConfig
from npu_dit.plans import CachePlan, output_builder
from npu_dit.runtime.cache_policy import DBCachePolicy, Decision, TaylorSeer
from npu_dit.runtime.cache_steps import StepTracker
from npu_dit.runtime import planes
from npu_dit.runtime.grad import refuse_grad

_CONTROLLERS: list["weakref.ref[CacheController]"] = []
GENERATIONS_KEPT = 4  # summaries keep the last few generations of every thread
RECORDS_KEPT = 4096  # bounded: a long-running server must not grow without limit


@dataclasses.dataclass
class BranchState:
    policy: DBCachePolicy
    residual_prev: torch.Tensor | None = None  # R of the last computed step
    residual_prev_abs_sum: float | None = None  # sum|R_prev|, read with the first diff after it is stored
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
    thread: int = 0


@dataclasses.dataclass
class ThreadState:
    tracker: StepTracker
    states: dict[int, BranchState] = dataclasses.field(default_factory=dict)  # per CFG branch

    def state(self, branch: int, cfg: CacheConfig) -> BranchState:
        if branch not in self.states:
            self.states[branch] = BranchState(DBCachePolicy(cfg, cfg.num_inference_steps))
        return self.states[branch]


class CacheController:
    def __init__(
        self,
        plan: CachePlan,
        cfg: CacheConfig,
        regions: tuple[Callable, Callable, Callable],
        *,
        group: Any = None,  # the host group for the decision all-reduce (None: single process)
        label: str = "",
        scalar_inputs: Sequence[int] = (),  # graph inputs that are 0-d tensors the regions take as numbers
    ) -> None:
        self.plan = plan
        self.cfg = cfg
        self.front, self.middle, self.back = regions
        # each region's arguments picked from the call's values with one itemgetter per run of the
        # same source (a thousand parameters per region: a Python loop over them cost ~0.1 ms a call);
        # the scalar inputs (every norm's eps: 327 in FLUX.1-dev's 57 blocks) are read per region, so a
        # cached step reads only the front's and the back's, not the middle's
        scalars = frozenset(scalar_inputs)
        self._pick_front, self._pick_middle, self._pick_back = (
            _picker(region.inputs, scalars) for region in (plan.front, plan.middle, plan.back))
        # a cached step needs, of the middle's inputs, only the streams its residuals are added to
        self._pick_residual_inputs = _picker([plan.middle.inputs[i] for _, i, _ in plan.residual_pairs], scalars)
        self._scalar_outputs = [i for i, (kind, index) in enumerate(plan.outputs) if kind == "arg" and index in scalars]
        self._rebuild_outputs = output_builder(plan)
        self.group = group
        self.label = label
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=RECORDS_KEPT)
        self._threads: dict[int, ThreadState] = {}
        self._lock = threading.Lock()
        # host time per call outside the three regions (decisions, residual bookkeeping): `overhead()`
        self._seconds = [0, 0.0, 0.0]  # calls, total, inside regions
        _CONTROLLERS.append(weakref.ref(self))

    # -- generations and CFG branches, per thread -------------------------------------------------
    def reset(self) -> None:
        """Start a new generation at the next call (in every thread)."""
        with self._lock:
            for thread in self._threads.values():
                thread.tracker.reset()

    def _thread(self) -> "ThreadState":
        # each thread runs its own generations on the shared compiled regions: its own clock and
        # residuals, so two threads never read each other's state
        ident = threading.get_ident()
        state = self._threads.get(ident)  # a dict read is atomic: the lock only guards the insertion
        if state is not None:
            return state
        with self._lock:
            if ident not in self._threads:
                tracker = StepTracker(separate_cfg=self.cfg.separate_cfg, num_steps=self.cfg.num_inference_steps)
                self._threads[ident] = ThreadState(tracker)
            return self._threads[ident]

    @property
    def generation(self) -> int:
        return self._thread().tracker.generation

    def _timestep_start(self, args: tuple) -> Any:
        """The call's timestep for the step clock, without stalling the device: a CPU tensor or a number
        is read at once; a device tensor is copied to the host asynchronously and read (`_timestep_done`)
        once the front region is queued, so the wait is for that copy only, never for the front's work."""
        if self.plan.timestep_arg is None:
            return None
        value = args[self.plan.timestep_arg]
        if not isinstance(value, torch.Tensor):
            return float(value)
        if value.device.type == "cpu":
            return float(value.item() if value.numel() == 1 else value.reshape(-1)[0].item())
        if value.device.type == "meta":
            return None
        host = value.reshape(-1)[:1].to("cpu", non_blocking=True)
        event = torch.Event(device=value.device)
        event.record()
        return host, event

    @staticmethod
    def _timestep_done(pending: Any) -> float | None:
        if isinstance(pending, tuple):
            host, event = pending
            event.synchronize()
            return float(host[0])
        return pending

    # -- the decision ------------------------------------------------------------------------------
    def _decide(self, state: BranchState, step: int, residual: torch.Tensor) -> tuple[Decision, float | None]:
        """The local checks, then (under Ulysses) one all-reduce of the decision itself: every rank
        adds its diff statistics and its vote, and all take the same decision even when their cache
        state has diverged (a reset on one rank only): any vote to compute computes on all ranks."""
        pre = state.policy.pre_check(step)
        previous = state.residual_prev
        if pre is not None and not pre.compute and previous is None:
            pre = Decision(step, True, "first")  # nothing stored to reuse yet
        if previous is not None and previous.shape != residual.shape:
            raise ValueError(
                f"npu_dit cache: the image stream changed shape within one generation ({tuple(previous.shape)} "
                f"-> {tuple(residual.shape)}, step {step}): a new resolution or batch size needs a new "
                f"generation; call npu_dit.reset_cache() before changing the input shapes"
            )
        have_prev = previous is not None
        diff_stats = _diff_stats(state, residual) if have_prev and pre is None else [0.0, 0.0, 0.0]
        local_diff = _ratio(diff_stats) if have_prev and pre is None else None
        if self.group is None:
            if pre is not None:
                return pre, None
            return state.policy.by_diff(step, local_diff), local_diff
        votes = [pre is not None and pre.compute, pre is not None and not pre.compute, have_prev and pre is None, 1.0]
        total = planes.host_all_reduce(torch.tensor([*diff_stats, *votes], dtype=torch.float64), "cache decision").tolist()
        compute_votes, cache_votes, diff_votes, world = total[3:]
        if compute_votes > 0:
            return (pre if pre is not None and pre.compute else Decision(step, True, "peer")), local_diff
        if cache_votes == world:
            return pre, local_diff
        if diff_votes < world:  # some rank has no residual to compare with, or ranks disagree
            return Decision(step, True, "first" if cache_votes == 0 else "peer"), local_diff
        return state.policy.by_diff(step, _ratio(total[:3])), local_diff

    # -- the call ---------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        refuse_grad(args, "the cache replaces the middle blocks' outputs on cached steps")
        thread = self._thread()
        timestep = self._timestep_start(args)
        values: dict[str, Any] = {"arg": args}
        t = time.perf_counter()
        values["front"] = self.front(*self._pick_front(values))  # the same on every step: before the clock
        inside = time.perf_counter() - t
        position = thread.tracker.locate(self._timestep_done(timestep))
        if position.new_generation:
            thread.states = {}
        branch, step = position.branch, position.step
        state = thread.state(branch, self.cfg)
        residual = values["front"][self.plan.image_fn] - values["front"][self.plan.image_in]
        decision, local_diff = self._decide(state, step, residual)
        state.policy.record(decision)
        if decision.compute:
            middle_in = self._pick_middle(values)
            # contiguous: cached steps hand the back region fresh tensors, and a graph compiler's
            # region is specialised to its inputs' strides
            t = time.perf_counter()
            values["middle"] = tuple(v.contiguous() if isinstance(v, torch.Tensor) else v for v in self.middle(*middle_in))
            inside += time.perf_counter() - t
            state.residual_prev, state.residual_prev_abs_sum = residual, None
            for out_pos, in_pos, _ in self.plan.residual_pairs:
                delta = values["middle"][out_pos] - middle_in[in_pos]
                if self.cfg.taylorseer_order > 0:
                    state.taylor.setdefault(out_pos, TaylorSeer(self.cfg.taylorseer_order)).update(delta, step)
                else:
                    state.stored[out_pos] = delta
        else:
            outs: list[Any] = [None] * len(self.plan.residual_pairs)
            streams_in = self._pick_residual_inputs(values)
            for (out_pos, _, stream), stream_in in zip(self.plan.residual_pairs, streams_in):
                delta = state.taylor[out_pos].predict(step) if self.cfg.taylorseer_order > 0 else state.stored[out_pos]
                if delta.shape != stream_in.shape:
                    raise ValueError(
                        f"npu_dit cache: the stored {stream}-stream residual has shape {tuple(delta.shape)} but "
                        f"this call's {stream} stream is {tuple(stream_in.shape)} (branch {branch}, step "
                        f"{step}). Calls sharing cache state must have the same shapes: with true CFG and "
                        f"prompts of different lengths use separate_cfg=True (or pad the prompts alike)"
                    )
                outs[out_pos] = stream_in + delta
            values["middle"] = tuple(outs)
        t = time.perf_counter()
        values["back"] = self.back(*self._pick_back(values))
        inside += time.perf_counter() - t
        self.records.append(
            StepRecord(position.generation, branch, step, decision.compute, decision.reason, decision.diff, local_diff,
                       thread=threading.get_ident())
        )
        if self._scalar_outputs:  # a scalar input handed straight back: the number, as the executor gave it
            values["arg"] = _read_scalars(list(args), self._scalar_outputs, self.plan.outputs)
        result = self._rebuild_outputs(values)
        self._seconds[0] += 1
        self._seconds[1] += time.perf_counter() - start
        self._seconds[2] += inside
        return result

    def overhead(self) -> dict[str, float]:
        """Host time per call spent outside the compiled regions (the decision with its diff and
        all-reduce, residual bookkeeping, TaylorSeer), averaged over every call so far."""
        calls, total, inside = self._seconds
        return {"calls": calls, "seconds_per_call": (total - inside) / max(calls, 1),
                "region_seconds_per_call": inside / max(calls, 1)}

    # -- observability ----------------------------------------------------------------------------
    def _records(self, generation: int | None) -> tuple[int, list[StepRecord]]:
        ident = threading.get_ident()
        mine = [r for r in self.records if r.thread == ident] or list(self.records)
        if generation is None:
            generation = mine[-1].generation if mine else -1
        return generation, [r for r in mine if r.generation == generation]

    def generations(self) -> list[int]:
        """This thread's generations still held (the last few)."""
        ident = threading.get_ident()
        seen = sorted({r.generation for r in self.records if r.thread == ident})
        return seen[-GENERATIONS_KEPT:]

    def summary(self, generation: int | None = None) -> dict[str, Any]:
        """Which steps computed, which cached, and the diffs, per CFG branch of one generation
        (default: the latest) of the calling thread."""
        generation, records = self._records(generation)
        branches: dict[int, dict[str, Any]] = {}
        for r in records:
            b = branches.setdefault(r.branch, {"computed": [], "cached": [], "diffs": {}, "reasons": {}})
            (b["computed"] if r.computed else b["cached"]).append(r.step)
            b["reasons"][r.step] = r.reason
            if r.diff is not None:
                b["diffs"][r.step] = r.diff
        return {"graph": self.label, "generation": generation, "branches": branches}

    def format_summary(self, generation: int | None = None) -> str:
        s = self.summary(generation)
        lines = [f"cache summary, {s['graph'] or 'graph'}, generation {s['generation']}:"]
        for branch, b in sorted(s["branches"].items()):
            total = len(b["computed"]) + len(b["cached"])
            pattern = "".join("1" if step in b["computed"] else "0" for step in range(total))
            name = {0: "cond", 1: "uncond"}.get(branch, str(branch)) if len(s["branches"]) > 1 else "all calls"
            lines.append(
                f"  branch {branch} ({name}): computed {len(b['computed'])}/{total} steps, cached {len(b['cached'])}  [{pattern}]"
            )
            if b["diffs"]:
                diffs = ", ".join(f"{step}:{d:.3f}" for step, d in sorted(b["diffs"].items()))
                lines.append(f"    diffs: {diffs}")
        return "\n".join(lines)

    def pattern(self, generation: int | None = None, branch: int = 0) -> str:
        b = self.summary(generation)["branches"].get(branch, {"computed": [], "cached": []})
        total = len(b["computed"]) + len(b["cached"])
        return "".join("1" if step in b["computed"] else "0" for step in range(total))


def _picker(
    inputs: Sequence[tuple[str, int]], scalars: frozenset[int] = frozenset()
) -> Callable[[dict[str, Any]], list[Any]]:
    """`values -> [values[k][i] for k, i in inputs]`, with one `itemgetter` per run of one source; the
    graph arguments in `scalars` (0-d tensors the regions take as numbers) are read with `.item()`."""
    runs = []
    for key, group in itertools.groupby(inputs, key=operator.itemgetter(0)):
        indices = [i for _, i in group]
        runs.append((key, operator.itemgetter(*indices), len(indices) == 1))
    single = len(runs) == 1 and not runs[0][2]
    reads = [p for p, (key, i) in enumerate(inputs) if key == "arg" and i in scalars]
    item = torch.Tensor.item

    def pick(values: dict[str, Any]) -> list[Any]:
        if single:
            key, get, _ = runs[0]
            out = list(get(values[key]))
        else:
            out = []
            for key, get, one in runs:
                if one:
                    out.append(get(values[key]))
                else:
                    out.extend(get(values[key]))
        for p in reads:
            out[p] = item(out[p])
        return out

    return pick


def _read_scalars(args: list[Any], positions: Sequence[int], outputs: Sequence[tuple[str, int]]) -> list[Any]:
    for p in positions:
        index = outputs[p][1]
        if isinstance(args[index], torch.Tensor):
            args[index] = args[index].item()
    return args


def _diff_stats(state: BranchState, current: torch.Tensor) -> list[float]:
    """sum|R_prev - R|, sum|R_prev|, count: summed over ranks they give the exact global means."""
    # the sums come to the host in one copy (the step's one sync), as Python floats (float64);
    # sum|R_prev| is the same until the next computed step, so it is read once, with the first diff
    # after it; the count is known on the host (a device tensor made from it would be one more
    # host-to-device copy, and float32 rounds it above 2**24)
    previous = state.residual_prev
    sum_diff = torch.sub(previous, current).abs_().sum()
    if state.residual_prev_abs_sum is None:
        sum_diff, state.residual_prev_abs_sum = torch.stack([sum_diff, previous.abs().sum()]).tolist()
    else:
        sum_diff = sum_diff.item()
    return [sum_diff, state.residual_prev_abs_sum, float(previous.numel())]


def _ratio(stats: Sequence[float]) -> float:
    mean_diff, mean_prev = stats[0] / stats[2], stats[1] / stats[2]
    return mean_diff / mean_prev if mean_prev > 0 else float("inf")


def controllers() -> list[CacheController]:
    """Live controllers, oldest first (one per compiled graph that has a cache)."""
    alive = [ref() for ref in _CONTROLLERS]
    _CONTROLLERS[:] = [ref for ref, c in zip(_CONTROLLERS, alive) if c is not None]
    return [c for c in alive if c is not None]


def summaries() -> list[dict[str, Any]]:
    """The last few generations of every live controller, each labelled with its graph."""
    return [c.summary(g) for c in controllers() for g in c.generations()]


def format_summaries() -> str:
    return "\n".join(c.format_summary(g) for c in controllers() for g in c.generations()) or "no cached graph has run yet"


def reset_all() -> None:
    """Start a new generation on every controller (e.g. before reusing a pipeline)."""
    for controller in controllers():
        controller.reset()


def latest() -> CacheController | None:
    live = controllers()
    return live[-1] if live else None
