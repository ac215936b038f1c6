"""Ulysses sequence parallelism: real multi-process runs on Gloo against the serial run, and the
structure of the rewritten graph."""

import functools
import warnings

import pytest
import torch

from npu_dit.passes.analysis import token_dims
from npu_dit.passes.infra import PassSpec, UserError, run_passes
from npu_dit.passes.scalar_inputs import scalar_inputs_pass
from npu_dit.passes.ulysses import ulysses_pass
from npu_dit.plans import SHARDING_META_KEY
from npu_dit.runtime import collectives as C
from npu_dit.runtime.dist import inspection_context
from npu_dit.tools.capture import capture_graph
from tests.conftest import tiny_model_and_inputs
from tests.dist_utils import run_ranks
from tests.dist_workers import fail_midway, hypothesis_attention, run_cases

UNEVEN = dict(height=112, width=80, prompt_len=7)  # 35 image tokens, 7 text tokens
CASES = [
    # name, tiny call, input overrides, config overrides, options
    # sync and async of the same input pair up for the bitwise check below; uneven FLUX with heads
    # not dividing the world, Qwen text-to-image, Qwen-Image-Edit on non-square latents and 3 input
    # images are in test_sound_sharding.py (uneven async FLUX also through Inductor below)
    ("flux", "flux", {}, {}, {}),
    ("flux-async", "flux", {}, {}, {"async_ulysses": True}),
    ("flux-3-heads", "flux", UNEVEN, {"num_attention_heads": 3}, {}),
    ("qwen-edit-static-text", "qwen-edit-masked", {}, {}, {}),
    ("qwen-edit-static-text-uneven-async", "qwen-edit-masked", UNEVEN, {}, {"async_ulysses": True}),
    ("qwen-edit-2509-uneven", "qwen-edit-2509", UNEVEN, {}, {}),
    ("qwen-edit-2509-uneven-async", "qwen-edit-2509", UNEVEN, {}, {"async_ulysses": True}),
]
TWO_RANK_CASES = {name for name, *_ in CASES} - {"flux-3-heads"}
# 3 heads on 4 ranks: fewer heads than ranks (padded heads); Edit-2509 on 4 ranks is in test_sound_sharding.py
FOUR_RANK_CASES = {"flux-3-heads", "qwen-edit-static-text-uneven-async"}


def serial_outputs(cases):
    outputs = {}
    for name, key, overrides, config_overrides, _ in cases:
        _, model, inputs = tiny_model_and_inputs(key, config_overrides=config_overrides, **overrides)
        with torch.no_grad():
            outputs[name] = model(**inputs)[0]
    return outputs


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("world_size", [2, 4])
def test_ulysses_matches_the_serial_run(world_size, tmp_path):
    chosen = TWO_RANK_CASES if world_size == 2 else FOUR_RANK_CASES
    cases = [c for c in CASES if c[0] in chosen]
    records = run_ranks(run_cases, world_size, tmp_path, timeout=1400, cases=cases)
    expected = serial_outputs(cases)
    for name, *_ in cases:
        for rank, record in enumerate(records):
            out, counts, fell_back, reason = record["result"][name]
            assert not fell_back, (name, reason)
            assert counts["attention_sites"] >= 3 and counts["all_to_all"] == 4 * counts["attention_sites"], (name, counts)
            err = (out - expected[name]).abs().max().item()
            assert err <= 1e-5, (name, rank, err)
    pairs = 0
    for rank_result in (r["result"] for r in records):  # scheduling moves nodes, never changes values
        for name, (sync, *_) in rank_result.items():
            if name + "-async" in rank_result:
                assert torch.equal(sync, rank_result[name + "-async"][0]), name
                pairs += 1
    assert pairs == (2 * len(records) if world_size == 2 else 0)


