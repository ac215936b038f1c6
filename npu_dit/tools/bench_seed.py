"""`npu-dit bench seed`: the seed's two whole-pipeline tables, reproduced in shape on a CPU.

The seed measured full models at 1024x1024 on Ascend NPUs (time for one whole generation):

    FLUX.1-dev        1 card 16.13 s | Ulysses-2 11.45 s | async Ulysses-2 10.47 s | + NPU attention 10.34 s
    Qwen-Image-Edit   Ulysses-2 + TEP 134.76 s (2 cards) | Ulysses-4 + TEP 67.44 s | + async 64.82 s | + NPU attention 64.43 s

Here every column is one `npu-dit generate MODEL --size bench ...` in fresh processes (one process, or
`torch.distributed.run` with Gloo; one thread per process, so one rank = one core), with untimed
warm-up generations first (they compile) and then one timed generation; the time per stage (text
encoding, denoising = the transformer calls, VAE, other) is rank 0's. Qwen-Image-Edit gets a 1-rank
column the seed does not have. Each column's image is compared with the 1-rank image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from npu_dit.runtime.dist import free_port
from npu_dit.tools.bench import machine, replace_section
from npu_dit.tools.generate import format_tokens

MARK_START = "<!-- bench:seed:start -->"
MARK_END = "<!-- bench:seed:end -->"
STAGES = ("text encoding", "denoising", "VAE", "other")


@dataclasses.dataclass(frozen=True)
class Column:
    key: str
    label: str
    ranks: int
    flags: tuple[str, ...]
    seed_s: float | None  # the seed's time for this column (None: not in the seed's table)
    does: str  # what the column changes, for the report


@dataclasses.dataclass(frozen=True)
class Table:
    key: str
    model: str
    title: str
    reference: str  # the seed's first column: its speed-ups are against it
    height: int
    width: int
    steps: int
    columns: tuple[Column, ...]


_ASYNC = "each all-to-all is started before the next Q/K/V projection and waited on after it, to overlap them"
_FIA = ("attention lowered to `npu_fused_infer_attention_score`; without torch_npu that is the reference op of the "
        "same schema (matmul + softmax in float32, the score matrix materialised), not a fused kernel")
TABLES: dict[str, Table] = {
    "flux": Table("flux", "flux.1-dev", "FLUX.1-dev", "1-rank", 512, 512, 4, (
        Column("1-rank", "1 rank", 1, (), 16.13,
               "one process: the whole pipeline, the transformer compiled by npu_dit with nothing to shard"),
        Column("ulysses-2", "Ulysses-2", 2, ("--ulysses", "2"), 11.45,
               "the transformer's tokens split over 2 ranks; all-to-alls around each attention swap the token split for a "
               "head split; text encoders and VAE run whole on every rank"),
        Column("async-ulysses-2", "async Ulysses-2", 2, ("--ulysses", "2", "--async-ulysses"), 10.47,
               f"Ulysses-2, and {_ASYNC}"),
        Column("async-ulysses-2-npu-fia", "+ NPU attention", 2,
               ("--ulysses", "2", "--async-ulysses", "--attention-backend", "npu_fia"), 10.34,
               f"async Ulysses-2, and {_FIA}"),
    )),
    "qwen-edit": Table("qwen-edit", "qwen-image-edit", "Qwen-Image-Edit", "ulysses-2-tep", 256, 256, 4, (
        Column("1-rank", "1 rank", 1, (), None,
               "one process (not in the seed's table): the whole pipeline, nothing sharded"),
        Column("ulysses-2-tep", "Ulysses-2 + TEP", 2, ("--ulysses", "2", "--text-encoder-parallel"), 134.76,
               "the transformer's tokens split over 2 ranks (two calls per step: true CFG); TEP: the Qwen2.5-VL "
               "language model tensor-parallel over the 2 ranks (its vision tower and the VAE run whole on every rank)"),
        Column("ulysses-4-tep", "Ulysses-4 + TEP", 4, ("--ulysses", "4", "--text-encoder-parallel"), 67.44,
               "the same over 4 ranks (a machine with fewer than 4 cores makes them share)"),
        Column("async-ulysses-4-tep", "+ async", 4, ("--ulysses", "4", "--text-encoder-parallel", "--async-ulysses"), 64.82,
               f"Ulysses-4 + TEP, and {_ASYNC}"),
        Column("async-ulysses-4-tep-npu-fia", "+ NPU attention", 4,
               ("--ulysses", "4", "--text-encoder-parallel", "--async-ulysses", "--attention-backend", "npu_fia"), 64.43,
               f"async Ulysses-4 + TEP, and {_FIA}"),
        Column("cfg-2", "CFG-2", 2, ("--cfg-parallel",), None,
               "not in the seed's table: the prompt's and the negative prompt's transformer calls of each step on "
               "the 2 ranks at once (the warm-up generation's first step learns the pairing, running them one after "
               "the other; the timed generation starts paired), one exchange of the outputs per step"),
        Column("cfg-2-ulysses-2-tep", "CFG-2 x Ulysses-2 + TEP", 4,
               ("--cfg-parallel", "--ulysses", "2", "--text-encoder-parallel"), None,
               "not in the seed's table: CFG-2, each branch's transformer calls Ulysses-2 over its 2 ranks; TEP over "
               "all 4"),
    )),
}


def parse_report(stdout: str) -> dict[str, Any]:
    """The JSON report `generate --json` prints on rank 0 (other output may surround it)."""
    decoder = json.JSONDecoder()
    lines = stdout.splitlines(keepends=True)
    found = None
    for i in (i for i, line in enumerate(lines) if line.strip() == "{"):
        try:
            value, _ = decoder.raw_decode("".join(lines[i:]))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "stages_s" in value:
            found = value
    if found is None:
        raise RuntimeError(f"no `generate --json` report in the output:\n{stdout[-3000:]}")
    return found


def generate_launcher(ranks: int) -> list[str]:
    """The command prefix of `npu-dit generate` in fresh processes: one, or torch.distributed.run (Gloo)."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}"]
    return [*launcher, "-m", "npu_dit.tools.cli", "generate"]


