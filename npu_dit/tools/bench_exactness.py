"""`npu-dit bench exactness`: every parallel column gives the serial pipeline's image (issue #12, item 4).

For each seed model's offline pipeline (tiny random weights, float32), every column of the seed's two
tables — 1 rank, Ulysses-2, async, async + NPU attention; for the Qwen models Ulysses-2 + TEP, Ulysses-4
+ TEP, + async, + NPU attention — plus TP-2, VAE parallel and the cache is one `npu-dit generate`
in fresh processes (`torch.distributed.run` over Gloo for several ranks), exactly as a user runs it,
writing the float32 image (`--out PATH.npy`, before 8-bit rounding). Each column's image is compared
with its reference: the 1-rank image, or for the cached columns the 1-rank cached image (the cache
skips steps, so it is compared with the serial cached run, and both must have cached the same steps).

The graphs every column compiled are listed with the backend's decision: a column whose transformer
fell back (ran unrewritten) is exact for a reason that is not the one it claims, so it is reported as
such, not as a pass.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
from typing import Any, Callable

from npu_dit.tools.bench import machine, replace_section
from npu_dit.tools.bench_seed import generate_launcher, parse_report

MARK_START = "<!-- bench:exactness:start -->"
MARK_END = "<!-- bench:exactness:end -->"
TOLERANCE = 1e-4
# a threshold no relative residual change reaches: every step after the warm-up is cached, on one rank
# and on several alike, so the cached columns compare the same schedule of computed and cached steps
CACHE = '{"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 100.0}'


@dataclasses.dataclass(frozen=True)
class Column:
    key: str
    ranks: int
    flags: tuple[str, ...]
    reference: str = "1-rank"
    qwen_only: bool = False  # the seed's Qwen-Image-Edit table (TEP over the Qwen2.5-VL language model)
    true_cfg_only: bool = False  # CFG parallelism: the models that run true CFG by default
    expects: tuple[str, ...] = ()  # backend counts the column's graphs must show (what it claims to do)


_TEP = ("all_to_all", "all_reduce")  # Ulysses in the transformer, row-parallel linears in the text encoder
COLUMNS: tuple[Column, ...] = (
    Column("1-rank", 1, ()),
    Column("ulysses-2", 2, ("--ulysses", "2"), expects=("all_to_all",)),
    Column("async-ulysses-2", 2, ("--ulysses", "2", "--async-ulysses"), expects=("all_to_all",)),
    Column("async-ulysses-2-npu-fia", 2, ("--ulysses", "2", "--async-ulysses", "--attention-backend", "npu_fia"),
           expects=("all_to_all",)),
    Column("ulysses-2-tep", 2, ("--ulysses", "2", "--text-encoder-parallel"), qwen_only=True, expects=_TEP),
    Column("ulysses-4-tep", 4, ("--ulysses", "4", "--text-encoder-parallel"), qwen_only=True, expects=_TEP),
    Column("async-ulysses-4-tep", 4, ("--ulysses", "4", "--text-encoder-parallel", "--async-ulysses"), qwen_only=True,
           expects=_TEP),
    Column("async-ulysses-4-tep-npu-fia", 4,
           ("--ulysses", "4", "--text-encoder-parallel", "--async-ulysses", "--attention-backend", "npu_fia"),
           qwen_only=True, expects=_TEP),
    Column("tp-2", 2, ("--tp", "2", "--text-encoder-parallel"), expects=("all_reduce",)),
    Column("vae-parallel-2", 2, ("--ulysses", "2", "--vae-parallel"), expects=("all_to_all", "halo_exchange")),
    Column("cfg-2", 2, ("--cfg-parallel",), true_cfg_only=True),
    Column("cfg-2-ulysses-2-tep", 4, ("--cfg-parallel", "--ulysses", "2", "--text-encoder-parallel"),
           true_cfg_only=True, expects=_TEP),
    Column("cache-1-rank", 1, ("--cache", CACHE), reference="cache-1-rank"),  # the cached columns' reference
    Column("ulysses-2-cache", 2, ("--ulysses", "2", "--cache", CACHE), reference="cache-1-rank",
           expects=("all_to_all",)),
    Column("cfg-2-cache", 2, ("--cfg-parallel", "--cache", CACHE), reference="cache-1-rank", true_cfg_only=True),
)


def columns_for(model: str) -> list[Column]:
    from npu_dit.models import get_model

    spec = get_model(model)
    qwen = spec.transformer_cls != "FluxTransformer2DModel"
    return [c for c in COLUMNS if (qwen or not c.qwen_only) and (spec.true_cfg or not c.true_cfg_only)]


def column_command(model: str, column: Column, *, height: int, width: int, steps: int, out_npy: str) -> list[str]:
    return [*generate_launcher(column.ranks), model, "--height", str(height), "--width", str(width),
            "--steps", str(steps), "--json", "--quiet", "--out", out_npy, *column.flags]


def _check(column: Column, report: dict[str, Any]) -> list[str]:
    """What the column claims but its graphs do not show: fallbacks, missing collectives."""
    problems = [f"{g['tag']} fell back: {g['reason']}" for g in report["compiled_graphs"] if g["fell_back"]]
    counts: dict[str, int] = {}
    for g in report["compiled_graphs"]:
        for key, value in g["counts"].items():
            counts[key] = counts.get(key, 0) + value
    problems += [f"no {key} in any compiled graph" for key in column.expects if not counts.get(key)]
    if "--cfg-parallel" in column.flags and not report.get("cfg_parallel_steps"):
        problems.append("no step ran its two CFG branches at once")
    if "--cache" in column.flags:
        patterns = report.get("cache_patterns") or {}
        if not any("0" in p for p in patterns.values()):
            problems.append(f"no step was cached ({patterns})")
    return problems


def bench_exactness(models: list[str], columns: list[str] | None = None, *, height: int = 128, width: int = 128,
                    steps: int = 4, timeout: float = 900.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every column of every model; {model: {column: entry}}, entry = error against the reference, the
    reference, wall seconds, problems (fallbacks, collectives missing, nothing cached)."""
    import numpy as np

    from npu_dit.models import get_model

    for model in models:
        get_model(model)  # unknown names fail before anything runs
    known = {c.key for c in COLUMNS}
    if columns is not None and not set(columns) <= known:
        raise ValueError(f"bench exactness: no column {sorted(set(columns) - known)}; the columns: {', '.join(c.key for c in COLUMNS)}")
    results: dict[str, Any] = {"setup": {"height": height, "width": width, "steps": steps, "machine": machine(),
                                         "tolerance": TOLERANCE, "cache": CACHE}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="npu_dit_exactness_") as tmp:
        for model in models:
            chosen = [c for c in columns_for(model) if columns is None or c.key in columns]
            needed = {c.reference for c in chosen if c.key != c.reference} - {c.key for c in chosen}
            chosen = [c for c in columns_for(model) if c.key in needed] + chosen  # references first
            images: dict[str, Any] = {}
            entries: dict[str, Any] = {}
            for column in chosen:
                out = os.path.join(tmp, f"{model}-{column.key}.npy")
                command = column_command(model, column, height=height, width=width, steps=steps, out_npy=out)
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                log(f"{model} / {column.key} ({column.ranks} process{'es' if column.ranks > 1 else ''}) ...")
                start = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
                seconds = time.perf_counter() - start
                if proc.returncode:
                    raise RuntimeError(f"bench exactness: {model} / {column.key} failed (exit {proc.returncode}):\n"
                                       f"{' '.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                report = parse_report(proc.stdout)
                images[column.key] = np.load(out)
                entry: dict[str, Any] = {"ranks": column.ranks, "seconds": seconds, "problems": _check(column, report),
                                         "reference": None, "error": None, "cache_patterns": report.get("cache_patterns")}
                if column.key != column.reference:  # a reference column is compared with nothing
                    reference = images[column.reference]
                    entry["reference"] = column.reference
                    entry["error"] = float(np.abs(images[column.key] - reference).max())
                    if "--cache" in column.flags and entry["cache_patterns"] != entries[column.reference]["cache_patterns"]:
                        entry["problems"].append(f"cached other steps than {column.reference}: {entry['cache_patterns']} "
                                                 f"vs {entries[column.reference]['cache_patterns']}")
                entries[column.key] = entry
                error = "reference" if entry["error"] is None else f"max abs err {entry['error']:.1e}"
                log(f"  {error}, {seconds:.0f} s{'; ' + '; '.join(entry['problems']) if entry['problems'] else ''}")
            results["models"][model] = entries
    return results


def failures(results: dict[str, Any]) -> list[str]:
    """Every column over the tolerance or with a problem, one line each (empty: all exact)."""
    lines = []
    for model, entries in results["models"].items():
        for key, e in entries.items():
            if e["error"] is not None and e["error"] > TOLERANCE:
                lines.append(f"{model} / {key}: max abs err {e['error']:.2e} > {TOLERANCE:g} against {e['reference']}")
            lines += [f"{model} / {key}: {p}" for p in e["problems"]]
    return lines


def format_results(results: dict[str, Any], command: str) -> str:
    setup = results["setup"]
    keys = [c.key for c in COLUMNS if any(c.key in entries for entries in results["models"].values())]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {setup['machine']}.  ",
        f"Each model's tiny offline pipeline (random weights, float32), {setup['height']}x{setup['width']}, "
        f"{setup['steps']} steps; each column one `npu-dit generate` in fresh processes (Gloo), its float32 image "
        f"(`--out PATH.npy`) against the 1-rank image — the cached columns against the 1-rank cached image "
        f"(`--cache '{setup['cache']}'`: every step after the warm-up cached, the same steps on both). "
        f"Max abs error over pixels in [0, 1]; tolerance {setup['tolerance']:g}. "
        "A mark after a figure: a compiled graph fell back or lacked the column's collectives (see below).",
        "",
        "| model | " + " | ".join(keys) + " |",
        "| --- |" + " ---: |" * len(keys),
    ]
    notes = []
    for model, entries in results["models"].items():
        cells = []
        for key in keys:
            e = entries.get(key)
            if e is None:
                cells.append("")
                continue
            cell = "ref" if e["error"] is None else f"{e['error']:.1e}"
            if e["problems"]:
                cell += " †"
                notes += [f"- {model} / {key}: {p}" for p in e["problems"]]
            cells.append(cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    seconds = sum(e["seconds"] for entries in results["models"].values() for e in entries.values())
    lines += ["", f"{sum(len(e) for e in results['models'].values())} runs, {seconds / 60:.1f} min in all."]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def write(results: dict[str, Any], command: str, path: str) -> None:
    replace_section(path, MARK_START, MARK_END, f"{MARK_START}\n{format_results(results, command)}\n{MARK_END}",
                    heading="## Exactness of every pipeline column (issue #12)")
