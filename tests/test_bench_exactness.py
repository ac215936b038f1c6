"""`npu-dit bench exactness` (issue #12, item 4): its verdicts from reports written by hand, and real runs
of the seed-table columns on FLUX.1-dev and Qwen-Image-Edit through the command line (each column one
`npu-dit generate` in fresh Gloo processes, the float32 image against the 1-rank image)."""

import json
import os
import subprocess
import sys

import pytest

from npu_dit.tools import bench_exactness
from npu_dit.tools.bench_exactness import COLUMNS, TOLERANCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BY_KEY = {c.key: c for c in COLUMNS}


def _graph(tag, fell_back=False, reason=None, **counts):
    return {"tag": tag, "fell_back": fell_back, "reason": reason, "counts": counts}


def test_a_column_that_fell_back_or_lacks_its_collectives_is_not_a_pass():
    column = BY_KEY["ulysses-2-tep"]
    ok = {"compiled_graphs": [_graph("transformer", all_to_all=8), _graph("text encoder", all_reduce=4)]}
    assert bench_exactness._check(column, ok) == []
    fell = {"compiled_graphs": [_graph("transformer", True, "no attention"), _graph("text encoder", all_reduce=4)]}
    problems = bench_exactness._check(column, fell)
    assert problems == ["transformer fell back: no attention", "no all_to_all in any compiled graph"]
    cached = BY_KEY["ulysses-2-cache"]
    nothing_cached = {"compiled_graphs": [_graph("transformer", all_to_all=8)], "cache_patterns": {"0": "1111"}}
    assert bench_exactness._check(cached, nothing_cached) == ["no step was cached ({'0': '1111'})"]


def test_failures_and_table():
    entry = {"ranks": 2, "seconds": 1.0, "problems": [], "reference": "1-rank", "error": 2e-6, "cache_patterns": None}
    results = {
        "setup": {"height": 64, "width": 64, "steps": 4, "machine": "m", "tolerance": TOLERANCE, "cache": "{}"},
        "models": {
            "flux.1-dev": {"1-rank": {**entry, "reference": None, "error": None}, "ulysses-2": entry},
            "qwen-image-edit": {"1-rank": {**entry, "reference": None, "error": None},
                                "tp-2": {**entry, "error": 3e-4},
                                "ulysses-2-tep": {**entry, "problems": ["transformer fell back: x"]}},
        },
    }
    assert bench_exactness.failures(results) == [
        "qwen-image-edit / tp-2: max abs err 3.00e-04 > 0.0001 against 1-rank",
        "qwen-image-edit / ulysses-2-tep: transformer fell back: x",
    ]
    table = bench_exactness.format_results(results, "npu-dit bench exactness")
    assert "| model | 1-rank | ulysses-2 | ulysses-2-tep | tp-2 |" in table  # the columns in their fixed order
    assert "| flux.1-dev | ref | 2.0e-06 |  |  |" in table
    assert "| qwen-image-edit | ref |  | 2.0e-06 † | 3.0e-04 |" in table
    assert "- qwen-image-edit / ulysses-2-tep: transformer fell back: x" in table


def test_every_model_gets_the_seed_columns_and_unknown_names_are_refused():
    flux = [c.key for c in bench_exactness.columns_for("flux.1-dev")]
    qwen = [c.key for c in bench_exactness.columns_for("qwen-image-edit-2509-lightning")]
    assert "ulysses-4-tep" not in flux and {"async-ulysses-2-npu-fia", "tp-2", "vae-parallel-2", "ulysses-2-cache"} <= set(flux)
    cfg = {k for k, c in BY_KEY.items() if c.true_cfg_only}
    assert cfg == {"cfg-2", "cfg-2-ulysses-2-tep", "cfg-2-cache"}
    assert set(qwen) == set(BY_KEY) - cfg  # Lightning: no true CFG, no CFG columns
    assert set(c.key for c in bench_exactness.columns_for("qwen-image-edit")) == set(BY_KEY)
    assert not cfg & set(flux)
    with pytest.raises(ValueError, match=r"no column \['ulysses-8'\]"):
        bench_exactness.bench_exactness(["flux.1-dev"], ["ulysses-8"])
    with pytest.raises(Exception, match="sd3"):
        bench_exactness.bench_exactness(["sd3"])


def _run(tmp_path, model, columns, *extra):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "npu_dit.tools.cli", "bench", "exactness", "--models", model, "--columns", columns,
           "--json", *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout)["models"][model]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_flux_seed_columns_give_the_serial_image(tmp_path):
    """The ends of the seed's FLUX.1-dev table: Ulysses-2, and async + NPU attention (the reference op);
    `npu-dit bench exactness` runs every column (docs/BENCHMARKS.md)."""
    entries = _run(tmp_path, "flux.1-dev", "ulysses-2,async-ulysses-2-npu-fia")
    assert list(entries) == ["1-rank", "ulysses-2", "async-ulysses-2-npu-fia"]  # reference first
    for key, e in entries.items():
        print(f"flux.1-dev / {key}: {e['error']}, {e['seconds']:.0f} s, {e['problems']}")
        assert not e["problems"], (key, e["problems"])
        if key != "1-rank":
            assert e["error"] <= TOLERANCE, (key, e["error"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qwen_image_edit_seed_columns_give_the_serial_image(tmp_path):
    """The ends of the seed's Qwen-Image-Edit table: Ulysses-2 + TEP on 2 ranks, and Ulysses-4 + TEP +
    async + NPU attention on 4 (every feature of the columns between them at once)."""
    # 2 denoising steps, not the command's 4: none of these columns caches, so exactness does not depend on the
    # step count, and a step of the edit pipeline (true CFG, 4,160 tokens) is its costliest part after the compile
    entries = _run(tmp_path, "qwen-image-edit", "ulysses-2-tep,async-ulysses-4-tep-npu-fia", "--steps", "2")
    assert [e["ranks"] for e in entries.values()] == [1, 2, 4]
    for key, e in entries.items():
        print(f"qwen-image-edit / {key}: {e['error']}, {e['seconds']:.0f} s, {e['problems']}")
        assert not e["problems"], (key, e["problems"])  # TEP shows its all-reduces, Ulysses its all-to-alls
        if key != "1-rank":
            assert e["error"] <= TOLERANCE, (key, e["error"])
