"""`npu-dit bench dits`: does the Ulysses rewrite take each DiT diffusers ships, and is it exact?

For every entry of `models/diffusers_dits.py` (diffusers' own tiny test config and inputs, random weights,
float32, CPU), one fresh `torch.distributed.run` of `tools/dit_survey_worker.py` over Gloo (one process
group per model, a wall-clock limit per model): each rank runs the model eagerly for the reference, then
`torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world})` under
`torch.no_grad()` on the same inputs. `verdict` turns the ranks' files into one record:

| status | meaning |
| --- | --- |
| sharded | every compiled graph was rewritten (no fallback) and at least one all-to-all was inserted |
| refused | some graph ran unrewritten (the backend's fallback reason), or nothing was sharded |
| crashed | compile or call raised (first line), a rank died, or the model hit the time limit |
| eager-fails | the model fails on its own test inputs without the backend |

Sharded and refused records carry the max abs error against eager (a refused graph must be exact too).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from npu_dit.runtime.dist import free_port
from npu_dit.tools.bench import machine, replace_section

MARK_START = "<!-- bench:dits:start -->"
MARK_END = "<!-- bench:dits:end -->"
TOLERANCE = 1e-4
STATUSES = ("sharded", "refused", "crashed", "eager-fails")
NO_ATTENTION = "has no attention call"  # the Ulysses pass's refusal of a graph piece without attention


def worker_command(model: str, out_dir: str, world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={free_port()}",
            "-m", "npu_dit.tools.dit_survey_worker", model, out_dir, "--degree", str(world)]


def read_ranks(out_dir: str, world: int) -> list[dict[str, Any] | None]:
    """Each rank's last written state (None: the rank never wrote, or its file is unreadable)."""
    ranks: list[dict[str, Any] | None] = []
    for rank in range(world):
        try:
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
        except (OSError, ValueError):
            ranks.append(None)
    return ranks


def _last_line(log_tail: str) -> str:
    """The exception a rank died of (torchrun's own ChildFailedError only where nothing else is there)."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    raised = [m.group(1) for m in map(_RANK_ERROR.match, lines) if m]
    errors = [line for line in lines if "Error" in line or "error:" in line or "Signal" in line]
    return (raised or errors or lines or ["no output"])[-1][:300]


_RANK_ERROR = re.compile(r"^\[rank\d+\]: ((?:[\w.]+)(?:Error|Exception|Interrupt)\b.*)$")


def verdict(model: str, ranks: list[dict[str, Any] | None], *, timed_out: bool = False, timeout_s: float = 0.0,
            returncode: int | None = 0, log_tail: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """One record from the ranks' files: status, reason, max abs error, what the backend did."""
    record: dict[str, Any] = {"model": model, "status": "", "reason": "", "max_err": None, "exact": None,
                              "graphs": 0, "fallbacks": 0, "all_to_all": 0, "graph_breaks": 0, "seconds": seconds,
                              "parameters": None}
    done = [r for r in ranks if r is not None]
    if done:
        record["parameters"] = done[0].get("parameters")
    eager = next((r["eager_error"] for r in done if r.get("eager_error")), None)
    if eager:
        return {**record, "status": "eager-fails", "reason": eager}
    if timed_out:
        phases = ", ".join(f"rank {i}: {r['phase'] if r else 'not started'}" for i, r in enumerate(ranks))
        return {**record, "status": "crashed", "reason": f"timed out after {timeout_s:.0f} s ({phases})"}
    # what the backend did, also for a crash (was the graph rewritten when the call failed?)
    graphs = done[0]["graphs"] if done else []
    record.update(graphs=len(graphs), fallbacks=sum(g["fell_back"] for g in graphs),
                  all_to_all=sum(g["counts"].get("all_to_all", 0) for g in graphs),
                  graph_breaks=sum(done[0].get("graph_breaks", {}).values()) if done else 0,
                  per_graph=[{"nodes": g["nodes"], "fell_back": g["fell_back"], "reason": g["reason"],
                              "all_to_all": g["counts"].get("all_to_all", 0)} for g in graphs])
    error = next((r["compile_error"] for r in done if r.get("compile_error")), None)
    if error:
        return {**record, "status": "crashed", "reason": error}
    unfinished = [i for i, r in enumerate(ranks) if r is None or r.get("phase") != "done"]
    if unfinished:
        return {**record, "status": "crashed",
                "reason": f"rank {unfinished[0]} died (exit {returncode}): {_last_line(log_tail)}"}
    errors = [r["max_err"] for r in done if r.get("max_err") is not None]
    max_err = max(errors) if errors else None
    record.update(max_err=max_err, exact=max_err is not None and max_err <= TOLERANCE)
    if not graphs:
        return {**record, "status": "refused", "reason": "no graph reached the backend"}
    fell_back = [g for g in graphs if g["fell_back"]]
    if fell_back and record["all_to_all"] and all(NO_ATTENTION in (g["reason"] or "") for g in fell_back):
        # every graph that holds attention was sharded; the pieces between graph breaks that hold none
        # (embedders, glue) run whole on every rank, as Ulysses leaves any code outside attention blocks
        return {**record, "status": "sharded",
                "reason": f"{len(graphs)} graphs; the {len(fell_back)} without attention run whole"}
    if fell_back:
        # after a graph break many pieces hold no attention (embedders, glue) and say little about the
        # transformer blocks: name the largest graph that fell back for another reason, if there is one
        largest = max(fell_back, key=lambda g: (NO_ATTENTION not in (g["reason"] or ""), g["nodes"]))
        reason = largest["reason"] or "fell back (no reason given)"
        if len(graphs) > 1:
            reason += f" ({len(fell_back)} of {len(graphs)} graphs fell back; this one {largest['nodes']} nodes)"
        return {**record, "status": "refused", "reason": reason}
    if record["all_to_all"] == 0:
        return {**record, "status": "refused", "reason": f"no fallback, but no all-to-all inserted in {len(graphs)} graph(s)"}
    return {**record, "status": "sharded", "reason": f"{len(graphs)} graph(s)" if len(graphs) > 1 else ""}


