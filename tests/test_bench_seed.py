"""`npu-dit bench seed`: its tables and charts from a results dict written by hand, and one real run of
two small columns (tiny FLUX pipeline, 1 rank and Ulysses-2 on 2 Gloo ranks) through the command line."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from npu_dit.tools import bench_seed, bench_seed_chart
from npu_dit.tools.bench_seed import TABLES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# seconds per whole generation for each column, in table order (made up; the expected ratios below are
# worked out from them by hand)
TOTALS = {"flux": [8.0, 5.0, 4.0, 5.0], "qwen-edit": [20.0, 12.0, 15.0, 12.5, 16.0]}


def fake_results():
    tables = {}
    for key, table in TABLES.items():
        rows = []
        for column, total in zip(table.columns, TOTALS[key]):
            stages = {"text encoding": 0.1 * total, "denoising": 0.7 * total, "VAE": 0.15 * total,
                      "other": 0.05 * total, "total": total}
            rows.append({**dataclasses.asdict(column), "stages_s": stages,
                         "cpu_s": [total * 0.9 / min(column.ranks, 2)] * column.ranks,
                         "rss_mib": [900.0 + rank for rank in range(column.ranks)],
                         "tokens": [[1024, 512]] if key == "flux" else [[4352, 98], [4352, 35]],
                         "max_pixel_diff_vs_1_rank": None if column.key == "1-rank" else 1, "process_wall_s": 30.0})
        tables[key] = {"key": key, "model": table.model, "title": table.title, "reference": table.reference,
                       "height": 512, "width": 512, "steps": 4, "config": "bench config", "rows": rows}
    return {"tables": tables, "setup": {"size": "bench", "warmup": 1, "machine": "x86_64, 2 cores, torch 2.13.0+cpu",
                                        "cores": 2, "load_before": 1.0, "load_after": 1.5}}


def _row(table_text, label):
    return next(line for line in table_text.splitlines() if line.startswith(f"| {label} |")).split(" | ")


def test_seed_table_has_stages_speedups_and_the_seed_beside_them():
    results = fake_results()
    flux = bench_seed.format_seed_table(results["tables"]["flux"])
    assert "| text encoding | denoising | VAE | other | total |" in flux
    ulysses = _row(flux, "Ulysses-2")
    assert ulysses[2:7] == ["0.50 s", "3.50 s", "0.75 s", "0.25 s", "**5.00 s**"]
    assert ulysses[7] == "1.60x"  # 8.0 / 5.0
    assert ulysses[8] == "11.45 s (1.41x)"  # the seed: 16.13 / 11.45
    assert ulysses[10] == "3.20x"  # CPU time: 7.2 s on 1 rank, 2.25 s on the busiest of 2
    assert ulysses[11] == "0.90"  # cores busy: 2 ranks x 2.25 CPU s / 5.0 s
    assert _row(flux, "+ NPU attention")[7] == "1.60x"
    qwen = bench_seed.format_seed_table(results["tables"]["qwen-edit"])
    # the seed's Qwen table starts at Ulysses-2 + TEP: speed-ups against 1 rank and against that column
    assert "| vs 1 rank | vs Ulysses-2 + TEP |" in qwen
    one = _row(qwen, "1 rank")
    assert one[7:10] == ["1.00x", "0.60x", "-"]  # no seed figure for one card
    four = _row(qwen, "Ulysses-4 + TEP")
    assert four[7:10] == ["1.33x", "0.80x", "67.44 s (2.00x)"]  # 20 / 15, 12 / 15, 134.76 / 67.44
    assert four[13] == "900, 901, 902, 903 MiB"


def test_observations_compare_neighbouring_columns_and_bound_crowded_ranks():
    notes = bench_seed.observations(fake_results()["tables"]["qwen-edit"], cores=2)
    assert "Ulysses-2 + TEP → Ulysses-4 + TEP: total +25.0 %" in notes[1] and "seed -50.0 %" in notes[1]
    crowded = notes[-1]
    # 4 ranks x (15 x 0.9 / 2) CPU s = 27 s over 2 cores: the wall time cannot go below 13.5 s
    assert crowded.startswith("Ulysses-4 + TEP, + async, + NPU attention: 4 processes on 2 cores")
    assert "= 13.5, 11.2, 14.4 s (measured 15.0, 12.5, 16.0 s)" in crowded
    assert not any("processes on" in n for n in bench_seed.observations(fake_results()["tables"]["flux"], cores=2))


def test_write_section_replaces_only_its_marked_section(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_seed_chart, "have_matplotlib", lambda: False)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    messages = []
    bench_seed.write_section(str(doc), "npu-dit bench seed --write", fake_results(), log=messages.append)
    bench_seed.write_section(str(doc), "npu-dit bench seed --write", fake_results(), log=messages.append)
    text = doc.read_text()
    assert text.count(bench_seed.MARK_START) == 1 and text.count("## The seed's tables") == 1
    assert "kept" in text and "Command: `npu-dit bench seed --write`" in text
    assert "![" not in text  # no charts without matplotlib, and the user is told how to get them
    assert "pip install 'npu-dit[bench]'" in messages[0]


def test_outputs_without_matplotlib_still_write_the_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_seed_chart, "have_matplotlib", lambda: False)
    messages = []
    written = bench_seed.write_outputs(str(tmp_path), fake_results(), "npu-dit bench seed", log=messages.append)
    assert sorted(os.path.basename(p) for p in written) == ["seed-tables.json", "seed-tables.md"]
    assert "matplotlib is not installed" in messages[0]
    saved = json.loads((tmp_path / "seed-tables.json").read_text())
    assert saved["command"] == "npu-dit bench seed" and set(saved["tables"]) == {"flux", "qwen-edit"}


def test_charts_one_png_per_table(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    written = bench_seed.write_outputs(str(tmp_path), fake_results(), "npu-dit bench seed", log=lambda *_: None)
    pngs = sorted(p for p in written if p.endswith(".png"))
    assert [os.path.basename(p) for p in pngs] == ["seed-flux.png", "seed-qwen-edit.png"]
    for path in pngs:
        assert os.path.getsize(path) < 200_000
        width, height = Image.open(path).size
        assert width > 600 and height > 200
    assert "![FLUX.1-dev: time per stage" in (tmp_path / "seed-tables.md").read_text()


def test_parse_report_skips_other_output():
    report = {"stages_s": {"total": 1.0}, "rank": 0}
    stdout = "some library line\n{not json\n" + json.dumps(report, indent=1) + "\nwrote x.png\n"
    assert bench_seed.parse_report(stdout) == report
    with pytest.raises(RuntimeError, match="no `generate --json` report"):
        bench_seed.parse_report("nothing here\n")


def test_unknown_tables_and_columns_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="choose from flux, qwen-edit"):
        bench_seed.bench_seed(tables=["sd3"])
    with pytest.raises(ValueError, match=r"no column \['ulysses-4-tep'\] in flux"):
        bench_seed.bench_seed(tables=["flux"], columns=["1-rank", "ulysses-4-tep"])


@pytest.mark.slow
def test_bench_seed_end_to_end_two_tiny_columns(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "npu_dit.tools.cli", "bench", "seed", "--tables", "flux", "--size", "tiny",
           "--columns", "1-rank,ulysses-2", "--flux-resolution", "64x64", "--flux-steps", "1", "--warmup", "0",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| Ulysses-2 | 2 |" in proc.stdout
    results = json.loads((tmp_path / "out" / "seed-tables.json").read_text())
    rows = results["tables"]["flux"]["rows"]
    assert [r["key"] for r in rows] == ["1-rank", "ulysses-2"]
    assert [len(r["cpu_s"]) for r in rows] == [1, 2]
    assert rows[0]["tokens"] == [[16, 512]]  # 64x64 -> 4x4 image tokens; T5 padded to 512
    for r in rows:
        stages = r["stages_s"]
        # generate times compiling apart ("compile"; --warmup 0 compiles in the timed run)
        parts = sum(stages[s] for s in bench_seed.STAGES) + stages.get("compile", 0.0)
        assert abs(parts - stages["total"]) < 1e-6 and stages["denoising"] > 0
        # `generate --json`'s transformer field: its calls' own seconds (the denoising stage), per step
        transformer = r["transformer_s"]
        assert transformer["steps"] == 1 and transformer["calls"] == 1, transformer
        assert 0 < transformer["per_step"] and abs(transformer["total"] - stages["denoising"]) < 1e-6, transformer
    # the 2-rank pipeline gives the 1-rank image (float32 agreement; 8-bit rounding may move one level)
    assert rows[0]["max_pixel_diff_vs_1_rank"] is None and rows[1]["max_pixel_diff_vs_1_rank"] <= 1
    assert (tmp_path / "out" / "seed-tables.md").exists()
