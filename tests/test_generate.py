"""`npu-dit generate` as a user runs it: one process, and torchrun with 2 ranks writing the same PNG."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.dist_utils import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["generate", "flux.1-dev", "--steps", "3", "--height", "128", "--width", "128", "--cache", "F1B0", "--quiet"]


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_generate_one_process_and_torchrun_write_the_same_png(tmp_path):
    one = _run([sys.executable, "-m", "npu_dit.tools.cli", *ARGS, "--out", "one.png"], tmp_path)
    assert "| text encoding |" in one and "| denoising |" in one and "| VAE |" in one
    assert "| 0 |" in one  # peak memory of rank 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    two = _run([*torchrun, "-m", "npu_dit.tools.cli", *ARGS, "--async-ulysses", "--vae-parallel", "--out", "two.png"], tmp_path)
    assert "2 process(es)" in two and "| 1 |" in two  # both ranks' peak memory
    assert "cache summary" in two
    a = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.int16)
    assert a.shape == b.shape == (128, 128, 3)
    # float32 images agree to ~1e-6; rounding to 8 bits can still move a pixel by one level
    assert np.abs(a - b).max() <= 1


def test_generate_refuses_unavailable_features_before_loading(capsys):
    from npu_dit.tools.cli import main

    # tensor parallelism is available: without torchrun, --tp 2 asks for the processes it needs
    assert main(["generate", "flux.1-dev", "--tp", "2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
    assert main(["generate", "flux.1-dev", "--cache", "fast-please"]) == 2
    assert "F1B0" in capsys.readouterr().err
    assert main(["generate", "flux.1-dev", "--image", "x.png"]) == 2
    assert "edit models" in capsys.readouterr().err


SMALL = ["generate", "flux.1-dev", "--steps", "2", "--height", "64", "--width", "64"]


def _run_both(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, proc.stderr


def _stage_seconds(table: str, stage: str) -> float:
    match = re.search(rf"^\| {stage} \| ([0-9.]+) \|", table, re.M)
    assert match, (stage, table)
    return float(match[1])


@pytest.mark.slow
def test_the_compile_is_visible_and_has_its_own_row(tmp_path):
    out, err = _run_both([sys.executable, "-m", "npu_dit.tools.cli", *SMALL, "--out", "one.png"], tmp_path)
    started = re.findall(r"^npu_dit: compiling frame (\S+):", err, re.M)
    ended = re.findall(r"^npu_dit: compiled frame (\S+) in ([0-9.]+) s: Dynamo tracing ([0-9.]+) s, "
                       r"npu-dit passes ([0-9.]+) s, inner compiler \(eager\) ([0-9.]+) s", err, re.M)
    assert started and [frame for frame, *_ in ended] == started, err
    totals = [float(total) for _, total, *_ in ended]
    for _, total, *parts in ended:
        assert sum(float(p) for p in parts) <= float(total) + 0.2
    # the table's compile row is those compiles (rounded to 0.1 s in the lines), not in denoising
    assert abs(_stage_seconds(out, "compile") - sum(totals)) <= 0.1 * len(totals) + 0.05, (out, err)
    assert _stage_seconds(out, "compile") > _stage_seconds(out, "denoising")
    # the transformer's own time per step (its calls, cut at the pipeline's step ends), compile left out
    per_step = re.search(r"^\| transformer per step \(2 calls, 2 steps\) \| ([0-9.]+) \|", out, re.M)
    after_first = re.search(r"^\| transformer per step after the first \| ([0-9.]+) \|", out, re.M)
    assert per_step and after_first, out
    assert 0 < float(per_step[1]) < _stage_seconds(out, "denoising") and float(after_first[1]) > 0, out


@pytest.mark.slow
def test_quiet_two_rank_run_prints_only_the_table(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    out, err = _run_both([*torchrun, "-m", "npu_dit.tools.cli", *SMALL, "--async-ulysses", "--quiet", "--out", "q.png"],
                         tmp_path)
    assert err.strip() == "", err  # no compile lines, warnings or progress bars, from any rank
    lines = out.strip().splitlines()
    assert lines[0].startswith("flux.1-dev") and "2 process(es)" in lines[0]
    assert lines[-1].startswith("wrote ") and lines[-1].endswith("q.png")
    assert out.count("| stage | seconds | share |") == 1  # rank 0 alone prints the report
    assert _stage_seconds(out, "compile") > 0
    allowed = ("flux.1-dev", "  ", "|", "(first run", "wrote ")
    assert all(not line or line.startswith(allowed) for line in lines), out


def test_device_that_is_not_there_is_a_clear_error(capsys):
    """--device npu / cuda without torch_npu or a GPU: exit status 2 and a message naming what is
    missing, before any pipeline is loaded; parallelize(device=...) raises the same before compiling."""
    import torch

    from npu_dit.errors import UserError
    from npu_dit.pipeline_parallel import parallelize
    from npu_dit.tools.cli import main

    assert main(["generate", "flux.1-dev", "--device", "npu"]) == 2
    assert "torch_npu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "flux.1-dev", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "no CUDA GPU" in err and "--device cpu" in err

    class Pipe:
        transformer = torch.nn.Linear(2, 2)

        def __call__(self, num_inference_steps: int = 2):
            return None

    with pytest.raises(UserError, match="torch_npu"):
        parallelize(Pipe(), device="npu")
    assert not isinstance(Pipe.transformer, type(torch.compile(torch.nn.Linear(1, 1))))  # nothing compiled


def test_generate_on_the_cpu_device_is_the_plain_pipeline(tmp_path, capsys):
    """`--device cpu` (what auto picks here) gives the image of the diffusers pipeline run directly, also
    after several timed runs."""
    import torch

    from npu_dit.models import get_model
    from npu_dit.pipelines import load_pipeline
    from npu_dit.tools.cli import main

    out = tmp_path / "cpu.npy"
    # two timed runs (--repeat 2): the second is seeded like the first, so the image is still the pipeline's
    assert main(["generate", "flux.1-dev", "--device", "cpu", "--steps", "2", "--height", "128", "--width", "128",
                 "--out", str(out), "--quiet", "--repeat", "2", "--json"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{"):])
    assert report["timed_runs"] == 2 and len(report["timed_totals_s"]) == 2
    assert report["stages_s"]["total"] == min(report["timed_totals_s"])  # the fastest run's stages
    pipe = load_pipeline(get_model("flux.1-dev"), dtype=torch.float32, seed=0)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a photo of a cat sitting on a red chair", height=128, width=128, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6, rtol=0)
