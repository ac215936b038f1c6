"""tools/gpu_proof.py (issue 20, item 6) is ready for a GPU: its CPU dry run goes through the same code."""

import importlib.util
import os

import pytest
import torch

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gpu_proof.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_proof", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_on_the_cpu(tmp_path, capsys):
    import json

    proof = _load()
    out = tmp_path / "rows.json"
    assert proof.main(["--dry-run", "--rows", "eager,npu_dit,cache", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| row | s / step |" in table and "2 steps" in table
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"eager", "npu_dit", "cache"}
    assert all(r["s_per_step"] > 0 for r in rows.values())
    assert rows["npu_dit"]["diff"] <= 1e-5  # the compiled transformer gives the eager latents
    assert rows["cache"]["note"].startswith("cache pattern ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real run applies")
def test_without_a_gpu_it_says_so(capsys):
    assert _load().main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
