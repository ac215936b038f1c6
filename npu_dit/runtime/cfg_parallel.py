"""CFG parallelism: the two true-CFG calls of a denoising step on two rank groups at once.

A true-CFG pipeline (Qwen-Image-Edit, FLUX.1-dev with `true_cfg_scale > 1`) calls the transformer
twice per step, the prompt's call then the negative prompt's, with the same latents and timestep and
different text inputs (possibly of other lengths), and uses the first output right after the second
call returns. Both calls' inputs are known only when each call is made, so the second branch cannot
be computed with the first unless its inputs are *predicted*. They can be, without any per-model
code: the negative prompt's text inputs are the same tensors at every step.

    branch 0 ranks:  A_k (the call as made)          -> out_A ┐  one all-gather over each pair
    branch 1 ranks:  B_k = A_k with the text inputs   -> out_B ┘  (same position in each branch)
                           of the learning step's second call
    the call A_k returns out_A on every rank; the call B_k, when its inputs are the predicted ones,
    returns out_B without computing anything.

The pattern is learnt from each generation's first calls (c0, c1, c2), all from the inputs alone:

  - c0 runs on branch 0, c1 on branch 1, each broadcast to the other branch (serial);
  - the *text* leaves are those where c1 differs from c0 (by identity and version, else by value);
    c0 and c1 pair when they have the same structure, share at least one tensor, differ in at least
    one leaf, and their outputs have the same shapes;
  - the pattern is confirmed at c2 when it repeats c0's text leaves and changes a shared one (a new
    step); from c2 on, steps run in parallel.

A later generation on the same pipeline starts from the pattern the last one confirmed (a guess): a
first call with its text inputs (by value) runs paired at once, so a repeated generation (a server's
next image with the same negative prompt) has no serial step. If its second call is not the guess (a
new negative prompt), branch 1 computes it and that step is the learning step, silently.

Rule for a call that does not fit: it is computed serially (by one branch, broadcast to the other)
with one warning, never predicted: a second call whose inputs are not the predicted ones (other
text, changed latents) is computed by branch 1 and its text leaves become the new prediction; a
first call whose text leaves are not c0's, or a run whose calls do not pair at all (one call per
step), is computed by branch 0. Every rank decides from the same inputs, so ranks decide alike.

Each branch's ranks only ever run their branch's calls (branch 0 the prompt's, branch 1 the negative
prompt's), so each compiled graph and its cache see one call per step and keep their own state; the
graphs' collectives, shape agreement and cache decisions stay inside their branch
(`ensure_parallel(..., cfg_degree=2)`).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from npu_dit.errors import warn_user
from npu_dit.runtime import planes

EXCHANGE, BROADCAST = "cfg exchange", "cfg broadcast"
_CALLS = threading.local()  # depth of CFGParallel calls in this thread


def pairing_calls() -> bool:
    """Whether this thread is inside a `CFGParallel` call: a graph compiled now with `cfg_degree=2`
    has its calls paired (the backend refuses `cfg_degree=2` anywhere else)."""
    return getattr(_CALLS, "depth", 0) > 0


def _same_text_and_shapes(leaves: list, spec, ref_spec, ref: list, text: tuple[int, ...]) -> bool:
    """`leaves` has `ref`'s structure, its text inputs (by value) and its tensor shapes."""
    if spec != ref_spec or any(not _same(leaves[i], ref[i]) for i in text):
        return False
    return all(not isinstance(r, torch.Tensor) or (isinstance(x, torch.Tensor) and x.shape == r.shape)
               for x, (r, _) in zip(leaves, ref))


def _snapshot(leaves: list[Any]) -> list[tuple[Any, int | None]]:
    """Each leaf with its tensor version counter (an in-place write since makes it a different value)."""
    return [(x, x._version if isinstance(x, torch.Tensor) else None) for x in leaves]


def _same(x: Any, ref: tuple[Any, int | None]) -> bool:
    obj, version = ref
    if isinstance(obj, torch.Tensor):
        if not isinstance(x, torch.Tensor) or obj._version != version:
            return False
        if x is obj:
            return True
        return (x.shape == obj.shape and x.dtype == obj.dtype and x.device == obj.device
                and bool(torch.equal(x, obj)))
    if isinstance(x, torch.Tensor):
        return False
    try:
        return bool(x == obj)
    except Exception:  # noqa: BLE001 - values without a plain equality
        return x is obj


