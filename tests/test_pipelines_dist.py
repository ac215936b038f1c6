"""Whole pipelines under Ulysses-2 on 2 Gloo ranks give the serial pipeline's latents and image.

Through the public call only: `npu_dit.parallelize(pipe, ...)` on a tiny offline pipeline. Cases that
the backend currently refuses to rewrite (it then runs the graph unrewritten, with a warning) still
must match; the fallback reasons are returned so a regression in coverage is visible in the output.
"""

import pytest

from tests.dist_utils import run_ranks
from tests.dist_workers_pipelines import pipeline_cases

pytestmark = pytest.mark.slow

CASES = [
    # async alone is bitwise equal to sync (test_ulysses.py); here it runs with the NPU kernel lowering
    ("ulysses2", {"ulysses_degree": 2}),
    ("async+npu_fia", {"ulysses_degree": 2, "async_ulysses": True, "attention_backend": "npu_fia"}),
]


@pytest.mark.parametrize("model", ["flux.1-dev", "qwen-image-edit"])
def test_pipeline_ulysses2_matches_serial(model, tmp_path):
    records = run_ranks(pipeline_cases, 2, tmp_path, timeout=900, model=model, cases=CASES)
    for rank, record in enumerate(records):
        for name, (latent_err, image_err, reasons, all_to_alls) in record["result"].items():
            print(f"{model} rank {rank} {name}: latents {latent_err:.2e}, image {image_err:.2e}, "
                  f"all-to-alls {all_to_alls}, fallbacks {reasons}")
            assert latent_err <= 1e-4, (model, name, rank, latent_err)
            assert image_err <= 1e-4, (model, name, rank, image_err)
            if not reasons:  # rewritten: the sequence really was split across the ranks
                assert all_to_alls > 0, (model, name, rank)