def survey_one(model: str, *, world: int = 2, timeout: float = 240.0) -> dict[str, Any]:
    """One model in fresh processes; a hang is killed (the whole process group) at `timeout`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               NPU_DIT_GROUP_TIMEOUT=str(max(30.0, timeout / 2)))  # a lost peer fails a collective before the kill
    with tempfile.TemporaryDirectory(prefix="npu_dit_dits_") as out_dir:
        log_path = os.path.join(out_dir, "log.txt")
        start = time.perf_counter()
        timed_out = False
        with open(log_path, "w") as log:
            proc = subprocess.Popen(worker_command(model, out_dir, world), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
            except BaseException:  # Ctrl-C: the ranks live in their own session, take them along
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        seconds = time.perf_counter() - start
        with open(log_path, errors="replace") as f:
            log_tail = f.read()[-4000:]
        ranks = read_ranks(out_dir, world)
        record = verdict(model, ranks, timed_out=timed_out, timeout_s=timeout, returncode=returncode,
                         log_tail=log_tail, seconds=seconds)
        record["warnings"] = ranks[0].get("warnings", []) if ranks[0] else []
        record["explain"] = ranks[0].get("explain", "") if ranks[0] else ""
        return record


def survey(models: list[str], *, world: int = 2, timeout: float = 240.0,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    from npu_dit.models.diffusers_dits import get_entry

    entries = [get_entry(m) for m in models]  # unknown names fail before anything runs
    results: dict[str, Any] = {"setup": {"world": world, "timeout_s": timeout, "tolerance": TOLERANCE,
                                         "machine": machine()}, "records": []}
    for i, entry in enumerate(entries, 1):
        log(f"[{i}/{len(entries)}] {entry.class_name} ...")
        record = survey_one(entry.name, world=world, timeout=timeout)
        record["class_name"] = entry.class_name
        results["records"].append(record)
        log(f"  {record['status']}{': ' + record['reason'] if record['reason'] else ''}; "
            f"max abs err {_err(record['max_err'])}; {record['seconds']:.0f} s")
    return results


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _cell(reason: str, limit: int = 240) -> str:
    """A reason in one table cell: its first line (the --json records keep it whole), cut at `limit`."""
    line = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
    line = line if len(line) <= limit else line[: limit - 1] + "…"
    return line.replace("|", "\\|")


def summary(records: list[dict[str, Any]]) -> str:
    count = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    line = (f"{count['sharded']} of {len(records)} sharded, {count['refused']} refused, {count['crashed']} crashed, "
            f"{count['eager-fails']} eager-fails")
    inexact = [r["model"] for r in records if r["max_err"] is not None and not r["exact"]]
    return line + (f"; NOT EXACT (> {TOLERANCE:g}): {', '.join(inexact)}" if inexact else "")


def format_table(results: dict[str, Any], command: str = "") -> str:
    setup, records = results["setup"], results["records"]
    lines = []
    if command:
        lines.append(f"Command: `{command}`  ")
    lines += [
        f"Machine: {setup['machine']}.  ",
        f"Each diffusers DiT at the tiny config and inputs of diffusers' own model test (random weights, float32), "
        f"{setup['world']} Gloo ranks, `torch.compile(model, backend=\"npu_dit\", dynamic=True, "
        f"options={{\"ulysses_degree\": {setup['world']}}})` against eager on the same inputs; "
        f"limit {setup['timeout_s']:.0f} s per model. Max abs error over every output; tolerance {setup['tolerance']:g}.",
        "",
        "| model | status | graphs | all-to-all | max abs err | reason / error |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in records:
        err = _err(r["max_err"]) + (" ✗" if r["max_err"] is not None and not r["exact"] else "")
        reason = _cell(r["reason"])
        graphs = f"{r['graphs']}" + (f" ({r['graph_breaks']} breaks)" if r["graph_breaks"] else "")
        lines.append(f"| {r['model']} | {r['status']} | {graphs} | {r['all_to_all']} | {err} | {reason} |")
    seconds = sum(r["seconds"] for r in records)
    lines += ["", f"{summary(records)}. {seconds / 60:.1f} min in all."]
    return "\n".join(lines)


def write(results: dict[str, Any], command: str, path: str) -> None:
    replace_section(path, MARK_START, MARK_END, f"{MARK_START}\n{format_table(results, command)}\n{MARK_END}",
                    heading="## Ulysses on every diffusers DiT (`npu-dit bench dits`)")
