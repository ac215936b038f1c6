"""Rank bodies for diffusers' own DiT transformers (tiny configs of diffusers' test-suite, random
weights) through the public call: every model in one process group, each compiled afresh."""

from __future__ import annotations

import collections

import torch


def diffusers_dits(rank, world_size, models):
    from npu_dit import backend
    from npu_dit.models.diffusers_dits import get_entry
    from npu_dit.plans import SHARDING_META_KEY
    from npu_dit.tools.dit_survey_worker import max_abs_error, output_tensors

    results = {}
    for name in models:
        entry = get_entry(name)
        model = entry.build()
        with torch.no_grad():
            expected = output_tensors(model(**entry.example_inputs()))
        torch._dynamo.reset()
        backend.RECORDS = collections.deque(maxlen=1024)  # every graph of this model
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
        with torch.no_grad():
            got = output_tensors(compiled(**entry.example_inputs()))
        records = list(backend.RECORDS)
        results[name] = {
            "error": max_abs_error(expected, got),
            "fell_back": [r.report.fallback_reason for r in records if r.report.fell_back],
            "all_to_all": sum(r.report.counts.get("all_to_all", 0) for r in records),
            # the input streams left whole on this rank, with the reason (sharded tokens pass through the
            # all-to-alls; a replicated stream costs nothing to check but parallelises nothing)
            "replicated": [f"{s.name}: {s.reason}" for r in records
                           for s in getattr(r.graph.meta.get(SHARDING_META_KEY), "streams", ()) if not s.sharded],
        }
    return results
