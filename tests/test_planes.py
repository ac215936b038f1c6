"""Issue 20: two planes (host decisions on a CPU Gloo group, data on the device group), no host
exchange per call in the steady state, and fewer collectives per call. Public call, 2 Gloo ranks."""

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.dist_workers_planes import CACHE, disagree_on_a_new_signature, steady_calls

SITES = 4  # tiny FLUX: 2 joint + 2 single blocks, one attention each


def _serial(t=1.0):
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux")
    with torch.no_grad():
        return model(**dict(inputs, timestep=torch.tensor([t])))[0]


def _planes(per_call, host, device):
    """Every (plane, group, device) a call used, checked against the plane's group and device."""
    for (plane, what, group, kind), _ in per_call.items():
        assert kind == "cpu", (plane, what, kind)
        assert group == (host if plane == "host" else device), (plane, what, group, host, device)


def test_steady_call_two_collectives_per_site_and_no_host_exchange(tmp_path):
    records = run_ranks(steady_calls, 2, tmp_path, timeout=500)
    expected = _serial()
    for record in records:
        r = record["result"]
        torch.testing.assert_close(r["out"], expected, atol=2e-5, rtol=1e-4)
        assert r["counts"]["fused_qkv_all_to_all"] == SITES
        assert r["host_group"] != r["device_group"]
        assert r["declared"] == {"host": "cpu", "device": "cpu"}
        first, *steady = r["per_call"]
        for call in r["per_call"]:
            _planes(call, r["host_group"], r["device_group"])
        # the first call agrees on its shapes (one host exchange); repeated shapes never again
        assert sum(n for (p, what, _, _), n in first.items() if what == "agreement") == 1
        for call in steady:
            assert not [k for k in call if k[0] == "host"], call
            a2a = sum(n for (p, what, _, _), n in call.items() if what == "all_to_all")
            gathers = sum(n for (p, what, _, _), n in call.items() if "gather" in what)
            assert a2a <= 2 * SITES and gathers <= 1, call  # was 4 per site and 2 (issue 20)
        # the same figure from the profiler: what Gloo ran in one steady call
        assert r["profiled"].get("gloo:all_to_all") == 2 * SITES, r["profiled"]
        assert r["profiled"].get("gloo:all_gather") == 1, r["profiled"]
        assert not [n for n in r["profiled"] if "allreduce" in n or "all_reduce" in n], r["profiled"]
        # a new prompt length: exchanged once over two calls, then steady
        assert r["after_change"]["agreement"] == 1, r["after_change"]


def test_cache_decides_on_the_host_plane_and_a_wrong_device_fails(tmp_path):
    records = run_ranks(steady_calls, 2, tmp_path, timeout=500, cache=CACHE, wrong_device=True)
    for record in records:
        r = record["result"]
        for call in r["per_call"]:
            _planes(call, r["host_group"], r["device_group"])
            # exactly one host decision per step, on the host group, with a CPU tensor
            assert sum(n for (p, what, _, _), n in call.items() if what == "cache decision") == 1, call
        # the device group declared as a GPU's: the CPU activations of the next call are refused
        assert r["wrong_device_error"] is not None and r["wrong_device_error"].startswith("PlaneError"), r
        assert "cuda:0" in r["wrong_device_error"] and "cpu" in r["wrong_device_error"]


def test_ranks_that_change_shapes_differently_both_raise(tmp_path):
    records = run_ranks(disagree_on_a_new_signature, 2, tmp_path, timeout=400, group_timeout=120)
    for record in records:
        error_type, message, seconds = record["result"]
        assert error_type == "RankMismatchError", (error_type, message)
        assert "same input shapes" in message
        assert seconds < 60, seconds  # an error at once, not the group timeout


def test_shape_agreement_exchanges_only_for_new_signatures(monkeypatch):
    from npu_dit.runtime import agreement

    sent = []
    monkeypatch.setattr(agreement, "exchange", lambda kind, what, **_: sent.append(what) or [[agreement.MAGIC, kind, 0, 0, 0]])
    agree = agreement.ShapeAgreement()
    weight = torch.nn.Parameter(torch.ones(3, 3))
    x = torch.ones(2, 5)
    agree([weight, x, 5, 0.5])
    agree([weight, torch.zeros(2, 5), 5, 0.25])  # same shapes, another float: no exchange
    assert len(sent) == 1 and "(3, 3)" not in sent[0]  # parameters are not in the signature
    agree([weight, torch.ones(2, 6), 6, 0.5])
    agree([weight, torch.ones(2, 6), 6, 0.5])
    assert len(sent) == 2 and agree.exchanges == 2
    # the executor's scalar inputs (0-d tensors Dynamo makes of float attributes) are numbers, no shape
    scalars = agreement.ShapeAgreement(exclude=(1,))
    scalars([x, torch.tensor(1e-6, dtype=torch.float64), 5])
    assert scalars.data_positions == (0, 2) and "float64" not in sent[-1], (scalars.data_positions, sent[-1])


def test_a_tensor_on_another_device_than_its_group_is_an_error():
    from npu_dit.runtime import planes

    planes.declare("test-group", torch.device("cuda", 0))
    try:
        with pytest.raises(planes.PlaneError, match="test-group.*cpu.*cuda:0"):
            planes.check_device("test-group", torch.ones(2), "all_to_all")
        planes.check_device("test-group", torch.ones(2, device="meta"), "all_to_all")  # shapes only: not checked
        planes.declare("test-group", torch.device("cpu"))
        planes.check_device("test-group", torch.ones(2), "all_to_all")
    finally:
        planes._DECLARED.pop("test-group", None)


@pytest.mark.slow
def test_fused_qkv_under_inductor(tmp_path):
    from tests.dist_workers_planes import fused_under_inductor

    records = run_ranks(fused_under_inductor, 2, tmp_path, timeout=900)
    expected = _serial()
    for record in records:
        r = record["result"]
        assert r["counts"]["fused_qkv_all_to_all"] == SITES
        torch.testing.assert_close(r["out"], expected, atol=2e-5, rtol=1e-4)
        assert r["profiled"].get("gloo:all_to_all") == 2 * SITES, r["profiled"]


def test_a_gathered_output_keeps_the_layout_of_the_local_output():
    """`gather_streams` rebuilds an output from a gather buffer moved to its dim; `with_layout_of` gives
    it the dim order in memory of the graph's own output (the serial layout), copying only if needed."""
    from npu_dit.runtime.executor import with_layout_of

    like = torch.randn(2, 3, 4)  # contiguous [B, S, D]
    moved = torch.randn(3, 2, 4).movedim(0, 1)  # a gather along dim 1: [B, S, D] laid out as [S, B, D]
    out = with_layout_of(moved, like)
    assert out.is_contiguous() and torch.equal(out, moved)
    assert out.view(-1, 4).shape == (6, 4)  # the later frame's view works
    last = torch.randn(2, 4, 5, 3).permute(0, 3, 1, 2)  # channels-last [N, C, H, W]
    gathered = torch.randn(2, 3, 8, 5)  # contiguous, not in `last`'s order
    out = with_layout_of(gathered, last)
    assert torch.equal(out, gathered)
    assert sorted(range(4), key=lambda d: -out.stride(d)) == sorted(range(4), key=lambda d: -last.stride(d))
    same = torch.randn(2, 3, 8, 5).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    assert with_layout_of(same, last) is same  # already in that order: no copy
