"""The comm_compression pass (comm_dtype="float8_e4m3fn") on tiny FLUX's rewritten graph, rank 0 of 2:
which exchanges it packs in FP8 and which it leaves (the numerics, on real ranks, are in
tests/test_comm_dtype.py)."""

import operator

import torch

from npu_dit.config import CompileConfig
from npu_dit.passes.analysis.attention_ops import attention_qkv, is_attention_call
from npu_dit.passes.infra import run_passes
from npu_dit.passes.pipeline import build_pipeline
from npu_dit.runtime import collectives as C
from npu_dit.runtime import fp8_comm as P
from npu_dit.runtime.dist import inspection_context
from npu_dit.tools.capture import capture_graph
from tests.conftest import tiny_model_and_inputs

SITES = 4


def _rewrite(cap, **options):
    cfg = CompileConfig.from_options({"ulysses_degree": 2, "comm_dtype": "float8_e4m3fn", **options})
    gm, report = run_passes(cap.gm, build_pipeline(cfg, inspection_context(2, 0)))
    assert not report.fell_back, report.fallback_reason
    return gm, report


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _operand_of(item, attention):
    """'query', 'key' or 'value': which operand of `attention` the exchanged value becomes."""
    seen, stack = set(), [item]
    while stack:
        node = stack.pop()
        for name, operand in zip(("query", "key", "value"), attention_qkv(attention)):
            if operand is node:
                return name
        for user in node.users:
            if user not in seen and not is_attention_call(user):
                seen.add(user)
                stack.append(user)
    return None


def test_sync_packs_q_and_v_in_fp8_beside_k_and_the_output_in_fp8():
    _, model, inputs = tiny_model_and_inputs("flux")
    cap = capture_graph(model, inputs)
    gm, report = _rewrite(cap)
    starts = _calls(gm, P.seq_to_heads_packed_start)
    assert len(starts) == SITES and not _calls(gm, C.seq_to_heads_qkv_start) and not _calls(gm, C.seq_to_heads_start)
    attention = [n for n in gm.graph.nodes if is_attention_call(n)]
    for start in starts:
        assert start.args[1] == (True, False, True)
        (wait,) = start.users
        items = sorted(wait.users, key=lambda n: n.args[1])
        assert [n.target for n in items] == [operator.getitem] * 3
        (site,) = [a for a in attention if _operand_of(items[0], a)]
        assert [_operand_of(i, site) for i in items] == ["query", "key", "value"]  # K is the raw one
        assert start.meta["val"].dtype == torch.uint8
    assert len(_calls(gm, P.heads_to_seq_fp8_start)) == SITES and not _calls(gm, C.heads_to_seq_start)
    assert report.counts["fp8_exchanges"] == 2 * SITES and report.counts["fp8_operands"] == 3 * SITES

    # async: one message per operand; K's stays uncompressed, Q's and V's are FP8, order kept
    gm, report = _rewrite(cap, async_ulysses=True)
    kept = _calls(gm, C.seq_to_heads_start)
    assert len(kept) == SITES and len(_calls(gm, P.seq_to_heads_packed_start)) == 2 * SITES
    for start in kept:
        (wait,) = start.users
        assert any(_operand_of(wait, a) == "key" for a in gm.graph.nodes if is_attention_call(a))
    assert report.counts["kept_exchanges"] == SITES


def test_a_head_size_the_scale_slot_cannot_hold_is_left_uncompressed():
    # head size 12: not a multiple of 8, the packed message's per-head slots are not aligned for K's bytes
    _, model, inputs = tiny_model_and_inputs("flux", config_overrides={"attention_head_dim": 12,
                                                                       "axes_dims_rope": (4, 4, 4)})
    gm, report = _rewrite(capture_graph(model, inputs))
    assert not _calls(gm, P.seq_to_heads_packed_start) and not _calls(gm, P.heads_to_seq_fp8_start)
    assert report.counts["fp8_exchanges"] == 0 and report.counts["kept_exchanges"] == 2 * SITES
    assert any("no Ulysses exchange could be compressed" in note for r in report.records for note in r.notes)
