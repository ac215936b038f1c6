"""Rank functions for tests/test_spatial.py (importable by spawned processes). Every case compiles
through the public call, `torch.compile(vae.decode / vae.encode, backend="npu_dit", dynamic=True,
options={"spatial_degree": world_size})`, and is compared with the serial eager call of the same VAE."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore")


def _outputs(kind: str, fn: str, result) -> list[torch.Tensor]:
    if fn == "decode":
        return [result.sample]
    return [result.latent_dist.mean, result.latent_dist.std]


def vae_cases(rank, world_size, cases, tiled=False):
    """cases: (name, vae kind, "decode"|"encode", height, width) in pixels. Returns, per case, the max
    abs error against the serial call, whether the graph fell back, and (tiled=True, rank 0) the error
    of diffusers' enable_tiling() on the same input."""
    from npu_dit.backend import RECORDS
    from npu_dit.models.vae import build_vae, example_input

    results = {}
    for name, kind, fn, height, width in cases:
        vae = build_vae(kind, "tiny", seed=0)
        x = example_input(kind, "tiny", height=height, width=width, encode=fn == "encode", seed=1)
        with torch.no_grad():
            expected = _outputs(kind, fn, getattr(vae, fn)(x))
        torch._dynamo.reset()
        compiled = torch.compile(getattr(vae, fn), backend="npu_dit", dynamic=True,
                                 options={"spatial_degree": world_size})
        with torch.no_grad():
            got = _outputs(kind, fn, compiled(x))
        record = RECORDS[-1]
        error = max((a - b).abs().max().item() for a, b in zip(got, expected))
        entry = {"error": error, "fell_back": record.report.fell_back, "reason": record.report.fallback_reason,
                 "counts": record.report.counts}
        if tiled and rank == 0:
            entry["tiled_error"] = _tiled_error(vae, kind, fn, x, expected)
        results[name] = entry
    return results


def _tiled_error(vae, kind, fn, x, expected) -> float:
    """diffusers' tiled VAE (the approach of existing tools), tiles small enough to cut this input."""
    if kind == "flux":
        vae.enable_tiling()
        vae.tile_sample_min_size = 32
        vae.tile_latent_min_size = 4
        vae.tile_overlap_factor = 0.25
    else:
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                          tile_sample_stride_height=24, tile_sample_stride_width=24)
    with torch.no_grad():
        got = _outputs(kind, fn, getattr(vae, fn)(x))
    vae.disable_tiling()
    return max((a - b).abs().max().item() for a, b in zip(got, expected))


def refusal_case(rank, world_size):
    """An op the rules do not cover: every rank runs the captured graph (one warning), result exact."""
    from npu_dit.backend import RECORDS
    from tests.synthetic_spatial import ConvFlip

    torch.manual_seed(0)
    model = ConvFlip().eval()
    x = torch.randn(1, 3, 10, 6)
    with torch.no_grad():
        expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"spatial_degree": world_size})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = compiled(x)
    record = RECORDS[-1]
    ours = [str(w.message) for w in caught if "npu_dit" in str(w.message)]
    return {"error": (got - expected).abs().max().item(), "fell_back": record.report.fell_back,
            "reason": record.report.fallback_reason, "warnings": ours}


def unbandable_height(rank, world_size):
    """An encoder input whose height the 8-row units do not divide: the compiled graph runs whole on
    every rank (one warning), and a later banded height is sharded again."""
    from npu_dit.models.vae import build_vae, example_input

    vae = build_vae("flux", "tiny", seed=0)
    torch._dynamo.reset()
    compiled = torch.compile(vae.encode, backend="npu_dit", dynamic=True, options={"spatial_degree": world_size})
    errors = {}
    for height in (52, 40):
        x = example_input("flux", "tiny", height=height, width=24, encode=True, seed=2)
        with torch.no_grad():
            expected = vae.encode(x).latent_dist.mean
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = compiled(x).latent_dist.mean
        errors[height] = ((got - expected).abs().max().item(),
                          [str(w.message) for w in caught if "cannot be cut" in str(w.message)])
    return errors


def spatial_suite(rank, world_size, cases, tiled=False, extras=False):
    """One spawn for many checks (process start-up and Gloo rendezvous cost seconds on a small machine)."""
    result = {"cases": vae_cases(rank, world_size, cases, tiled=tiled)}
    if extras:
        result["refusal"] = refusal_case(rank, world_size)
        result["unbandable"] = unbandable_height(rank, world_size)
    return result