def column_command(table: Table, column: Column, *, size: str, height: int, width: int, steps: int, warmup: int,
                   out_png: str) -> list[str]:
    return [*generate_launcher(column.ranks), table.model, "--size", size, "--height", str(height),
            "--width", str(width), "--steps", str(steps), "--warmup", str(warmup), "--json", "--quiet",
            "--out", out_png, *column.flags]


def max_pixel_diff(a_png: str, b_png: str) -> int:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(a_png), dtype=np.int16)
    b = np.asarray(Image.open(b_png), dtype=np.int16)
    if a.shape != b.shape:
        raise RuntimeError(f"bench seed: {a_png} is {a.shape}, {b_png} is {b.shape}: the columns made different images")
    return int(np.abs(a - b).max())


def bench_seed(*, tables: list[str], columns: list[str] | None = None, size: str = "bench",
               geometry: dict[str, tuple[int, int, int]] | None = None, warmup: int = 1,
               timeout: float = 3600, log=print) -> dict[str, Any]:
    """Run each table's columns (all, or those in `columns`) in fresh processes. `geometry`: table key ->
    (height, width, steps), default the table's own."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    workdir = tempfile.mkdtemp(prefix="npu_dit_bench_seed_")
    results: dict[str, Any] = {"tables": {}, "setup": {
        "size": size, "warmup": warmup, "machine": machine(), "cores": os.cpu_count() or 1,
        "load_before": os.getloadavg()[0]}}
    unknown = [key for key in tables if key not in TABLES]
    if unknown or not tables:
        raise ValueError(f"bench seed: unknown table(s) {unknown or tables}; choose from {', '.join(TABLES)}")
    known_columns = {c.key for key in tables for c in TABLES[key].columns}
    if columns is not None and not set(columns) <= known_columns:
        raise ValueError(f"bench seed: no column {sorted(set(columns) - known_columns)} in {', '.join(tables)}; "
                         f"the columns: {', '.join(sorted(known_columns))}")
    for key in tables:
        table = TABLES[key]
        height, width, steps = (geometry or {}).get(key, (table.height, table.width, table.steps))
        chosen = [c for c in table.columns if columns is None or c.key in columns]
        if not chosen:
            continue
        rows = []
        for column in chosen:
            out_png = os.path.join(workdir, f"{key}-{column.key}.png")
            cmd = column_command(table, column, size=size, height=height, width=width, steps=steps, warmup=warmup,
                                 out_png=out_png)
            log(f"{table.title}: {column.label} on {column.ranks} process{'es' if column.ranks > 1 else ''} ...")
            load = os.getloadavg()[0]  # other jobs on the machine, as the column starts
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"bench seed: {' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            report = parse_report(proc.stdout)
            first = os.path.join(workdir, f"{key}-1-rank.png")
            diff = max_pixel_diff(first, out_png) if column.key != "1-rank" and os.path.exists(first) else None
            row = {**dataclasses.asdict(column), "stages_s": report["stages_s"],
                   "cpu_s": [m["cpu_s"] for m in report["peak_memory_per_rank"]],
                   "rss_mib": [m["host_rss_mib"] for m in report["peak_memory_per_rank"]],
                   "cpu_s_per_stage": [m.get("cpu_s_per_stage") for m in report["peak_memory_per_rank"]],
                   "transformer_s": report.get("transformer_s"),
                   "tokens": report.get("transformer_tokens"), "max_pixel_diff_vs_1_rank": diff,
                   "process_wall_s": time.perf_counter() - start, "load_before": load}
            rows.append(row)
            log(f"  total {row['stages_s']['total']:.2f} s ("
                + ", ".join(f"{s} {row['stages_s'][s]:.2f}" for s in STAGES)
                + f"); whole command {row['process_wall_s']:.0f} s")
        results["tables"][key] = {"key": key, "model": table.model, "title": table.title, "reference": table.reference,
                                  "height": height, "width": width, "steps": steps,
                                  "config": _describe_config(table.model, size), "rows": rows}
    results["setup"]["load_after"] = os.getloadavg()[0]
    return results


def _describe_config(model: str, size: str) -> str:
    from npu_dit.models import get_model

    cfg = get_model(model).config(size)
    blocks = (f"{cfg['num_layers']} double + {cfg['num_single_layers']} single blocks" if "num_single_layers" in cfg
              else f"{cfg['num_layers']} blocks")
    return (f"{size} config: {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']} = hidden "
            f"{cfg['num_attention_heads'] * cfg['attention_head_dim']}, {blocks}")


# --------------------------------------------------------------------------------------------
# tables


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_seed_table(t: dict[str, Any]) -> str:
    rows = {r["key"]: r for r in t["rows"]}
    one = rows.get("1-rank")
    ref = rows.get(t["reference"])
    ref_seed = next((r["seed_s"] for r in t["rows"] if r["key"] == t["reference"]), None)
    vs_ref = t["reference"] != "1-rank"
    ref_label = ref["label"] if ref else t["reference"]
    head = ["configuration", "ranks", *STAGES, "total", "vs 1 rank"]
    if vs_ref:
        head.append(f"vs {ref_label}")
    head += [f"seed: NPU, full model (vs {ref_label if vs_ref else '1 card'})", "CPU s per rank", "CPU-time vs 1 rank", "cores busy",
             "peak RSS per rank", "max 8-bit diff vs 1 rank"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in t["rows"]:
        s = r["stages_s"]
        cells = [r["label"], str(r["ranks"]), *(f"{s[k]:.2f} s" for k in STAGES), f"**{s['total']:.2f} s**",
                 _ratio(one and one["stages_s"]["total"], s["total"])]
        if vs_ref:
            cells.append(_ratio(ref and ref["stages_s"]["total"], s["total"]))
        cells += [f"{r['seed_s']:.2f} s ({_ratio(ref_seed, r['seed_s'])})" if r["seed_s"] else "-",
                  ", ".join(f"{c:.1f}" for c in r["cpu_s"]), _ratio(one and one["cpu_s"][0], max(r["cpu_s"])),
                  f"{sum(r['cpu_s']) / s['total']:.2f}",
                  ", ".join(f"{m:.0f}" for m in r["rss_mib"]) + " MiB",
                  "-" if r["max_pixel_diff_vs_1_rank"] is None else str(r["max_pixel_diff_vs_1_rank"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def observations(t: dict[str, Any], cores: int) -> list[str]:
    """What the numbers say, column against column, with the seed's figure beside each."""
    rows = {r["key"]: r for r in t["rows"]}
    notes = []
    keys = [r["key"] for r in t["rows"]]
    for a, b in zip(keys, keys[1:]):  # each column against the one before it, as the seed's table reads
        ra, rb = rows[a], rows[b]
        change = {k: 100 * (rb["stages_s"][k] / ra["stages_s"][k] - 1) if ra["stages_s"][k] else 0.0
                  for k in ("total", *STAGES[:3])}
        stages = ", ".join(f"{k} {change[k]:+.0f} %" for k in STAGES[:3])
        seed = f"; seed {100 * (rb['seed_s'] / ra['seed_s'] - 1):+.1f} %" if ra["seed_s"] and rb["seed_s"] else ""
        notes.append(f"{ra['label']} → {rb['label']}: total {change['total']:+.1f} % ({stages}){seed}.")
    if all("load_before" in r for r in t["rows"]):
        notes.append("1-minute load average as each column started (this column's own processes not yet running): "
                     + ", ".join(f"{r['load_before']:.1f}" for r in t["rows"]) + ".")
    crowded = [r for r in t["rows"] if r["ranks"] > cores]
    if crowded:
        ranks = crowded[0]["ranks"]
        bound = ", ".join(f"{sum(r['cpu_s']) / cores:.1f}" for r in crowded)
        measured = ", ".join(f"{r['stages_s']['total']:.1f}" for r in crowded)
        notes.append(f"{', '.join(r['label'] for r in crowded)}: {ranks} processes on {cores} cores. At most {cores} run at "
                     f"once, so the wall time is at least the ranks' CPU seconds summed / {cores} = {bound} s (measured "
                     f"{measured} s): splitting the work {ranks} ways gives each rank less to do but cannot beat {cores} "
                     f"ways here, and what is not sharded (the VAE, the embeddings) runs on every rank.")
    return notes


