"""One rank of one `npu-dit bench dits` model: eager reference, then the Ulysses compile, same inputs.

Run by `tools/dit_survey.py` under `torch.distributed.run` (Gloo, one process group per model):

    python -m npu_dit.tools.dit_survey_worker Flux OUT_DIR --degree 2

Each rank writes `OUT_DIR/rank{R}.json` after every phase (build, eager, compile, done), so a rank that
hangs or dies leaves behind how far it got. Nothing is decided here: `dit_survey.verdict` reads the files.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
import traceback
import warnings
from typing import Any

import torch
import torch._dynamo


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def output_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a forward's output in a fixed order (tensor, tuple/list, dict or diffusers' BaseOutput)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # BaseOutput is an OrderedDict
        return [t for v in value.values() for t in output_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in output_tensors(v)]
    return []


def max_abs_error(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
        raise RuntimeError(f"the compiled output has other shapes: {[tuple(t.shape) for t in got]} "
                           f"vs eager {[tuple(t.shape) for t in expected]}")
    errors = [(e.double() - g.double()).abs().max().item() for e, g in zip(expected, got) if e.numel()]
    return max(errors, default=0.0)


def _graphs(records: Any) -> list[dict[str, Any]]:
    return [{"tag": r.tag, "nodes": r.num_nodes_captured, "fell_back": r.report.fell_back,
             "reason": r.report.fallback_reason, "counts": dict(r.report.counts)} for r in records]


def run(name: str, out_dir: str, degree: int) -> dict[str, Any]:
    from npu_dit.models.diffusers_dits import get_entry

    rank = int(os.environ.get("RANK", "0"))
    path = os.path.join(out_dir, f"rank{rank}.json")
    result: dict[str, Any] = {"rank": rank, "phase": "build", "eager_error": None, "compile_error": None,
                              "max_err": None, "graphs": [], "graph_breaks": {}, "warnings": []}

    def dump() -> None:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)

    dump()
    entry = get_entry(name)
    start = time.perf_counter()
    try:
        model = entry.build()
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["phase"] = "eager"
        dump()
        with torch.no_grad():
            expected = output_tensors(model(**entry.example_inputs()))
        if not expected:
            raise RuntimeError("the forward returned no tensor")
    except Exception as exc:  # noqa: BLE001 - the model itself fails on its test inputs
        result["eager_error"] = first_line(exc)
        result["phase"] = "done"
        dump()
        return result
    result["eager_s"] = time.perf_counter() - start
    result["phase"] = "compile"
    dump()

    from npu_dit import backend

    # keep every graph's record: a model that breaks into many graphs would overflow the default 16
    backend.RECORDS = collections.deque(maxlen=1024)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": degree})
            with torch.no_grad():
                got = output_tensors(compiled(**entry.example_inputs()))
            result["max_err"] = max_abs_error(expected, got)
        except Exception as exc:  # noqa: BLE001 - recorded as a crash
            result["compile_error"] = first_line(exc)
            result["traceback"] = traceback.format_exc()[-4000:]
    result["compile_s"] = time.perf_counter() - start
    messages = [str(w.message) for w in caught if str(w.message).startswith("npu_dit")]
    result["warnings"] = list(dict.fromkeys(messages))[:8]
    result["graphs"] = _graphs(backend.RECORDS)
    result["graph_breaks"] = {str(k): v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    if rank == 0:
        from npu_dit.explain import explain

        result["explain"] = explain() if backend.RECORDS else ""
    result["phase"] = "done"
    dump()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m npu_dit.tools.dit_survey_worker")
    p.add_argument("model")
    p.add_argument("out_dir")
    p.add_argument("--degree", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        run(args.model, args.out_dir, args.degree)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # no barrier: a peer that crashed must not make this rank wait
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
