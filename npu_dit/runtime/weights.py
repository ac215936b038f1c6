"""Tensor-parallel weights: each rank keeps only its shards, and may release the full parameters.

The executor of a tensor-parallel graph feeds this rank's shard of every sharded parameter in place
of the parameter Dynamo passes in. Shards are cut once, on the first call, and kept here keyed by
the parameter object (weakly), so a recompiled graph finds them again. With `release_weights=True`
(the default) the full parameters are then released the way FSDP frees them,
`param.untyped_storage().resize_(0)`: shape, stride and dtype stay, so Dynamo's guards (metadata,
not storage) still pass and nothing recompiles, but the module can no longer run without the
compiled program (eagerly, `.to()`, `state_dict()` of real values). Pass
`options={"release_weights": False}` to keep the full weights (memory is then not saved).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from npu_dit.plans import TensorParallelPlan, WeightShard, feature_blocks

_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> {(dim, segs, world, rank): shard}
_RELEASED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> True once its storage is freed


def cut_shard(full: torch.Tensor, shard: WeightShard, world: int, rank: int) -> torch.Tensor:
    pieces = [full.narrow(shard.dim, start, length) for start, length in feature_blocks(shard.segs, world, rank)]
    return torch.cat(pieces, shard.dim).detach().clone() if len(pieces) > 1 else pieces[0].detach().clone()


def is_released(param: torch.Tensor) -> bool:
    return param in _RELEASED


class WeightFeeder:
    """Replaces the sharded parameters in a call's arguments by this rank's shards."""

    def __init__(self, plan: TensorParallelPlan) -> None:
        self.plan = plan
        self.local: list[torch.Tensor] | None = None

    def __call__(self, args: Sequence[Any]) -> list[Any]:
        if self.local is None:
            self.local = self.prepare(args)
        args = list(args)
        for shard, tensor in zip(self.plan.shards, self.local):
            args[shard.index] = tensor
        return args

    def prepare(self, args: Sequence[Any]) -> list[torch.Tensor]:
        world, rank = self.plan.world_size, self.plan.rank
        local = []
        for shard in self.plan.shards:
            param = args[shard.index]
            key = (shard.dim, shard.segs, world, rank)
            held = _SHARDS.get(param, {})
            if key not in held:
                if param in _RELEASED:
                    raise RuntimeError(
                        f"npu_dit: parameter {shard.name} was released by tensor parallelism under another "
                        f"split and cannot be cut again; compile with options={{'release_weights': False}}"
                    )
                held[key] = cut_shard(param, shard, world, rank)
                _SHARDS[param] = held
            local.append(held[key])
        if self.plan.release_weights:
            for shard in self.plan.shards:
                param = args[shard.index]
                if param not in _RELEASED and param.device.type != "meta":
                    param.untyped_storage().resize_(0)
                    _RELEASED[param] = True
        return local


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this process really holds for `module`: live storages plus the shards
    cut from released ones (what a tensor-parallel rank keeps)."""
    total = 0
    for param in module.parameters():
        if param in _RELEASED:
            total += sum(t.numel() * t.element_size() for t in _SHARDS.get(param, {}).values())
        else:
            total += param.numel() * param.element_size()
    return total
