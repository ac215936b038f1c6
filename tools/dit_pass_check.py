"""Dev tool: the Ulysses pass on every diffusers DiT's capture, in this process (rank 0 of 2, no group).

Captures each entry of `npu_dit/models/diffusers_dits.py` (diffusers' tiny test configs) as one Dynamo graph
(`dynamic=True`, as the backend sees it), runs `scalar_inputs` + `ulysses` on it and prints one line per entry:
status (sharded / REFUSED / CAPTURE: graph breaks or an eager failure) and the refusal reason. No numbers are
compared: a model moved to "sharded" is checked on real processes with `npu-dit bench dits --models ...`.

    cd WT && PYTHONPATH=. python tools/dit_pass_check.py [Name,Name,...]
"""

from __future__ import annotations

import functools
import sys
import time
import warnings

import torch

from npu_dit.models.diffusers_dits import ENTRIES
from npu_dit.passes.infra import PassSpec, run_passes
from npu_dit.passes.scalar_inputs import scalar_inputs_pass
from npu_dit.passes.ulysses import ulysses_pass
from npu_dit.runtime.dist import inspection_context
from npu_dit.tools.capture import capture_graph


def check(entry) -> tuple[str, str]:
    """(status, reason) of the Ulysses pass on `entry`'s capture."""
    try:
        model = entry.build()
        captured = capture_graph(model, entry.example_inputs(), dynamic=True)
    except Exception as exc:  # noqa: BLE001 - graph breaks, eager failures: reported, not raised
        return "CAPTURE", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    passes = [PassSpec("scalar_inputs", scalar_inputs_pass),
              PassSpec("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 0)),
                       preserves_numerics=False, changes_shapes=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = run_passes(captured.gm, passes)
    if report.fell_back:
        return "REFUSED", (report.fallback_reason or "").splitlines()[0][:400]
    return "sharded", f"{report.counts.get('all_to_all', 0)} all-to-all"


def main(argv: list[str]) -> int:
    only = set(argv[0].split(",")) if argv else None
    torch.set_num_threads(1)
    counts: dict[str, int] = {}
    for entry in ENTRIES:
        if only and entry.name not in only:
            continue
        start = time.perf_counter()
        torch._dynamo.reset()
        status, reason = check(entry)
        counts[status] = counts.get(status, 0) + 1
        print(f"{entry.name:22s} {status:8s} {time.perf_counter() - start:5.1f}s {reason}", flush=True)
    print(", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
