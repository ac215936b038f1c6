"""Every form of an op gives the same semantics, and through the public call on 2 Gloo ranks every
form is exact: where it touches the image tokens they stay whole (the pass refuses, or keeps the image
stream replicated and shards the text), where it does not they are sharded."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.dist_workers_forms import token_forms
from tests.forms import FORMS, TokenForm


@pytest.mark.slow
def test_every_form_is_exact_through_the_public_call(tmp_path):
    records = run_ranks(token_forms, 2, tmp_path, timeout=900, forms=list(FORMS))
    problems = []
    for form, (expect, _) in FORMS.items():
        torch.manual_seed(0)
        model = TokenForm(form).eval()
        inputs = model.example_inputs(1, 5, 13, masked=False)
        with torch.no_grad():
            expected = model(**inputs)[0]
        for rank, record in enumerate(records):
            out, image_whole, reason = record["result"][form]  # image tokens unsharded: refused or replicated
            if out is None:
                problems.append(f"{form} rank {rank}: raised {reason}")
                continue
            err = (out - expected).abs().max().item()
            if out.shape != expected.shape or err > 1e-5:
                problems.append(f"{form} rank {rank}: wrong result (shape {tuple(out.shape)}, err {err:.3g}, "
                                f"image tokens whole: {image_whole})")
            elif expect == "refuse" and not image_whole:
                problems.append(f"{form} rank {rank}: image tokens sharded although the op mixes or cuts them")
            elif expect == "shard" and image_whole:
                problems.append(f"{form} rank {rank}: refused needlessly: {reason}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_every_form_on_the_only_stream_is_exact(tmp_path):
    """The same forms on one token stream (no other to shard instead): a form that mixes or cuts the
    tokens gets them all (an all-gather into the op) or the pass refuses; one that does not touch
    them keeps them sharded with no gather. Exact on every rank."""
    from tests.dist_workers_forms import single_stream_forms
    from tests.forms import SingleStreamForm

    records = run_ranks(single_stream_forms, 2, tmp_path, timeout=900, forms=list(FORMS))
    problems = []
    for form, (expect, _) in FORMS.items():
        torch.manual_seed(0)
        model = SingleStreamForm(form).eval()
        with torch.no_grad():
            expected = model(torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(3)))[0]
        for rank, record in enumerate(records):
            out, fell_back, gathers, reason = record["result"][form]
            if out is None:
                problems.append(f"{form} rank {rank}: raised {reason}")
                continue
            err = (out - expected).abs().max().item()
            if out.shape != expected.shape or err > 1e-5:
                problems.append(f"{form} rank {rank}: wrong result (shape {tuple(out.shape)}, err {err:.3g})")
            elif expect == "refuse" and not fell_back and not gathers:
                problems.append(f"{form} rank {rank}: tokens sharded through an op that mixes or cuts them")
            elif expect == "shard" and (fell_back or gathers):
                problems.append(f"{form} rank {rank}: refused or gathered needlessly: {reason} ({gathers} gathers)")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_every_feature_form_is_exact_under_tensor_parallelism(tmp_path):
    from tests.dist_workers_forms import feature_forms
    from tests.forms import FEATURE_FORMS, FeatureForm

    records = run_ranks(feature_forms, 2, tmp_path, timeout=900, forms=list(FEATURE_FORMS))
    problems = []
    for form, (expect, _) in FEATURE_FORMS.items():
        torch.manual_seed(0)
        model = FeatureForm(form).eval()
        x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(x)[0]
        for rank, record in enumerate(records):
            out, placements, reason = record["result"][form]
            if out is None:
                problems.append(f"{form} rank {rank}: raised {reason}")
                continue
            err = (out - expected).abs().max().item()
            split = placements.get("fc1") == "column" and placements.get("fc2") == "row"
            if err > 1e-5:
                problems.append(f"{form} rank {rank}: wrong result (err {err:.3g}, placements {placements})")
            elif expect == "refuse" and split:
                problems.append(f"{form} rank {rank}: split passed through an op that mixes the features")
            elif expect == "shard" and not split:
                problems.append(f"{form} rank {rank}: not split: {placements} {reason}")
    assert not problems, "\n".join(problems)