def format_markdown(results: dict[str, Any], *, images: dict[str, str] | None = None) -> str:
    parts = []
    for key, t in results["tables"].items():
        tokens = t["rows"][0].get("tokens")
        parts += [
            f"**{t['title']}** (`{t['model']}`, {t['config']}; {t['height']}x{t['width']}, {t['steps']} steps"
            + (f", {format_tokens(tokens)} tokens per transformer call" if tokens else "") + ")",
            "",
            format_seed_table(t),
            "",
        ]
        if images and key in images:
            parts += [f"![{t['title']}: time per stage and speed-up against the seed]({images[key]})", ""]
        parts += ["What each column does:", ""]
        parts += [f"- **{r['label']}** ({r['ranks']} rank{'s' if r['ranks'] > 1 else ''}): {r['does']}." for r in t["rows"]]
        notes = observations(t, results["setup"]["cores"])
        if notes:
            parts += ["", "Measured:", ""] + [f"- {n}" for n in notes]
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def write_outputs(out_dir: str, results: dict[str, Any], command: str, log=print) -> list[str]:
    """DIR/seed-tables.md, DIR/seed-tables.json and one PNG per table (when matplotlib is there)."""
    from npu_dit.tools.bench_seed_chart import write_charts

    os.makedirs(out_dir, exist_ok=True)
    images = write_charts(results, out_dir, prefix="seed-", log=log)
    written = list(images.values())
    with open(os.path.join(out_dir, "seed-tables.json"), "w") as f:
        json.dump({**results, "command": command}, f, indent=1)
    with open(os.path.join(out_dir, "seed-tables.md"), "w") as f:
        f.write(section_body(results, command, images={k: os.path.basename(p) for k, p in images.items()}) + "\n")
    return [os.path.join(out_dir, "seed-tables.md"), os.path.join(out_dir, "seed-tables.json"), *written]


