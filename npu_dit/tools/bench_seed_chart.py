"""Bar charts of `npu-dit bench seed`, one PNG per table (matplotlib, an optional dependency).

Left: the time per stage of each column, stacked (text encoding, denoising, VAE, other), the total at the
end of the bar. Right: each column's speed-up against the seed's first column: the seed's own, the wall
time measured here, and the busiest rank's CPU time (the work each rank does, which other jobs on the
machine move less than the wall time). Without matplotlib nothing is drawn and the caller is told how to get the charts.
"""

from __future__ import annotations

import os
from typing import Any

MISSING = ("charts skipped: matplotlib is not installed. Install it with `pip install 'npu-dit[bench]'` (or "
           "`pip install matplotlib`), then redraw from the saved results without rerunning: "
           "`npu-dit bench seed --from-json DIR/seed-tables.json --out DIR`")
COLORS = {"text encoding": "#4e79a7", "denoising": "#f28e2b", "VAE": "#59a14f", "other": "#bab0ac"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_table(t: dict[str, Any], path: str, *, subtitle: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from npu_dit.tools.bench_seed import STAGES

    rows = t["rows"]
    labels = [r["label"] if r["ranks"] == 1 else f"{r['label']}\n({r['ranks']} ranks)" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 2.2), gridspec_kw={"width_ratios": [3, 2]},
                                      layout="constrained")
    y = list(range(len(rows)))[::-1]
    start = [0.0] * len(rows)
    for stage in STAGES:
        widths = [r["stages_s"][stage] for r in rows]
        left.barh(y, widths, left=start, color=COLORS[stage], label=stage, height=0.6)
        start = [a + b for a, b in zip(start, widths)]
    for yi, r in zip(y, rows):
        left.text(r["stages_s"]["total"], yi, f" {r['stages_s']['total']:.2f} s", va="center", fontsize=9)
    left.set_yticks(y, labels, fontsize=9)
    left.set_xlabel("seconds, one generation (rank 0)")
    left.set_xlim(0, max(r["stages_s"]["total"] for r in rows) * 1.18)
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(STAGES), fontsize=8, frameon=False)
    left.set_title("time per stage, measured here", fontsize=10)

    ref = next((r for r in rows if r["key"] == t["reference"]), None)
    seeded = [r for r in rows if r["seed_s"]]
    ref_seed = next((r["seed_s"] for r in rows if r["key"] == t["reference"]), None)
    if ref is not None and ref_seed and seeded:
        ys = list(range(len(seeded)))[::-1]
        bars = [  # (label, values, colour): each against the reference column
            ("seed (NPU, full model)", [ref_seed / r["seed_s"] for r in seeded], "#9c9c9c"),
            ("measured here: wall time", [ref["stages_s"]["total"] / r["stages_s"]["total"] for r in seeded], "#e15759"),
            ("here: CPU time of the busiest rank", [max(ref["cpu_s"]) / max(r["cpu_s"]) for r in seeded], "#f1a7a8"),
        ]
        for i, (label, values, colour) in enumerate(bars):
            offset = 0.27 * (1 - i)
            right.barh([v + offset for v in ys], values, height=0.26, color=colour, label=label)
            for v, value in zip(ys, values):
                right.text(value, v + offset, f" {value:.2f}x", va="center", fontsize=7)
        right.set_yticks(ys, [r["label"] for r in seeded], fontsize=9)
        right.axvline(1.0, color="black", linewidth=0.8)
        right.set_xlim(0, max(max(values) for _, values, _ in bars) * 1.25)
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
        right.set_xlabel(f"speed-up against {ref['label']}")
        right.set_title("shape against the seed's table", fontsize=10)
    else:
        right.axis("off")
        right.text(0.5, 0.5, "the seed's first column was not run", ha="center", va="center")
    fig.suptitle(f"{t['title']}: {t['height']}x{t['width']}, {t['steps']} steps, {t['config']}" + subtitle, fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_charts(results: dict[str, Any], folder: str, *, prefix: str, log=print) -> dict[str, str]:
    """{table key: PNG path} for every table drawn into `folder`; {} (and a message) without matplotlib."""
    if not have_matplotlib():
        log(MISSING)
        return {}
    subtitle = f"\n{results['setup']['machine']}; Gloo, one process (one thread) per rank"
    paths = {}
    for key, t in results["tables"].items():
        path = os.path.join(folder, f"{prefix}{key}.png")
        draw_table(t, path, subtitle=subtitle)
        paths[key] = path
    return paths