def test_ulysses_and_tensor_parallel_with_inductor(tmp_path):
    cases = [
        ("flux-uneven-async-inductor", "flux", UNEVEN, {}, {"async_ulysses": True, "inner_compiler": "inductor"}),
        ("qwen-static-text-inductor", "qwen-edit-masked", UNEVEN, {}, {"inner_compiler": "inductor"}),
        # tensor parallelism's all-reduces and held weight shards through Inductor too
        ("flux-tp2-inductor", "flux", UNEVEN, {}, {"ulysses_degree": 1, "tp_degree": 2, "inner_compiler": "inductor"}),
    ]
    records = run_ranks(run_cases, 2, tmp_path, timeout=900, cases=cases)
    expected = serial_outputs(cases)
    for name, *_ in cases:
        for record in records:
            out, counts, fell_back, reason = record["result"][name]
            assert not fell_back, reason
            assert (out - expected[name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("world_size, examples", [(2, 25), (3, 12), (4, 8)])
def test_property_any_lengths_heads_and_world_sizes(world_size, examples, tmp_path):
    """hypothesis draws text/image lengths (not multiples of the world size, shorter than it too),
    head counts 1..5, head dims, batch and a text mask; every rank draws the same examples."""
    records = run_ranks(hypothesis_attention, world_size, tmp_path, timeout=900, max_examples=examples)
    for record in records:
        assert record["result"] == [], record["result"][:3]


def test_a_rank_failing_mid_run_ends_the_others_with_a_clear_error(tmp_path):
    group_timeout = 20
    records = run_ranks(fail_midway, 2, tmp_path, timeout=240, group_timeout=group_timeout, allow_failures=True)
    survivor = records[0]
    assert survivor["ok"], survivor.get("traceback")
    result = survivor["result"]
    assert result["first_output_finite"]
    assert result["error_type"] == "DistributedRunError", result
    assert "rank 0 of 2" in result["message"] and "Another rank has probably exited" in result["message"]
    assert result["seconds"] < group_timeout + 30
    assert records[1]["exitcode"] == 3


# ---------------------------------------------------------------------------------------------
# single-process structure tests: the rewrite for rank r of P, without running collectives


def rewrite(key, world_size=2, rank=0, passes=("ulysses",), **overrides):
    _, model, inputs = tiny_model_and_inputs(key, **overrides)
    cap = capture_graph(model, inputs)
    ctx = inspection_context(world_size, rank)
    specs = [PassSpec("scalar_inputs", scalar_inputs_pass), PassSpec("ulysses", functools.partial(ulysses_pass, ctx=ctx))]
    if "async" in passes:
        from npu_dit.passes.async_ulysses import async_ulysses_pass

        specs.append(PassSpec("async_ulysses", async_ulysses_pass))
    gm, report = run_passes(cap.gm, specs)
    assert not report.fell_back, report.fallback_reason
    return gm, report


def calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def test_flux_structure_every_site_wrapped_in_all_to_all():
    gm, report = rewrite("flux")
    plan = gm.meta[SHARDING_META_KEY]
    assert [s.sharded for s in plan.streams] == [True, True]  # image and text, both dynamic
    sdpa = [n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
    assert len(sdpa) == 4
    for node in sdpa:
        assert all(arg.target is C.seq_to_heads_wait for arg in node.args[:3])
        (user,) = node.users
        assert user.target is C.heads_to_seq_start
    assert len(calls(gm, C.seq_to_heads_start)) == 12 and len(calls(gm, C.heads_to_seq_start)) == 4
    assert report.counts["all_to_all"] == 16
    assert {(g.index, g.dim) for g in plan.outputs} == {(0, 1)}
    shard_inputs = {(i, d) for i, d, _ in plan.shard_inputs}
    assert len(shard_inputs) == 4  # hidden_states, encoder_hidden_states, img_ids, txt_ids


def test_qwen_text_with_a_mask_stays_replicated_with_the_reason():
    gm, report = rewrite("qwen-edit-masked")
    plan = gm.meta[SHARDING_META_KEY]
    text = [s for s in plan.streams if not s.sharded]
    assert len(text) == 1 and "constant" in text[0].reason
    # replicated text: a local head slice before attention, an all-gather of heads after
    assert len(calls(gm, C.local_heads)) == 9 and len(calls(gm, C.gather_heads_start)) == 3
    # the RoPE tables built in the graph from img_shapes are sliced to this rank's chunk
    assert report.counts["localize"] == 6 and len(calls(gm, C.localize)) == 6


def test_qwen_text_rope_table_is_built_at_the_global_length_and_sliced():
    """Qwen-Image builds the text RoPE table from the text length; once that length is local the
    table must still be built from the global length, then sliced to this rank's rows."""
    gm, report = rewrite("qwen-edit")
    plan = gm.meta[SHARDING_META_KEY]
    assert [s.sharded for s in plan.streams] == [True, True]
    assert report.counts["global_tables"] >= 1
    global_lengths = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("ulysses_global_len")]
    table_users = {u for g in global_lengths for u in g.users}
    assert table_users, "no node reads the global lengths"


def test_qwen_mask_built_at_the_global_length_needs_no_gather():
    """`cat([text_mask, ones(B, s_img)])`: the fill reaches only the attention mask, so it is built at
    the global image length and the mask is whole on every rank (it was gathered at every site)."""
    gm, report = rewrite("qwen-edit-masked")
    assert report.counts["all_gather"] == 3  # per site: the replicated text's heads only
    assert not calls(gm, C.gather_seq_start) and not calls(gm, C.localize)[6:]  # the 6 RoPE slices, no more


def test_all_ranks_issue_the_same_collectives_in_the_same_order():
    sequences = []
    for rank in range(3):
        gm, _ = rewrite("qwen-edit-masked", world_size=3, rank=rank, passes=("ulysses", "async"))
        sequences.append([n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and n.target in C.COLLECTIVE_STARTS])
    assert sequences[0] == sequences[1] == sequences[2] and len(sequences[0]) == 15


def test_async_issues_v_then_q_then_k_and_overlaps_projections_and_the_mlp():
    gm, report = rewrite("flux", passes=("ulysses", "async"))
    order = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    from npu_dit.passes.analysis.module_paths import module_path

    def linears_between(start):
        (wait,) = start.users
        return [module_path(n) for n in order[position[start] + 1 : position[wait]] if n.target is torch._C._nn.linear]

    sdpa = [n for n in order if n.target is torch._C._nn.scaled_dot_product_attention]
    double, single = sdpa[0], sdpa[2]
    starts = {}
    for operand, arg in zip("qkv", double.args[:3]):
        starts[operand] = arg.args[0]  # seq_to_heads_wait(start, ...)
    assert position[starts["v"]] < position[starts["q"]] < position[starts["k"]]
    # V's exchange overlaps the Q and K projections; Q's overlaps K's
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"} <= set(linears_between(starts["v"]))
    assert "transformer_blocks.0.attn.to_k" in linears_between(starts["q"])
    # the single block's output exchange overlaps its MLP branch
    (out_start,) = single.users
    assert "single_transformer_blocks.0.proj_mlp" in linears_between(out_start)
    assert report.counts["overlapped_collectives"] == 16


def test_static_shapes_are_a_refusal_that_names_the_fix():
    from npu_dit.errors import Refusal

    _, model, inputs = tiny_model_and_inputs("flux")
    cap = capture_graph(model, inputs, dynamic=False)
    with pytest.raises(Refusal, match="Pass dynamic=True"):
        ulysses_pass(cap.gm, ctx=inspection_context(2, 0))


def test_a_length_one_stream_falls_back_with_a_warning():
    from tests.synthetic import JointAttention

    model = JointAttention(heads=2, head_dim=4).eval()
    cap = capture_graph(model, model.example_inputs(1, 1, 9, masked=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm, report = run_passes(cap.gm, [PassSpec("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 0)))])
    assert report.fell_back and gm is cap.gm and "refused" in report.fallback_reason
    assert sum("npu_dit" in str(w.message) for w in caught) == 1


def test_without_torchrun_the_error_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": 2})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 4))
    assert "torchrun --nproc-per-node 2" in str(info.value)
