"""Rank functions for the whole-pipeline multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore")


def pipeline_cases(rank, world_size, model, cases, negative=False):
    """For each (name, parallelize options): the parallel pipeline's latents/image vs the serial one's.
    Returns {name: (latent error, image error, fallback reasons, all-to-alls inserted)}."""
    import npu_dit
    from npu_dit.backend import RECORDS
    from npu_dit.models import get_model
    from npu_dit.pipelines import load_pipeline
    from tests.pipeline_cases import generate

    spec = get_model(model)
    serial_pipe = load_pipeline(spec)
    serial_pipe.set_progress_bar_config(disable=True)
    ref_latents, ref_image = generate(serial_pipe, spec, negative=negative)
    results = {}
    for name, options in cases:
        torch._dynamo.reset()
        pipe = load_pipeline(spec)
        pipe.set_progress_bar_config(disable=True)
        npu_dit.parallelize(pipe, **options)
        first = len(RECORDS)
        latents, image = generate(pipe, spec, negative=negative)
        records = list(RECORDS)[first:]
        reasons = [r.report.fallback_reason for r in records if r.report.fell_back]
        all_to_alls = sum(r.report.counts.get("all_to_all", 0) for r in records)
        results[name] = (
            (latents - ref_latents).abs().max().item(), (image - ref_image).abs().max().item(), reasons, all_to_alls,
        )
    return results
