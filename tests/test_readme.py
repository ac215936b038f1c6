"""Every code block of README.md that a user would copy runs as written.

- ```python blocks run as scripts in a fresh folder: in one process when the block's first line says
  `python my_script.py` (or names no launcher), under torchrun with N ranks when it says
  `torchrun --nproc-per-node N` (both when it says both). A block that only continues another one is
  not a block a user can copy, so there are none: each block builds what it uses.
- ```bash and ```console lines that run `npu-dit ...` (or `torchrun ... -m npu_dit.tools.cli ...`)
  must parse with the CLI's own parser: every flag they show exists and takes the value shown (running
  them is what `npu-dit bench`, `make generate` and the other tests do at their own cost).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.dist_utils import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[tuple[int, str]]:
    text = open(README).read()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def _launches(code: str) -> list[int]:
    """World sizes the block's first line asks for: 1 for `python ...`, N for `torchrun --nproc-per-node N`."""
    first = code.splitlines()[0] if code.strip() else ""
    sizes = [int(n) for n in re.findall(r"torchrun --nproc-per-node (\d+)", first)] if first.startswith("#") else []
    if not sizes or re.search(r"\bpython\b", first):
        sizes.insert(0, 1)
    return sizes


PYTHON_RUNS = [pytest.param(line, code, world, id=f"line{line}-{world}rank")
               for line, code in _blocks("python") for world in _launches(code)]


def test_the_readme_has_blocks_to_run():
    assert len(PYTHON_RUNS) >= 6
    assert any(world == 2 for *_, world in (p.values for p in PYTHON_RUNS))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("line, code, world", PYTHON_RUNS)
def test_python_block_runs_as_written(line, code, world, tmp_path):
    script = tmp_path / "my_script.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "NPU_DIT_GROUP_TIMEOUT": "300"}
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(free_port())]
    proc = subprocess.run([*launcher, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, f"README.md line {line}, {world} process(es):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    # the compile is visible, once per frame: rank 0 alone says it (another rank would repeat each frame)
    if "torch.compile(" not in code and "parallelize(" not in code:
        return
    started = re.findall(r"^npu_dit: compiling frame ([^\s:]+)", proc.stderr, re.M)
    ended = re.findall(r"^npu_dit: compiled frame (\S+) in", proc.stderr, re.M)
    assert started and len(started) == len(set(started)) and sorted(ended) == sorted(started), proc.stderr[-6000:]


def _cli_commands() -> list[tuple[int, list[str]]]:
    commands = []
    for language in ("bash", "console"):
        for line, code in _blocks(language):
            for offset, text in enumerate(code.splitlines()):
                if not text.startswith(("$ npu-dit", "npu-dit", "$ torchrun", "torchrun")):
                    continue  # output, or a command of another tool
                words = shlex.split(text.removeprefix("$ "), comments=True)
                if words[:1] == ["npu-dit"]:
                    commands.append((line + 1 + offset, words[1:]))
                elif "npu_dit.tools.cli" in words:
                    commands.append((line + 1 + offset, words[words.index("npu_dit.tools.cli") + 1:]))
    return commands


def test_cli_commands_in_the_readme_parse():
    from npu_dit.tools.cli import build_parser

    commands = _cli_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for line, argv in commands:
        if any(word.startswith("[") or word.isupper() for word in argv):
            # a synopsis (`npu-dit generate MODEL [--weights DIR | ...]`): every flag it shows exists
            known = _option_strings(parser, argv)
            for flag in re.findall(r"--[a-z][a-z0-9-]*", " ".join(argv)):
                assert flag in known, f"README.md line {line}: {flag} is not an option of `npu-dit {argv[0]}`"
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README.md line {line}: `npu-dit {' '.join(argv)}` does not parse (exit {exc.code})")


def _option_strings(parser, argv: list[str]) -> set[str]:
    """The options of the (sub)command that `argv` names: `generate`, `bench seed`, ..."""
    import argparse

    for word in argv:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            break
        parser = sub.choices[word]
    return {option for action in parser._actions for option in action.option_strings}