def section_body(results: dict[str, Any], command: str, *, images: dict[str, str] | None = None) -> str:
    setup = results["setup"]
    return "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {setup['machine']}; Gloo over loopback, one thread per process (1 rank = 1 core); 1-minute "
        f"load average {setup['load_before']:.1f} before, {setup.get('load_after', float('nan')):.1f} after.  ",
        f"Each column: fresh processes, {setup['warmup']} untimed warm-up generation(s) (they compile), then one timed "
        f"generation; stage times are rank 0's, CPU seconds and peak RSS each rank's; random `{setup['size']}` weights, "
        f"float32. The seed's numbers are full models at 1024x1024 on Ascend NPUs: compare the shape (speed-ups), "
        f"not the seconds. *CPU-time vs 1 rank*: the 1-rank run's CPU seconds over the busiest rank's, the speed-up "
        f"each rank's own work allows (blocked waits use no CPU), which other jobs on the machine move less than the wall time; "
        f"*cores busy*: all ranks' CPU seconds over the wall time.",
        "",
        format_markdown(results, images=images),
    ])


def write_section(path: str, command: str, results: dict[str, Any], log=print) -> None:
    """The marked section of `path` (docs/BENCHMARKS.md), the charts beside it as bench-seed-TABLE.png."""
    from npu_dit.tools.bench_seed_chart import write_charts

    folder = os.path.dirname(os.path.abspath(path))
    images = write_charts(results, folder, prefix="bench-seed-", log=log)
    body = "\n".join([MARK_START, section_body(results, command, images={k: os.path.basename(p) for k, p in images.items()}),
                      MARK_END])
    replace_section(path, MARK_START, MARK_END, body, heading="## The seed's tables, whole pipelines on CPU (issue #12)")
