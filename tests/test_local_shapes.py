"""Local shapes after the sharding rewrites: the substituted metadata equals a full fake propagation
(strict mode), and on real ranks every node's recorded shape is the shape of the tensor it makes."""

from __future__ import annotations

import functools

import pytest
import torch

from npu_dit.runtime import collectives as C
from tests.dist_utils import run_ranks


def _rewrite(cap, passes):
    from npu_dit.passes.infra import PassSpec, run_passes
    from npu_dit.passes.scalar_inputs import scalar_inputs_pass

    specs = [PassSpec("scalar_inputs", scalar_inputs_pass)] + [
        PassSpec(name, fn, changes_shapes=True) for name, fn in passes]
    gm, report = run_passes(cap.gm, specs)
    assert not report.fell_back, report.fallback_reason
    return gm


@pytest.mark.parametrize("key", ["flux", "qwen-edit-masked", "qwen-edit-2509"])
def test_substituted_shapes_equal_a_full_propagation(key, tiny_capture, monkeypatch):
    """Strict mode: TP-2 then Ulysses-2 (rank 1), each checked against a fresh propagation of the
    whole rewritten graph (`NPU_DIT_LINT=1` makes the runner do this after each pass)."""
    from npu_dit.passes.analysis.fake_prop import meta_mismatches
    from npu_dit.passes.tensor_parallel import tensor_parallel_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.runtime.dist import inspection_context

    monkeypatch.setenv("NPU_DIT_LINT", "1")
    _, _, cap = tiny_capture(key)
    tp = functools.partial(tensor_parallel_pass, ctx=inspection_context(2, 1), release_weights=False)
    gm = _rewrite(cap, [("tensor_parallel", tp)])
    assert meta_mismatches(gm) == []
    gm = _rewrite(cap, [("tensor_parallel", tp),
                        ("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 1)))])
    assert meta_mismatches(gm) == []


def _sliced_replicated_inputs(key):
    """Graphs where the TP rewrite slices a replicated input to this rank's heads (`feature_block`):
    K/V heads repeated by SDPA itself, K/V heads too few to divide, T5's per-head position bias."""
    from npu_dit.models.text_encoders import TEXT_ENCODERS, build_text_encoder
    from npu_dit.tools.capture import capture_graph
    from tests.synthetic import GroupedQueryAttention

    if key == "gqa-sdpa":
        return capture_graph(GroupedQueryAttention(), {"x": torch.randn(2, 5, 32)}, dynamic=True), 2
    spec = TEXT_ENCODERS[key]
    config = spec.config("tiny")
    world = 4 if key == "qwen2.5-vl-7b-lm" else 2  # 2 K/V heads on 4 ranks: replicated, then sliced
    return capture_graph(build_text_encoder(spec, config), spec.example_inputs(config, 1, 6), dynamic=True), world


@pytest.mark.parametrize("key", ["gqa-sdpa", "qwen2.5-vl-7b-lm", "t5-v1.1-xxl"])
def test_tp_slices_of_replicated_inputs_equal_a_full_propagation(key, monkeypatch):
    """Strict mode on the TP rewrite's other inserted calls: the sliced K/V heads or bias (a shape
    rule) and the repeat before it (run), every other node by substitution."""
    from npu_dit.passes.analysis.fake_prop import meta_mismatches
    from npu_dit.passes.tensor_parallel import tensor_parallel_pass
    from npu_dit.runtime.collectives import feature_block
    from npu_dit.runtime.dist import inspection_context

    monkeypatch.setenv("NPU_DIT_LINT", "1")
    cap, world = _sliced_replicated_inputs(key)
    tp = functools.partial(tensor_parallel_pass, ctx=inspection_context(world, world - 1), release_weights=False)
    gm = _rewrite(cap, [("tensor_parallel", tp)])
    assert any(n.target is feature_block for n in gm.graph.nodes)
    assert meta_mismatches(gm) == []


def _checked_runs(rank, world_size, cases):
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["NPU_DIT_CHECK_META"] = "1"  # every rewritten graph's first call checks its shapes
    from npu_dit.backend import RECORDS
    from tests.dist_workers_sound import build

    results = {}
    for name, model_name, kwargs, options in cases:
        model, inputs = build(model_name, {}, kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
        with torch.no_grad():
            out = compiled(**inputs)[0]
            expected = model(**inputs)[0]
        results[name] = ((out - expected).abs().max().item(), RECORDS[-1].report.fell_back)
    return results


@pytest.mark.slow
def test_recorded_shapes_are_the_real_local_shapes_on_every_rank(tmp_path):
    cases = [
        ("flux-ulysses", "flux.1-dev", dict(height=128, width=96, prompt_len=7), {"ulysses_degree": 2}),
        ("flux-tp", "flux.1-dev", dict(height=64, width=64, prompt_len=5),
         {"tp_degree": 2, "release_weights": False}),
        # two equal grids (the output and one input image of its size): the global length is their sum
        ("qwen-edit-ulysses", "qwen-image-edit", dict(height=64, width=48, prompt_len=7), {"ulysses_degree": 2}),
        ("qwen-2509-ulysses", "qwen-image-edit-2509",
         dict(height=64, width=64, prompt_len=9, input_images=[(64, 64), (32, 48)]), {"ulysses_degree": 2}),
    ]
    records = run_ranks(_checked_runs, 2, tmp_path, timeout=900, cases=cases)
    for rank, record in enumerate(records):
        for name, (err, fell_back) in record["result"].items():
            assert not fell_back, (rank, name)
            assert err <= 1e-5, (rank, name, err)


def test_the_real_shape_check_catches_a_wrong_recorded_shape(tiny_capture):
    """The check is not vacuous: one node's recorded shape made wrong is reported."""
    from npu_dit.runtime.meta_check import check_meta

    _, _, cap = tiny_capture("flux")
    assert check_meta(cap.gm, cap.real_inputs) == []
    node = next(n for n in cap.gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                and n.meta["val"].dim() == 3)
    saved = node.meta["val"]
    try:
        node.meta["val"] = saved.new_empty(saved.shape[0], saved.shape[1] + 1, saved.shape[2])
        problems = check_meta(cap.gm, cap.real_inputs)
    finally:
        node.meta["val"] = saved
    assert problems and node.name in problems[0], problems


def _rewire(replacement):
    """`b = (x * 2).permute(1, 0)` traced with fake values (x: [s, 3]), then b re-wired to an inserted
    `replacement(x)`; the refresh binds s to a fresh local length L. Returns (gm, b, stats)."""
    from torch import fx

    from npu_dit.passes.analysis.fake_prop import (Rewired, SymbolMap, copied_placeholder_values, refresh,
                                                   repropagate, swapped_inputs)

    gm = fx.symbolic_trace(lambda x: (x * 2).permute(1, 0))
    before = SymbolMap()
    s = before.env.create_symintnode(before.new_symbol("s", 6), hint=6)
    with before.mode:
        repropagate(gm, [torch.empty(s, 3)])
    *_, output = gm.graph.nodes
    output.meta.pop("val", None)  # as in a captured graph: the refresh gives no value to the output
    x, a, b = [n for n in gm.graph.nodes if n.op != "output"]
    original = {n: (n.args, n.kwargs) for n in gm.graph.nodes}
    old_values = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    with gm.graph.inserting_before(b):
        c = gm.graph.call_function(replacement, (x,))
    b.replace_input_with(a, c)
    gm.recompile()

    symbols = SymbolMap()
    local = symbols.new_symbol("L", 3)
    symbols.bind(s.node.expr, local)

    def rename(node):
        if node not in original:
            return None
        if original[node] == (node.args, node.kwargs):
            return {}
        return Rewired({}, [(new, old_values[old]) for new, old in swapped_inputs(original[node], (node.args, node.kwargs))])

    stats = refresh(gm, copied_placeholder_values(gm, symbols), symbols, rename)
    return gm, b, local, stats


def test_a_rewired_node_is_substituted_only_when_its_new_inputs_have_the_old_values():
    """The refresh's rule for re-wired nodes (the permute after a rewritten attention): substituted
    when its new input has the old input's value with the local length put in; run otherwise."""
    from npu_dit.passes.analysis.fake_prop import meta_mismatches

    gm, b, local, stats = _rewire(lambda x: x + 1)  # same value as x * 2: substituted
    assert b not in stats.ran
    assert [s.node.expr if isinstance(s, torch.SymInt) else s for s in b.meta["val"].shape] == [3, local]
    assert meta_mismatches(gm) == []

    gm, b, local, stats = _rewire(lambda x: x[:2])  # another length: run, and its new shape recorded
    assert b in stats.ran
    assert list(b.meta["val"].shape) == [3, 2]
    assert meta_mismatches(gm) == []


def test_under_tp_and_ulysses_no_tensor_op_of_the_captured_graph_is_fake_run(tiny_capture, monkeypatch):
    """Strict mode, TP-2 then Ulysses-2 on FLUX.1-dev: every tensor op of the captured graph gets its
    local value by substitution (untouched, or re-wired onto inserted calls that restore its inputs'
    values: the permutes after each rewritten attention); only lengths are computed again."""
    from npu_dit.passes.analysis import fake_prop
    from npu_dit.passes.tensor_parallel import tensor_parallel_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.runtime.dist import inspection_context

    monkeypatch.setenv("NPU_DIT_LINT", "1")
    stats = []
    refresh = fake_prop.refresh
    monkeypatch.setattr(fake_prop, "refresh", lambda *a, **k: stats.append(refresh(*a, **k)) or stats[-1])
    _, _, cap = tiny_capture("flux")
    captured = {n.name for n in cap.gm.graph.nodes}
    tp = functools.partial(tensor_parallel_pass, ctx=inspection_context(2, 1), release_weights=False)
    gm = _rewrite(cap, [("tensor_parallel", tp),
                        ("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 1)))])
    assert len(stats) == 2 and all(s.substituted > 400 for s in stats)
    rewired = [n for n in gm.graph.nodes if n.target == "permute" and n.args[0].name not in captured]
    assert rewired  # the permutes fed by the attention rewrite's output
    for s in stats:
        ran = [n.name for n in s.ran if n.name in captured and isinstance(n.meta.get("val"), torch.Tensor)]
        assert ran == []


def test_a_length_put_in_whole_and_inside_a_larger_sum():
    """The refresh puts a stream's length in where the graph computes it from other inputs: the whole
    expression (`h1*w1 + h2*w2`), and the same terms inside a larger sum; a lone term keeps its meaning."""
    import sympy

    from npu_dit.passes.analysis.fake_prop import put_in

    h1, w1, h2, w2, text, local = sympy.symbols("h1 w1 h2 w2 text local", integer=True, positive=True)
    copy = {h1: sympy.Symbol("H1", integer=True, positive=True)}
    mapping = {**copy, h1 * w1 + h2 * w2: local}
    assert put_in(h1 * w1 + h2 * w2, mapping) == local
    assert put_in(text + h1 * w1 + h2 * w2, mapping) == text + local
    assert put_in(2 * (h1 * w1 + h2 * w2), mapping) == 2 * local
    assert put_in(h1 * w1, mapping) == copy[h1] * w1  # the output grid alone is not the stream


def _grid_products(gm):
    """The sum over the `img_shapes` grids (frames, rows, cols) of rows x cols, from the SymInt inputs
    Dynamo made of them: the image stream's length as the graph computes it for its RoPE table."""
    symbols = [n.meta["val"].node.expr for n in gm.graph.nodes
               if n.op == "placeholder" and "img_shapes" in n.name and isinstance(n.meta.get("val"), torch.SymInt)]
    symbols = [x for x in symbols if x.free_symbols]  # the frame count, 1, is specialised
    assert len(symbols) % 2 == 0 and symbols, symbols
    return sum(symbols[i] * symbols[i + 1] for i in range(0, len(symbols), 2))


@pytest.mark.parametrize("key", ["qwen-edit", "qwen-edit-2509"])
def test_an_image_stream_computed_from_its_grids_is_substituted_under_tp_and_ulysses(key, tiny_capture, monkeypatch):
    """Issue #19 item 4: Qwen-Image-Edit's image stream is the output grid's tokens plus each input image's
    (two equal grids for `qwen-edit`, three grids for -2509); the graph builds its RoPE table from the
    grid sizes (`h1*w1 + h2*w2`), which Dynamo proves equal to the stream's length. The plan records that
    length, the refresh puts the stream's local or global length in for it, so the table's slices meet
    the local tokens in the new ShapeEnv: strict mode (TP-2 then Ulysses-2) passes, and no tensor op of
    the captured graph that reads a RoPE slice is fake-run (before, every one was: 122 on the full-size
    model; the text table rebuilt at the global length is still run)."""
    from npu_dit.passes.analysis import fake_prop
    from npu_dit.passes.tensor_parallel import tensor_parallel_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.plans import SHARDING_META_KEY
    from npu_dit.runtime import collectives as C
    from npu_dit.runtime.dist import inspection_context

    monkeypatch.setenv("NPU_DIT_LINT", "1")
    stats = []
    refresh = fake_prop.refresh
    monkeypatch.setattr(fake_prop, "refresh", lambda *a, **k: stats.append(refresh(*a, **k)) or stats[-1])
    _, _, cap = tiny_capture(key)
    captured = {n.name for n in cap.gm.graph.nodes}
    tp = functools.partial(tensor_parallel_pass, ctx=inspection_context(2, 1), release_weights=False)
    gm = _rewrite(cap, [("tensor_parallel", tp),
                        ("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 1)))])
    plan = gm.meta[SHARDING_META_KEY]
    image = next(s for s in plan.streams if "hidden_states[1]" == s.name)
    assert image.sharded and image.lengths == {_grid_products(cap.gm)}, image.lengths
    # the executor's global length input is that sum, in the refreshed symbols of the grid inputs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    global_len = placeholders[len(placeholders) - len(plan.global_lengths) + plan.global_lengths.index(image.id)]
    assert global_len.meta["val"].node.expr == _grid_products(gm)
    assert len(stats) == 2
    slices = [n for n in gm.graph.nodes if n.target is C.localize]
    assert slices  # the RoPE tables cut to this rank's tokens
    for s in stats:
        ran = [n.name for n in s.ran if n.name in captured and isinstance(n.meta.get("val"), torch.Tensor)
               and any(i in slices for i in n.all_input_nodes)]
        assert ran == []



def test_a_patch_grids_token_count_put_in_where_it_divides_a_product():
    """A patch grid's token count is a product of its input's dims (`(H//p)*(W//p)`, no symbol of its
    own): the refresh puts this rank's count in for it whole, times other factors (a stride, a flattened
    batch) and inside a sum (grid and text tokens); a factor alone (the rows) keeps its meaning."""
    import sympy

    from npu_dit.passes.analysis.fake_prop import put_in

    rows, cols, text, batch, local = sympy.symbols("rows cols text batch local", integer=True, positive=True)
    mapping = {rows * cols: local}
    assert put_in(rows * cols, mapping) == local
    assert put_in(64 * rows * cols, mapping) == 64 * local
    assert put_in(batch * rows * cols + text, mapping) == batch * local + text
    assert put_in(rows, mapping) == rows and put_in(2 * rows, mapping) == 2 * rows
    assert put_in(rows * text, mapping) == rows * text  # cols missing: not the count
    square = {rows ** 2: local}  # equal height and width share one symbol
    assert put_in(8 * rows ** 2, square) == 8 * local and put_in(rows, square) == rows


@pytest.mark.parametrize("name", ["SD3", "PixArt", "HunyuanVideo"])
def test_patch_grid_tokens_are_substituted_not_fake_run(name, monkeypatch):
    """Tokens patchified inside the graph (diffusers' SD3, PixArt, HunyuanVideo; tiny configs): strict mode
    passes (every recorded shape equals a full propagation), and no tensor op of the captured graph whose
    inputs are all captured nodes is fake-run; only the pass's inserted calls and the nodes re-wired onto
    them are (before, every node holding local grid tokens was: 164 of SD3's 590)."""
    from torch.utils._sympy.functions import Max

    from npu_dit.models.diffusers_dits import get_entry
    from npu_dit.passes.analysis import fake_prop
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.plans import SHARDING_META_KEY
    from npu_dit.runtime.dist import inspection_context
    from npu_dit.tools.capture import capture_graph

    monkeypatch.setenv("NPU_DIT_LINT", "1")
    stats = []
    refresh = fake_prop.refresh
    monkeypatch.setattr(fake_prop, "refresh", lambda *a, **k: stats.append(refresh(*a, **k)) or stats[-1])
    entry = get_entry(name)
    cap = capture_graph(entry.build(), entry.example_inputs(), dynamic=True)
    captured = {n.name: [i.name for i in n.all_input_nodes] for n in cap.gm.graph.nodes}
    # a view of the patch embedding's output whose strides hold the grid's rows and columns as separate
    # factors (`Max(1, H//p)*Max(1, W//p)`), not as the token count, is run
    apart = {n.name for n in cap.gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
             and any(isinstance(x, torch.SymInt) and x.node.expr.has(Max) for x in n.meta["val"].stride())}
    gm = _rewrite(cap, [("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, 1)))])
    assert any(s.grid is not None and s.sharded for s in gm.meta[SHARDING_META_KEY].streams)
    (s,) = stats
    ran = [n.name for n in s.ran if n.name in captured and isinstance(n.meta.get("val"), torch.Tensor)
           and [i.name for i in n.all_input_nodes] == captured[n.name] and n.name not in apart]
    assert ran == [], ran
    assert s.substituted > 2 * len(s.ran)  # before: fewer substituted than run (PixArt 51 and 68)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_the_gather_rule_gives_the_helpers_fake_value(dtype):
    """`gather_seq_start` (a mask's key axis, grid tokens before an unpatchify) gets its refreshed value
    from a shape rule: the sizes, dtype and (contiguous) strides the helper's own fake run gives, with
    symbolic lengths whose sum is not simplified."""
    from npu_dit.passes.analysis.fake_prop import SymbolMap, symbolic_dispatch
    from npu_dit.passes.collective_meta import RULES
    from npu_dit.runtime import collectives as C
    from npu_dit.runtime.dist import inspection_context

    symbols = SymbolMap()
    env, mode = symbols.env, symbols.mode
    rows, cols = (env.create_symintnode(symbols.new_symbol(name, v), hint=v) for name, v in (("rows", 5), ("cols", 3)))
    lengths = C.grid_chunk_lengths(rows, cols, 2)
    with mode, symbolic_dispatch():
        x = torch.empty(2, lengths[1], 4, dtype=dtype)
        y = C.gather_seq_start(x, 1, lengths, 2, inspection_context(2, 1).group_name)
    sizes, rule_dtype, device = RULES[C.gather_seq_start](x, 1, lengths, 2, inspection_context(2, 1).group_name)
    assert [str(s) for s in y.shape] == [str(s) for s in sizes] and (y.dtype, y.device) == (rule_dtype, device)
    assert y.is_contiguous()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_guard_dynamo_proved_stays_proven_after_the_copy(rank, monkeypatch):
    """LTX-Video's cross-attention mask is viewed per head as `[B, (2*Bm)//B, 1, S]` (B the hidden batch,
    Bm the mask's); Dynamo proved `Eq((2*Bm)//B, 2)` while tracing, and the Ulysses pass cuts the mask's
    2 heads on that proof. The rewrite's ShapeEnv and the strict mode's full propagation each copy the
    symbols into a fresh ShapeEnv: the guard goes with them, so strict mode agrees (it reported
    `(2*s29)//s32` against the recorded 2 before), after Ulysses alone and after TP then Ulysses."""
    from npu_dit.models.diffusers_dits import get_entry
    from npu_dit.passes.analysis.fake_prop import meta_mismatches
    from npu_dit.passes.tensor_parallel import tensor_parallel_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.runtime.dist import inspection_context
    from npu_dit.tools.capture import capture_graph

    monkeypatch.setenv("NPU_DIT_LINT", "1")
    entry = get_entry("LTXVideo")
    cap = capture_graph(entry.build(), entry.example_inputs(), dynamic=True)
    ulysses = ("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, rank)))
    gm = _rewrite(cap, [ulysses])  # the runner's strict check ran after the pass
    assert [n for n in gm.graph.nodes if n.target is C.local_heads]  # the mask's heads were cut
    assert meta_mismatches(gm) == []
    tp = ("tensor_parallel", functools.partial(tensor_parallel_pass, ctx=inspection_context(2, rank), release_weights=False))
    assert meta_mismatches(_rewrite(cap, [tp, ulysses])) == []