def _describe(out: Any) -> tuple[Any, list[Any]]:
    leaves, spec = pytree.tree_flatten(out)
    return spec, [("tensor", tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", x) for x in leaves]


class CFGPairing:
    """The state of one pipeline's transformer calls (one generation at a time)."""

    def __init__(self, ctx, module: Callable) -> None:
        self.ctx = ctx
        self.module = module
        self.warned = False
        self.reset()

    def reset(self) -> None:
        """A new generation. A pattern confirmed by the last one is kept as a guess (`carried`): a first
        call with its text inputs (by value) runs both branches at once from the first step; the
        generation's second call then confirms it, or (a new negative prompt) the step is finished as a
        learning step, silently."""
        confirmed = getattr(self, "phase", None) == "paired"
        self.carried = (self.spec, self.c0, self.c1, self.text, self.out_layout) if confirmed else None
        self.opening = False  # this generation's first step runs on the carried guess
        self.phase = "first"
        self.spec = None
        self.c0: list | None = None  # the learning step's first call (leaves, versions)
        self.c1: list | None = None  # ... and second call
        self.text: tuple[int, ...] = ()  # leaf positions where the two branches' inputs differ
        self.out_layout = None
        self.pending: tuple[list, Any] | None = None  # (this step's first call, the second branch's output)
        self.parallel_steps = 0  # this generation's steps whose two branches ran at once (tests, bench)
        self.serial_calls = 0

    # -- the calls ------------------------------------------------------------------------------

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if self.phase == "first" and self._fits_carried(leaves, spec):
            self.spec, _, self.c1, self.text, self.out_layout = self.carried
            self.c0, self.phase, self.opening = _snapshot(leaves), "paired", True
            return self._first_of_step(leaves, spec)
        if self.phase == "first":
            out = self._serial(0, leaves, spec)
            self.spec, self.c0, self.out_layout = spec, _snapshot(leaves), _describe(out)
            self.phase = "second"
            return out
        if self.phase == "second":
            out = self._serial(1, leaves, spec)
            self._learn(leaves, spec, out)
            return out
        if self.phase == "confirm":
            if self._repeats_step(leaves, spec):
                self.phase = "paired"
            else:
                self._fall_back("the third call does not repeat the first call's text inputs at a new step "
                                "(one transformer call per step?)")
        if self.phase == "paired":
            if self.pending is not None:
                return self._second_of_step(leaves, spec)
            if self._repeats_step(leaves, spec):
                return self._first_of_step(leaves, spec)
            self._warn("a call's text inputs are not those of the pattern learnt at the first step")
        return self._serial(0, leaves, spec)

    def _learn(self, leaves: list, spec, out: Any) -> None:
        if spec != self.spec:
            return self._fall_back("the first two calls take different arguments")
        text = tuple(i for i, x in enumerate(leaves) if not _same(x, self.c0[i]))
        shared = [i for i, x in enumerate(leaves) if i not in text and isinstance(x, torch.Tensor)]
        if not text or not shared:
            return self._fall_back("the first two calls share no input tensor" if not shared else "the first two calls are equal")
        if _describe(out) != self.out_layout:
            return self._fall_back("the two calls' outputs differ in structure or shape")
        self.c1, self.text, self.phase = _snapshot(leaves), text, "confirm"

    def _fits_carried(self, leaves: list, spec) -> bool:
        """A generation's first call with the text inputs and tensor shapes of the last generation's."""
        if self.carried is None:
            return False
        carried_spec, c0, _, text, _ = self.carried
        return _same_text_and_shapes(leaves, spec, carried_spec, c0, text)

    def _repeats_step(self, leaves: list, spec) -> bool:
        """A first call of a step: the same structure and tensor shapes as c0, c0's text inputs, and a
        new step (a shared input changed: without it, a second call of the step would run twice)."""
        return (_same_text_and_shapes(leaves, spec, self.spec, self.c0, self.text)
                and any(not _same(x, self.c0[i]) for i, x in enumerate(leaves) if i not in self.text))

    def _first_of_step(self, leaves: list, spec) -> Any:
        if self.ctx.branch == 0:
            mine = leaves
        else:  # the negative prompt's call, predicted: this call's inputs with the learnt text inputs
            mine = [self.c1[i][0] if i in self.text else x for i, x in enumerate(leaves)]
        out = self._run(mine, spec)
        outs = self._exchange(out)
        self.pending = (_snapshot(leaves), outs[1])
        self.parallel_steps += 1
        return outs[0]

    def _second_of_step(self, leaves: list, spec) -> Any:
        first, predicted = self.pending
        self.pending = None
        opening, self.opening = self.opening, False
        fits = spec == self.spec and all(
            _same(x, self.c1[i] if i in self.text else first[i]) for i, x in enumerate(leaves))
        if fits:
            return predicted
        if opening:  # the carried guess missed (a new negative prompt): this step learns, as a first step does
            self.parallel_steps -= 1
            if self.ctx.branch == 1:
                # the guessed call ran on this branch: its cache saw a call of this step already, so the
                # branch's caches start the generation again (every rank of the branch decides alike)
                from npu_dit.runtime.cache import reset_all

                reset_all()
            out = self._serial(1, leaves, spec)
            self.c0, self.phase = first, "second"
            self._learn(leaves, spec, out)
            return out
        self._warn("the second call of a step was not the predicted one (other text inputs, or inputs changed "
                   "between the two calls)")
        out = self._serial(1, leaves, spec)
        if spec == self.spec and all(_same(leaves[i], first[i]) for i in range(len(leaves)) if i not in self.text):
            self.c1 = _snapshot(leaves)  # new negative inputs at the same step: predict those from now on
        return out

    # -- running and exchanging -----------------------------------------------------------------

    def _run(self, leaves: list, spec) -> Any:
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        return self.module(*args, **kwargs)

    def _serial(self, branch: int, leaves: list, spec) -> Any:
        """Computed by `branch` alone, broadcast to the other branch's ranks (pair by pair)."""
        self.serial_calls += 1
        ctx = self.ctx
        src = ctx.pair_ranks[branch]
        out = self._run(leaves, spec) if ctx.branch == branch else None
        with warnings.catch_warnings():  # torch's own unpickling of a TreeSpec warns about its LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            layout = planes.host_broadcast_object(_describe(out) if out is not None else None, src,
                                                  ctx.pair_host_group, BROADCAST)
        out_spec, parts = layout
        if out is not None:
            tensors = [x for x in pytree.tree_leaves(out)]
        else:
            device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), planes.CPU)
            tensors = [torch.empty(p[1], dtype=p[2], device=device) if p[0] == "tensor" else p[1] for p in parts]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                planes.data_broadcast(t if t.is_contiguous() else t.contiguous(), src, ctx.pair_group, BROADCAST)
        return out if out is not None else pytree.tree_unflatten(tensors, out_spec)

    def _exchange(self, out: Any) -> list[Any]:
        """Every branch's output of this step, on every rank: one all-gather per output tensor."""
        leaves, spec = pytree.tree_flatten(out)
        gathered: list[list[Any]] = [[] for _ in range(self.ctx.degree)]
        for x in leaves:
            if not isinstance(x, torch.Tensor):
                for g in gathered:
                    g.append(x)
                continue
            buffer = x.new_empty((self.ctx.degree * x.numel(),))  # the branches' outputs end to end
            planes.data_all_gather_into_tensor(buffer, x.contiguous().reshape(-1), self.ctx.pair_group, EXCHANGE)
            buffer = buffer.view(self.ctx.degree, *x.shape)
            for b, g in enumerate(gathered):
                g.append(x if b == self.ctx.branch else buffer[b])
        return [pytree.tree_unflatten(g, spec) for g in gathered]

    def _fall_back(self, reason: str) -> None:
        self.phase = "serial"
        self._warn(reason)

    def _warn(self, reason: str) -> None:
        if not self.warned:
            self.warned = True
            warn_user(f"npu_dit: CFG parallelism: {reason}; those transformer calls run one after the other "
                      f"(exact, without the speed-up).")


class CFGParallel(torch.nn.Module):
    """`pipe.transformer` under CFG parallelism: the compiled transformer, its calls paired.

    Attributes the pipeline reads (`config`, `dtype`, `cache_context`, ...) are the transformer's.
    """

    def __init__(self, module: torch.nn.Module, *, ulysses_degree: int, tp_degree: int) -> None:
        super().__init__()
        self.module = module
        self._degrees = (ulysses_degree, tp_degree)
        self._pairing: CFGPairing | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @property
    def pairing(self) -> CFGPairing | None:
        return self._pairing

    def reset(self) -> None:
        """A new generation (the pipeline's `__call__`): the pattern is learnt again."""
        if self._pairing is not None:
            self._pairing.reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._pairing is None:  # the first call: every rank is here, the groups are made collectively
            from npu_dit.runtime.dist import ensure_cfg

            device = next((x.device for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)), None)
            self._pairing = CFGPairing(ensure_cfg(*self._degrees, device=device), self.module)
        _CALLS.depth = getattr(_CALLS, "depth", 0) + 1
        try:
            return self._pairing(args, kwargs)
        finally:
            _CALLS.depth -= 1
