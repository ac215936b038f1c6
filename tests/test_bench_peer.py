"""The optional peer column of `npu-dit bench ulysses`: cache-dit's Ulysses on 2 Gloo ranks.

Skipped when cache-dit is not installed (`pip install --no-deps cache-dit==1.5.3 einops`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("cache_dit")

from npu_dit.models import build_transformer, get_model  # noqa: E402
from npu_dit.runtime.dist import free_port  # noqa: E402


def test_cache_dit_async_ulysses_matches_serial_eager(tmp_path):
    # async covers cache-dit's context-parallel plan and its async attention patch; one launch keeps it short
    spec = get_model("flux.1-dev")
    config = spec.config("tiny")
    inputs = spec.example_inputs(config, height=128, width=128, prompt_len=16, seed=0)
    with torch.no_grad():
        reference = build_transformer(spec, config, seed=0)(**inputs)[0]
    out = tmp_path / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "npu_dit.tools.bench_peer", "--size", "tiny", "--height", "128", "--width", "128",
           "--prompt-len", "16", "--warmup", "1", "--iters", "1", "--save-output", str(out), "--async-ulysses"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("NPU_DIT_BENCH "))
    result = json.loads(line[len("NPU_DIT_BENCH "):])
    assert result["world_size"] == 2 and result["mode"].startswith("cache-dit")
    got = torch.load(out)
    assert type(got) is torch.Tensor and got.shape == reference.shape
    assert (got - reference).abs().max().item() <= 1e-5
