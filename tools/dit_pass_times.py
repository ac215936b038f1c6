"""Dev tool: CPU seconds of the Ulysses-2 pass (rank 1, in this process) on diffusers DiTs' captured graphs,
best of 3 after a warm-up, and how many nodes the local-shapes refresh fake-ran (the rest are substituted).

    PYTHONPATH=. python tools/dit_pass_times.py SD3,PixArt,CogView4
"""

from __future__ import annotations

import functools
import sys
import time
import warnings

import torch

from npu_dit.models.diffusers_dits import get_entry
from npu_dit.passes.analysis import fake_prop
from npu_dit.passes.infra import PassSpec, run_passes
from npu_dit.passes.scalar_inputs import scalar_inputs_pass
from npu_dit.passes.ulysses import ulysses_pass
from npu_dit.runtime.dist import inspection_context
from npu_dit.tools.capture import capture_graph


def main(names: list[str]) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    stats = []
    refresh = fake_prop.refresh
    fake_prop.refresh = lambda *a, **k: stats.append(refresh(*a, **k)) or stats[-1]
    specs = [PassSpec("scalar_inputs", scalar_inputs_pass),
             PassSpec("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 1)), changes_shapes=True)]
    for name in names:
        entry = get_entry(name)
        captured = capture_graph(entry.build(), entry.example_inputs(), dynamic=True)
        run_passes(captured.gm, specs)
        best = float("inf")
        for _ in range(3):
            stats.clear()
            start = time.process_time()
            run_passes(captured.gm, specs)
            best = min(best, time.process_time() - start)
        ran = len(stats[-1].ran) if stats else "-"
        print(f"{name}: {best:.2f} CPU s, fake-run {ran}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
