"""`npu-dit generate` (and `inspect`, `bench`): every flag's value is checked before anything is built. A bad value is one line
naming the flag, the value and what is allowed, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest

import npu_dit.pipelines
from npu_dit.tools.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corrupt_lora(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\xff" * 64)  # an 8-byte header length far past the end of the file
    return str(path)


def _empty_dir(tmp_path):
    (tmp_path / "ckpt").mkdir()
    return str(tmp_path / "ckpt")


# (flags, world size, what the message must name besides the flag)
CASES = {
    "steps-zero": (["--steps", "0"], 1, ["--steps 0", "positive"]),
    "steps-negative": (["--steps", "-3"], 1, ["--steps -3", "positive"]),
    "height-zero": (["--height", "0"], 1, ["--height 0", "positive"]),
    "height-7": (["--height", "7"], 1, ["--height 7", "multiple of 16"]),
    "height-100": (["--height", "100"], 1, ["--height 100", "multiple of 16", "96 or 112"]),
    "width-100": (["--width", "100"], 1, ["--width 100", "multiple of 16"]),
    "out-jpg": (["--out", "a.jpg"], 1, ["--out a.jpg", ".png", ".npy"]),
    "out-missing-dir": (["--out", "no/such/dir/x.png"], 1, ["--out no/such/dir/x.png", "does not exist"]),
    "warmup-negative": (["--warmup", "-1"], 1, ["--warmup -1"]),
    "repeat-zero": (["--repeat", "0"], 1, ["--repeat 0", "1 or more"]),
    "lora-corrupt": ([ "--lora", _corrupt_lora], 1, ["--lora", "broken.safetensors", "not a readable safetensors"]),
    "lora-missing": (["--lora", "nowhere.safetensors"], 1, ["--lora nowhere.safetensors", "does not exist"]),
    "weights-empty": (["--weights", _empty_dir], 1, ["--weights", "model_index.json"]),
    "tp-3-on-2": (["--tp", "3"], 2, ["--tp 3", "2 (allowed: 1, 2)"]),
    "ulysses-3-on-2": (["--ulysses", "3"], 2, ["--ulysses 3", "--ulysses 2"]),
    "image-missing": (["--image", "nowhere.png"], 1, ["--image nowhere.png"]),
    # --cfg-parallel on FLUX.1-dev without true CFG: one transformer call per step, nothing to pair
    "cfg-one-call-per-step": (["--cfg-parallel"], 2, ["--cfg-parallel", "once per step", "no negative prompt"]),
    "cfg-scale-1": (["--cfg-parallel", "--negative-prompt", "blurry", "--true-cfg-scale", "1"], 2,
                    ["--cfg-parallel", "once per step", "true_cfg_scale 1 <= 1"]),
    "cfg-odd-world": (["--cfg-parallel", "--negative-prompt", "blurry", "--true-cfg-scale", "2"], 3,
                      ["--cfg-parallel", "even number of processes", "--nproc-per-node 4"]),
    "cfg-tp-2-on-2": (["--cfg-parallel", "--negative-prompt", "blurry", "--true-cfg-scale", "2", "--tp", "2"], 2,
                      ["--tp 2", "x 2 (--cfg-parallel)", "--nproc-per-node 4"]),
    "comm-dtype-unknown": (["--comm-dtype", "float16"], 2, ["--comm-dtype float16", "float8_e4m3fn"]),
    "comm-dtype-one-process": (["--comm-dtype", "float8_e4m3fn"], 1, ["--comm-dtype float8_e4m3fn", "Ulysses degree 1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_is_one_line_exit_2_before_building(case, tmp_path, monkeypatch, capsys):
    flags, world, expected = CASES[case]
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", str(world))  # as torchrun sets it; checked before any process group

    def build(*args, **kwargs):
        raise AssertionError("the pipeline was built before the flags were checked")

    monkeypatch.setattr(npu_dit.pipelines, "load_pipeline", build)
    model = "qwen-image-edit" if case.startswith("image") else "flux.1-dev"
    assert main(["generate", model, *flags, "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not os.path.exists(tmp_path / "flux.1-dev.png")


def test_bad_value_from_the_command_line_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "npu_dit.tools.cli", "generate", "flux.1-dev", "--height", "7"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--height 7" in proc.stderr


# inspect and bench: each flag's value is checked by the parser, before any model is built or traced
OTHER_COMMANDS = {
    "inspect-height-zero": (["inspect", "flux.1-dev", "--height", "0"], ["--height", "got 0", ">= 1"]),
    "inspect-batch-zero": (["inspect", "flux.1-dev", "--batch", "0"], ["--batch", "got 0"]),
    "inspect-prompt-len-zero": (["inspect", "flux.1-dev", "--prompt-len", "0"], ["--prompt-len", "got 0"]),
    "inspect-ulysses-word": (["inspect", "flux.1-dev", "--ulysses-degree", "two"], ["--ulysses-degree", "'two'"]),
    "bench-dits-timeout": (["bench", "dits", "--timeout", "0"], ["--timeout", "seconds > 0"]),
    "bench-dits-world": (["bench", "dits", "--world", "0"], ["--world", "got 0"]),
    "bench-seed-warmup": (["bench", "seed", "--warmup", "-1"], ["--warmup", ">= 0"]),
    "bench-exactness-steps": (["bench", "exactness", "--steps", "0"], ["--steps", "got 0"]),
}


@pytest.mark.parametrize("case", list(OTHER_COMMANDS))
def test_inspect_and_bench_values_are_one_line_errors(case, capsys, monkeypatch):
    import npu_dit.tools.inspect_model

    argv, expected = OTHER_COMMANDS[case]

    def build(*args, **kwargs):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(npu_dit.tools.inspect_model, "inspect_model", build)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
