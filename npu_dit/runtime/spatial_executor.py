"""The executor of a spatially sharded graph (the VAE under `spatial_degree`).

Per call, on every rank: the ranks check they were given the same global shapes (one small
all-gather on the host plane when the call's signature is new, as for Ulysses), the input is cut into contiguous row bands of whole `align`-row units
(`spatial_ops.band_units`), the SymInt inputs equal to the height get this band's rows, every rank's
unit count is appended, the rewritten graph runs, and the outputs listed in the plan are gathered
along the height (padded to the longest band, all-gathered, trimmed: Gloo cannot gather uneven
tensors). Inputs whose height `align` does not divide, or that would leave a rank a band too thin
for a halo, run the captured graph on every rank (the same decision everywhere: it depends only on
the global shape the ranks just agreed on), after one warning.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from npu_dit.runtime.executor import gather_uneven

from npu_dit.errors import warn_user
from npu_dit.plans import SpatialPlan
from npu_dit.runtime.agreement import ShapeAgreement
from npu_dit.runtime.dist import ParallelContext, process_group
from npu_dit.runtime.grad import refuse_grad
from npu_dit.runtime.spatial_ops import band_units


class SpatialExecutor:
    def __init__(
        self,
        compiled: Callable,
        fallback: Callable,
        *,
        plan: SpatialPlan,
        ctx: ParallelContext,
        scalar_inputs: Sequence[int] = (),
    ) -> None:
        self.compiled, self.fallback = compiled, fallback
        self.plan, self.ctx = plan, ctx
        self.scalar_inputs = tuple(scalar_inputs)
        self._warned: set[int] = set()
        self.agree = ShapeAgreement()

    def __call__(self, *args: Any) -> Any:
        plan = self.plan
        refuse_grad(args, "the spatial collectives are not differentiable (the output would come back detached)")
        self.agree(args)
        height = args[plan.input_index].shape[plan.dim]
        units = band_units(height, plan.align, plan.world_size)
        if height % plan.align or min(units) < plan.min_units:
            self._warn_unsharded(height)
            return self.fallback(*args)
        local = list(args)
        for index in self.scalar_inputs:
            local[index] = local[index].item()
        start = plan.align * sum(units[: self.ctx.rank])
        rows = plan.align * units[self.ctx.rank]
        local[plan.input_index] = args[plan.input_index].narrow(plan.dim, start, rows).contiguous()
        for index in plan.local_symints:
            local[index] = rows
        local.extend(units)
        outputs = self.compiled(*local)
        return self.gather_outputs(outputs, units)

    def gather_outputs(self, outputs: Any, units: list[int]) -> Any:
        result = list(outputs)
        for index, dim in self.plan.outputs:
            tensor = result[index]
            per_unit = tensor.shape[dim] // units[self.ctx.rank]
            result[index] = gather_uneven(tensor, dim, [per_unit * u for u in units], group=process_group(self.ctx))
        return type(outputs)(result) if isinstance(outputs, tuple) else result

    def _warn_unsharded(self, height: int) -> None:
        if height in self._warned:
            return
        self._warned.add(height)
        plan = self.plan
        warn_user(
            f"npu_dit: spatial_degree={plan.world_size}: a height of {height} rows cannot be cut into "
            f"{plan.world_size} bands of at least {plan.min_units} unit(s) of {plan.align} rows (this graph "
            f"downsamples by {plan.align}); every rank runs it whole (results stay correct). Use a height that "
            f"is a multiple of {plan.align} and at least {plan.world_size * plan.min_units * plan.align} rows."
        )
