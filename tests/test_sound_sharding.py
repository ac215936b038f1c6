"""Issue #8: the public call shards what it should, refuses what it cannot prove, and ranks agree.

Every run here is `torch.compile(model, backend="npu_dit", dynamic=True, options=...)` exactly as the
README shows, on real Gloo processes, compared with the serial eager run.
"""

import warnings

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.dist_workers_sound import mismatched_shapes, public_cases, token_mixing
from tests.synthetic import TokenMixing

PUBLIC_CASES = [
    # name, seed model, config overrides, example-input kwargs, options
    # FLUX whose image token count (64) equals the text encoder's width: duck shaping would tie them
    ("flux-token-count-equals-width", "flux.1-dev", {"joint_attention_dim": 64}, dict(height=128, width=128, prompt_len=12), {}),
    ("flux-uneven-3-heads-async", "flux.1-dev", {"num_attention_heads": 3}, dict(height=112, width=80, prompt_len=7), {"async_ulysses": True}),
    ("qwen-t2i-square", "qwen-image-lightning", {}, dict(height=128, width=128, prompt_len=12), {}),
    ("qwen-t2i-nonsquare-async", "qwen-image-lightning", {}, dict(height=128, width=96, prompt_len=9), {"async_ulysses": True}),
    ("qwen-t2i-masked", "qwen-image-lightning", {}, dict(height=96, width=128, prompt_len=10, batch=2), {}),
    ("qwen-edit-nonsquare", "qwen-image-edit", {}, dict(height=128, width=96, prompt_len=11), {}),
    ("qwen-edit-2509-3-images", "qwen-image-edit-2509", {},
     dict(height=96, width=96, prompt_len=8, input_images=[(64, 64), (96, 128), (32, 64)]), {"async_ulysses": True}),
]


def _serial(name, model_name, config_overrides, kwargs):
    from tests.dist_workers_sound import build

    model, inputs = build(model_name, config_overrides, kwargs)
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("world_size", [2, 4])
def test_public_call_shards_every_dynamic_stream(world_size, tmp_path):
    cases = PUBLIC_CASES if world_size == 2 else PUBLIC_CASES[:1] + PUBLIC_CASES[3:4] + PUBLIC_CASES[6:]
    records = run_ranks(public_cases, world_size, tmp_path, timeout=1400, cases=cases)
    for name, model_name, config_overrides, kwargs, _ in cases:
        expected = _serial(name, model_name, config_overrides, kwargs)
        for rank, record in enumerate(records):
            out, fell_back, reason, streams = record["result"][name]
            assert not fell_back, (name, rank, reason)
            # every stream whose length Dynamo kept symbolic is sharded; a replicated one must be static
            for stream_name, sharded, why in streams:
                assert sharded or "constant" in why, (name, stream_name, why)
            assert sum(sharded for _, sharded, _ in streams) >= 1
            err = (out - expected).abs().max().item()
            assert err <= 1e-5, (name, rank, err)
            # the layout too: a later frame's views of this output (HiDream's `x.view(-1, D)`) need the
            # strides eager gives, not those of the gather that rebuilt it
            layout = [(out.stride(d), expected.stride(d)) for d in range(out.dim()) if out.shape[d] > 1]
            assert all(a == b for a, b in layout), (name, rank, out.stride(), expected.stride())
    # the image stream of FLUX is sharded although its length equals a weight's width
    streams = records[0]["result"]["flux-token-count-equals-width"][3]
    assert all(sharded for _, sharded, _ in streams), streams


@pytest.mark.slow
def test_token_mixing_ops_refuse_and_stay_exact(tmp_path):
    records = run_ranks(token_mixing, 2, tmp_path, timeout=600, kinds=TokenMixing.KINDS)
    for kind in TokenMixing.KINDS:
        torch.manual_seed(0)
        model = TokenMixing(kind).eval()
        inputs = model.example_inputs(1, 5, 12, masked=False)
        with torch.no_grad():
            expected = model(**inputs)[0]
        for record in records:
            # the whole pass refuses, or it keeps the image stream whole (and shards the text), saying why
            out, fell_back, image_whole, reason = record["result"][kind]
            assert image_whole, (kind, "the image tokens were sharded although the op mixes them")
            assert ("refused" if fell_back else "kept whole") in reason, (kind, reason)
            err = (out - expected).abs().max().item()
            assert err <= 1e-5, (kind, err)


