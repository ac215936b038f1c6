"""What tensor parallelism did to one graph, for `inspect`: each linear's placement (grouped over
blocks: `transformer_blocks.*.attn.to_q: column x 19`), the replicated ones with their reasons, the
collectives of rank 0 with their bytes per call, and the parameter bytes per rank."""

from __future__ import annotations

import re
from typing import Any

from npu_dit.plans import TensorParallelPlan


def grouped_placements(plan: TensorParallelPlan) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], int] = {}
    for module, kind, reason in plan.placements:
        pattern = re.sub(r"\.\d+\.", ".*.", module)
        # the reason names the module it met; blocks differ only by their index
        key = (pattern, kind, re.sub(r"\.\d+\.", ".*.", reason))
        groups[key] = groups.get(key, 0) + 1
    return [{"modules": p, "placement": k, "count": n, "reason": r} for (p, k, r), n in groups.items()]


def tp_summary(plan: TensorParallelPlan, collectives: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for _, kind, _ in plan.placements:
        counts[kind] = counts.get(kind, 0) + 1
    return {
        "tp_degree": plan.world_size,
        "placements_by_kind": counts,
        "placements": grouped_placements(plan),
        "parameter_bytes": plan.parameter_bytes,
        "parameter_bytes_per_rank": plan.local_parameter_bytes,
        "per_rank_ratio": plan.local_parameter_bytes / plan.parameter_bytes if plan.parameter_bytes else 1.0,
        "collectives": collectives or {},
    }


def format_tp(summary: dict[str, Any], human_bytes) -> list[str]:
    lines = [f"  tensor parallel (tp_degree={summary['tp_degree']}): "
             + ", ".join(f"{n} {k}" for k, n in sorted(summary["placements_by_kind"].items())) + " linears"]
    for row in summary["placements"]:
        why = "" if row["placement"] in ("column", "row") else f"  ({row['reason']})"
        lines.append(f"    {row['modules']:<52} {row['placement']:<10} x {row['count']:<3}{why}")
    ratio = summary["per_rank_ratio"]
    lines.append(f"  parameter bytes per rank: {human_bytes(summary['parameter_bytes_per_rank'])} of "
                 f"{human_bytes(summary['parameter_bytes'])} ({ratio:.3f} of the unsharded model)")
    for kind, entry in summary["collectives"].items():
        lines.append(f"    {entry['count']:5d} x {kind:<34} {human_bytes(entry['bytes'])} per call")
    return lines
