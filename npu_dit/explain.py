"""`npu_dit.explain()`: what the backend did to each graph it compiled, in words.

For every recent compile: the passes that ran (with what fired and how long they took), each token
stream sharded or replicated and why, the collectives inserted, and any refusal or fallback with its
reason. `npu-dit inspect` prints the same report for the graph it traces.
"""

from __future__ import annotations

from typing import Any

from npu_dit.plans import SHARDING_META_KEY, SPATIAL_META_KEY, TP_META_KEY

_COLLECTIVES = ("all_to_all", "all_gather", "all_reduce", "localize", "patch_rows", "global_tables", "halo_exchange",
                "group_norm", "gather_rows")


def format_record(record: Any) -> str:
    cfg, report = record.config, record.report
    where = f" on rank {record.parallel.rank} of {record.parallel.world_size}" if record.parallel else ""
    lines = [f"{record.tag}: {record.num_nodes_captured} nodes captured{where}"]
    if report.fell_back:
        lines.append(f"  runs UNREWRITTEN: {report.fallback_reason}")
    elif not report.records:
        lines.append("  no rewriting pass enabled: runs as captured")
    for r in report.records:
        fired = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items())) or "-"
        state = "modified" if r.modified else "unchanged"
        lines.append(f"  pass {r.name:20} {state:9} {r.seconds * 1000:8.1f} ms  {fired}")
    meta = record.graph.meta
    plan = (meta.get(SHARDING_META_KEY) or meta.get(SPATIAL_META_KEY)) if not report.fell_back else None
    if plan is not None:
        lines.extend(f"  {line}" for line in plan.describe())
        counts = report.counts
        inserted = ", ".join(f"{counts[k]} {k}" for k in _COLLECTIVES if counts.get(k))
        lines.append(f"  inserted: {inserted or 'nothing'}")
    tp_plan = record.graph.meta.get(TP_META_KEY) if not report.fell_back else None
    if tp_plan is not None:
        lines.extend(f"  {line}" for line in tp_plan.describe())
        for module, kind, reason in tp_plan.placements:
            if kind in ("replicated", "gather"):
                lines.append(f"    {module}: {kind} ({reason})")
        if plan is None:
            counts = report.counts
            inserted = ", ".join(f"{counts[k]} {k}" for k in _COLLECTIVES if counts.get(k))
            lines.append(f"  inserted: {inserted or 'nothing'}")
    if cfg.cache is not None and not report.fell_back:
        lines.append(f"  cache: {cfg.cache}")
    return "\n".join(lines)


def explain(last: int | None = None) -> str:
    """The report for the most recent compiles (all kept ones by default)."""
    from npu_dit.backend import RECORDS

    records = list(RECORDS)[-last:] if last else list(RECORDS)
    if not records:
        return "npu_dit: nothing compiled yet in this process"
    return "\n".join(format_record(r) for r in records)