def test_the_plain_joint_attention_is_still_rewritten(tmp_path):
    """The refusals above are not a pass that refuses everything: the same model without the
    mixing op is sharded."""
    records = run_ranks(token_mixing, 2, tmp_path, timeout=300, kinds=("none",))
    for record in records:
        out, fell_back, image_whole, reason = record["result"]["none"]
        assert not fell_back and not image_whole, reason


@pytest.mark.slow
def test_ranks_with_different_shapes_fail_clearly_on_every_rank(tmp_path):
    records = run_ranks(mismatched_shapes, 2, tmp_path, timeout=400, group_timeout=240, allow_failures=True)
    for rank, record in enumerate(records):
        assert record["ok"], record.get("error")
        error_type, message, seconds = record["result"]
        # raised at compile time (Dynamo wraps it in BackendCompilerFailed) or at the call
        assert error_type in ("RankMismatchError", "BackendCompilerFailed"), (rank, error_type, message)
        assert "RankMismatchError" in message or error_type == "RankMismatchError", message
        assert "same input shapes" in message
        assert seconds < 180, seconds  # inside the 240 s group timeout: an error, not a hang (91 s seen under load)


def test_a_bad_call_does_not_poison_the_model():
    """A call Dynamo cannot trace (timestep=None, which eager rejects too) makes Dynamo compile the
    blocks one by one; npu-dit refuses those graphs (one warning each) instead of raising, so every
    later valid call runs, and gives the eager result."""
    from npu_dit.backend import RECORDS
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux")
    torch._dynamo.reset()
    RECORDS.clear()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True,
                             options={"cache": {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.0}})
    with torch.no_grad():
        expected = model(**inputs)[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(AttributeError):  # what eager raises too
                compiled(**{**inputs, "timestep": None})
            out = compiled(**inputs)[0]
            out2 = compiled(**inputs)[0]
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(out2, expected, atol=1e-5)
    assert RECORDS, "the valid calls compiled nothing"
    refusals = [r for r in RECORDS if r.report.fell_back]
    assert all("refused" in r.report.fallback_reason for r in refusals)
    messages = [str(w.message) for w in caught if "npu_dit" in str(w.message)]
    assert len(messages) >= len(refusals) > 0


@pytest.mark.parametrize("key", ["flux", "qwen-edit-2509"])
def test_meta_after_the_rewrite_is_the_local_value(key, tiny_capture):
    """Every node's meta["val"] after the Ulysses pass matches a fresh fake propagation, and the
    local and global lengths of a sharded stream are different symbols."""
    from npu_dit.passes.analysis.fake_prop import meta_mismatches
    from npu_dit.passes.infra import PassSpec, run_passes
    from npu_dit.passes.scalar_inputs import scalar_inputs_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.plans import SHARDING_META_KEY
    from npu_dit.runtime.dist import inspection_context
    import functools

    _, _, cap = tiny_capture(key)
    gm, report = run_passes(cap.gm, [PassSpec("scalar_inputs", scalar_inputs_pass),
                                     PassSpec("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 1)))])
    assert not report.fell_back, report.fallback_reason
    assert meta_mismatches(gm) == []
    plan = gm.meta[SHARDING_META_KEY]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, dim, stream in plan.shard_inputs:
        local = placeholders[ph].meta["val"].shape[dim]
        global_ = placeholders[len(placeholders) - len(plan.global_lengths) + plan.global_lengths.index(stream)].meta["val"]
        assert isinstance(local, torch.SymInt) and isinstance(global_, torch.SymInt)
        assert local.node.expr != global_.node.expr, (local, global_)
    # the gathered attention inputs are [B, heads/P, global length, D]: built from the global symbols
    from npu_dit.runtime import collectives as C

    waits = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is C.seq_to_heads_wait]
    global_symbols = {placeholders[-1 - i].meta["val"].node.expr for i in range(len(plan.global_lengths))}
    for wait in waits:
        seq = wait.meta["val"].shape[2]
        assert isinstance(seq, torch.SymInt) and seq.node.expr.free_symbols <= {s for e in global_symbols for s in e.free_symbols}
    # this rank's share of each stream is one fresh symbol, and no shape divides a stream's length by
    # the world size (`(G + P - 1 - r) // P` in every shape downstream made each fake op slow)
    import sympy
    from torch.utils._pytree import tree_leaves
    from torch.utils._sympy.functions import FloorDiv

    shares = {placeholders[ph].meta["val"].shape[dim].node.expr for ph, dim, _ in plan.shard_inputs}
    assert shares and all(isinstance(e, sympy.Symbol) for e in shares), shares

    def divisions(graph_module):  # the floor divisions in its shapes
        found = {}
        for node in graph_module.graph.nodes:
            for value in tree_leaves(node.meta.get("val")):
                sizes = value.shape if isinstance(value, torch.Tensor) else [value]
                for size in sizes:
                    if isinstance(size, torch.SymInt):
                        found.update({d: node.name for d in size.node.expr.atoms(FloorDiv)})
        return found

    # the model's own (a patchify's `h // 2`, in the pass's own symbol names) stay; the pass adds none
    found = divisions(gm)
    assert not {d: name for d, name in found.items() if d.free_symbols & shares}, found
    assert len(found) <= len(divisions(cap.gm)), (found, divisions(cap.gm))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_tokens_patchified_inside_the_graph(world_size, tmp_path):
    """Issue 8 item 6: tokens made inside the graph are sharded in whole patch rows and give the
    serial result: a patch-embedding convolution (a synthetic PatchDiT with a learned table cropped to
    the grid and a per-sample timestep embedding), a reshape/permute patchify (also returning the
    tokens without unpatchify), diffusers' SD3 (cropped pos_embed, sharded text stream, async
    Ulysses) and PixArt at its own sample size (a grid-sized pos_embed buffer, cross-attention). An
    overlapping patch convolution refuses on every rank and stays exact; a cumulative sum over the
    tokens where a reshape patchify makes them (a grid cannot be kept whole: no input carries it) is
    given the gathered tokens and runs as in the serial graph. 5 patch rows:
    uneven on 2 and 4 ranks. One spawn runs every case; on 4 ranks only the reshape patchify
    returning tokens on Ulysses-4, the conv patchify on Ulysses-2 x TP-2 (the other cases add no
    rule that depends on the world size), and 3 patch rows on 4 ranks (one rank holds no tokens)."""
    from tests.dist_workers_sound import patch_cases, patch_models

    sharded = ("conv-patchify", "sd3", "reshape-patchify", "tokens-out", "pixart", "mixed-after-patchify")
    refused = {"overlapping-conv": "not a patch grid"}
    names = sharded + tuple(refused)
    options = {}
    if world_size == 4:
        sharded = names = ("conv-patchify", "tokens-out", "three-patch-rows")
        options = {"conv-patchify": {"ulysses_degree": 2, "tp_degree": 2}}
    records = run_ranks(patch_models, world_size, tmp_path, timeout=600, names=names, options=options)
    for name in names:
        model, inputs = patch_cases()[name]()
        with torch.no_grad():
            expected = model(**inputs)[0]
        for rank, record in enumerate(records):
            out, fell_back, reason, structure = record["result"][name]
            if name in sharded:
                assert not fell_back, (name, rank, reason)
            else:
                assert fell_back and "refused" in reason and refused[name] in reason, (name, rank, reason)
            assert out.shape == expected.shape, (name, rank)
            assert (out - expected).abs().max().item() <= 1e-5, (name, rank)
    # which inputs are sharded on which dim (a plan written by hand): the latent's patch grid is cut
    # in whole patch rows inside the graph (the latent enters whole), SD3's text input is sharded on
    # dim 1, and nothing is left for the executor to gather (unpatchified or returned tokens are
    # gathered in the graph)
    for record in records:
        for name in {"conv-patchify", "reshape-patchify", "tokens-out"} & set(names):
            structure = record["result"][name][3]
            assert structure["shard_inputs"] == [] and structure["grids"] == [("latent", 2, 3, 2, 2)], name
            assert structure["output_gathers"] == [], name
            if name in options:  # the TP pass ran first and sharded linears, the grid on TP-local heads
                assert structure["counts"].get("row_linear", 0) > 0, structure["counts"]
        if "mixed-after-patchify" in names:  # the cumsum read the gathered grid, every position of it
            assert record["result"]["mixed-after-patchify"][3]["counts"].get("gather_before_mixing") == 1
        # a patch-embedding convolution is given only this rank's rows (a rank holding none included)
        for name in {"conv-patchify", "sd3", "pixart", "three-patch-rows"} & set(names):
            assert record["result"][name][3]["counts"].get("patch_rows") == 1, name
        if "sd3" not in names:
            continue
        # PixArt at its own sample size: a grid-sized pos_embed buffer is sliced to this rank's patch rows
        pixart = record["result"]["pixart"][3]
        assert pixart["shard_inputs"] == [("encoder_hidden_states", 1)]
        assert pixart["grids"] == [("hidden_states", 2, 3, 2, 2)]
        sd3 = record["result"]["sd3"][3]
        assert sd3["shard_inputs"] == [("encoder_hidden_states", 1)]
        assert sd3["grids"] == [("hidden_states", 2, 3, 2, 2)]
        assert sd3["output_gathers"] == []


@pytest.mark.parametrize("kwargs", [{}, {"patchify": "reshape"}, {"patchify": "reshape", "unpatchify": False}],
                         ids=["conv", "reshape", "tokens-out"])
def test_patch_grid_rewrite_structure(kwargs):
    """Rank 1 of 2, without collectives: the tokens are cut to this rank's rows where they are made
    (a patch-embedding convolution is given only the input rows of them; a reshape patchify and the
    cropped positional table are sliced by `localize_rows`), attention exchanges
    them by all-to-all, and one gather makes them whole again before the unpatchify reshape (or the
    output); meta after the rewrite is the local value."""
    import functools

    from npu_dit.passes.analysis.fake_prop import meta_mismatches
    from npu_dit.passes.infra import PassSpec, run_passes
    from npu_dit.passes.scalar_inputs import scalar_inputs_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.plans import SHARDING_META_KEY
    from npu_dit.runtime import collectives as C
    from npu_dit.runtime.dist import inspection_context
    from npu_dit.tools.capture import capture_graph
    from tests.synthetic import PatchDiT

    torch.manual_seed(0)
    model = PatchDiT(**kwargs).eval()
    cap = capture_graph(model, model.example_inputs(1, 10, 8))
    gm, report = run_passes(cap.gm, [PassSpec("scalar_inputs", scalar_inputs_pass),
                                     PassSpec("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 1)))])
    assert not report.fell_back, report.fallback_reason
    plan = gm.meta[SHARDING_META_KEY]
    assert plan.shard_inputs == [] and plan.global_lengths == [] and plan.outputs == []
    (stream,) = plan.streams
    assert stream.sharded and stream.grid[1:] == (2, 3, 2, 2)

    def calls(fn):
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]

    if kwargs.get("patchify", "conv") == "conv":
        # the patch embedding convolves only this rank's rows; the cropped table is sliced to them
        (narrowed,) = calls(C.patch_rows_input)
        (conv,) = narrowed.users
        assert conv.target is torch.conv2d and [u.target for u in conv.users] == [C.patch_rows_output]
        assert len(calls(C.localize_rows)) == 1
    else:
        assert len(calls(C.localize_rows)) == 2 and not calls(C.patch_rows_input)
    assert len(calls(C.seq_to_heads_start)) == 3 and len(calls(C.heads_to_seq_start)) == 1
    (gather,) = calls(C.gather_seq_wait)
    (user,) = gather.users
    if kwargs.get("unpatchify", True):
        assert user.op == "call_method" and user.target == "reshape"
    else:
        assert user.op == "output"
    assert meta_mismatches(gm) == []


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_a_stream_that_cannot_be_kept_whole_is_gathered_where_it_must_be(world_size, tmp_path):
    """One token stream, carried by the tokens and on both dims of a pairwise mask [B, N, N] (OmniGen's
    form), 11 tokens: uneven on 2 and 4 ranks. The mask enters whole (a rank's chunk of both dims could
    not be made whole again) and the tokens are sharded. Where an op needs every token of the stream
    (a slice inside it, a mean over it, attention from a query of no stream: keys and values) and the
    stream cannot be kept whole instead (it is the only
    one), its tokens are all-gathered into that op, which then runs as in the serial graph. Exact
    against eager on every rank; before, the mask was cut on one dim only (a collective of mismatched
    sizes) and the ops made the pass refuse."""
    from tests.dist_workers_sound import patch_cases, patch_models

    names = ("pair-mask", "pair-mask-drop-first", "pair-mask-token-mean", "pair-mask-pooled-query")
    records = run_ranks(patch_models, world_size, tmp_path, timeout=600, names=names)
    for name in names:
        model, inputs = patch_cases()[name]()
        with torch.no_grad():
            expected = model(**inputs)[0]
        for rank, record in enumerate(records):
            out, fell_back, reason, structure = record["result"][name]
            assert not fell_back, (name, rank, reason)
            assert structure["shard_inputs"] == [("tokens", 1)], (name, structure)  # the mask enters whole
            assert out.shape == expected.shape, (name, rank)
            assert (out - expected).abs().max().item() <= 1e-5, (name, rank)
            gathers = structure["counts"].get("gather_before_mixing", 0)
            assert gathers == (0 if name == "pair-mask" else 1), (name, structure["counts"])
