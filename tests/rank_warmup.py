"""Warm-up the fork server runs once, before it forks any rank (tests/dist_utils.py, `PRELOAD`).

A process's first Dynamo trace costs about 2 s of CPU more than its later ones: Dynamo reads and
tokenizes the source files it traces (its function-name cache), imports its variable trackers and
fills sympy's caches on first use. Every rank of every multi-process test is a fresh process, so each
paid it. Here one tiny FLUX.1-dev and one tiny Qwen-Image-Edit are compiled once with Dynamo's own
eager backend in the fork server, and Dynamo is reset (`torch._dynamo.reset()`: no compiled code,
guards or frame counters survive), so ranks start with those caches warm and Dynamo's state as in a
fresh process. Nothing of npu-dit runs here: the backend under test is compiled in the ranks only.
"""

from __future__ import annotations

import warnings

import torch


def warm_up() -> None:
    from tests.conftest import tiny_model_and_inputs

    torch.set_num_threads(1)  # no intra-op thread pool in a process that forks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in ("flux", "qwen-edit"):
            _, model, inputs = tiny_model_and_inputs(key)
            compiled = torch.compile(model, backend="eager", dynamic=True)
            with torch.no_grad():
                compiled(**inputs)
    torch._dynamo.reset()


warm_up()
