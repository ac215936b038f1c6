"""`npu-dit bench dits`: the DiT table builds, its inputs run, and the survey's verdicts follow the records.

The verdicts are checked on hand-written rank files (what `dit_survey_worker` writes), so no process group
is started here; the survey itself runs in `npu-dit bench dits`.
"""

from __future__ import annotations

import collections

import pytest
import torch

import diffusers
from npu_dit.models.diffusers_dits import ENTRIES, NOT_SURVEYED, get_entry
from npu_dit.tools import dit_survey
from npu_dit.tools.dit_survey_worker import max_abs_error, output_tensors


def test_table_names_real_distinct_classes():
    classes = [e.class_name for e in ENTRIES]
    assert len(set(classes)) == len(classes) >= 35
    assert len({e.name.lower() for e in ENTRIES}) == len(ENTRIES)  # short names resolve to one entry
    for name in classes:
        assert hasattr(diffusers, name), name
    assert not set(classes) & set(NOT_SURVEYED)
    assert get_entry("flux").class_name == "FluxTransformer2DModel"
    assert get_entry("WanTransformer3DModel").name == "Wan"
    with pytest.raises(ValueError, match="no DiT named"):
        get_entry("NoSuchModel")


def test_every_transformer_class_is_surveyed_or_says_why():
    import inspect

    import diffusers.models.transformers as transformers

    classes = {name for name, value in vars(transformers).items()
               if inspect.isclass(value) and issubclass(value, diffusers.ModelMixin)}
    missing = classes - {e.class_name for e in ENTRIES} - set(NOT_SURVEYED)
    assert not missing, f"add these to ENTRIES or NOT_SURVEYED: {sorted(missing)}"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_every_entry_builds_on_meta(entry):
    model = entry.build("meta")
    assert isinstance(model, torch.nn.Module)
    inputs = entry.example_inputs()
    assert any(isinstance(v, torch.Tensor) for v in inputs.values()) or "x" in inputs


@pytest.mark.parametrize("name, shape", [
    ("Flux", (1, 16, 4)),               # packed latents in, packed latents out (diffusers' test output_shape)
    ("Wan", (1, 4, 2, 16, 16)),         # [B, C, F, H, W] video
    ("HunyuanDiT", (2, 8, 8, 8)),       # learned sigma: 2 x in_channels out
])
def test_representative_entries_run_eagerly(name, shape):
    entry = get_entry(name)
    model = entry.build()
    with torch.no_grad():
        first = output_tensors(model(**entry.example_inputs()))
        again = output_tensors(model(**entry.example_inputs()))  # seeded inputs: the same call twice
    assert tuple(first[0].shape) == shape
    assert max_abs_error(first, again) == 0.0


def test_output_tensors_and_error():
    out = collections.OrderedDict(sample=torch.ones(2, 3), extra=[torch.zeros(1)])
    assert [t.shape for t in output_tensors(out)] == [torch.Size([2, 3]), torch.Size([1])]
    assert max_abs_error([torch.ones(2)], [torch.tensor([1.0, 1.5])]) == 0.5
    with pytest.raises(RuntimeError, match="other shapes"):
        max_abs_error([torch.ones(2)], [torch.ones(3)])


def _rank(rank, *, graphs=(), max_err=0.0, phase="done", eager_error=None, compile_error=None, breaks=None):
    return {"rank": rank, "phase": phase, "eager_error": eager_error, "compile_error": compile_error,
            "max_err": max_err, "graphs": list(graphs), "graph_breaks": breaks or {}, "warnings": [], "parameters": 10}


def _graph(fell_back=False, reason=None, all_to_all=0):
    return {"tag": "g", "nodes": 100, "fell_back": fell_back, "reason": reason,
            "counts": {"all_to_all": all_to_all} if all_to_all else {}}


def test_verdict_sharded_takes_the_worst_rank_error():
    graphs = [_graph(all_to_all=8)]
    r = dit_survey.verdict("Flux", [_rank(0, graphs=graphs, max_err=1e-7), _rank(1, graphs=graphs, max_err=3e-7)])
    assert (r["status"], r["all_to_all"], r["graphs"], r["max_err"], r["exact"]) == ("sharded", 8, 1, 3e-7, True)


def test_verdict_refused_names_the_fallback_and_keeps_the_error():
    graphs = [_graph(all_to_all=4), _graph(fell_back=True, reason="Ulysses: no attention site")]
    r = dit_survey.verdict("X", [_rank(0, graphs=graphs, max_err=2e-3, breaks={"reason": 1}), _rank(1, graphs=graphs)])
    assert r["status"] == "refused"
    assert r["reason"] == "Ulysses: no attention site (1 of 2 graphs fell back; this one 100 nodes)"
    assert (r["fallbacks"], r["graph_breaks"], r["exact"]) == (1, 1, False)  # a refused graph must be exact
    assert "NOT EXACT" in dit_survey.summary([r])


def test_verdict_refused_names_the_largest_graph_that_fell_back():
    no_attention = "Ulysses: this graph has no attention call (a piece of the model after a graph break?)"
    graphs = [_graph(True, "bool has no sharding rule"), dict(_graph(True, "repeat has no sharding rule"), nodes=900),
              dict(_graph(True, no_attention), nodes=5000)]
    r = dit_survey.verdict("X", [_rank(0, graphs=graphs), _rank(1, graphs=graphs)])
    assert r["reason"] == "repeat has no sharding rule (3 of 3 graphs fell back; this one 900 nodes)"
    assert [g["nodes"] for g in r["per_graph"]] == [100, 900, 5000]
    only = dit_survey.verdict("X", [_rank(0, graphs=graphs[2:]), _rank(1, graphs=graphs[2:])])
    assert only["reason"] == no_attention


def test_verdict_pieces_without_attention_do_not_hide_sharded_attention():
    """After graph breaks, pieces holding no attention fall back (nothing to shard); the model counts as
    sharded when every graph with attention was sharded, and refused when another graph refused."""
    no_attention = "Ulysses: this graph has no attention call (a piece of the model after a graph break?)"
    graphs = [_graph(all_to_all=4), _graph(True, no_attention), _graph(True, no_attention)]
    r = dit_survey.verdict("X", [_rank(0, graphs=graphs, max_err=1e-7), _rank(1, graphs=graphs)])
    assert (r["status"], r["reason"], r["exact"]) == ("sharded", "3 graphs; the 2 without attention run whole", True)
    refused = dit_survey.verdict("X", [_rank(r, graphs=graphs + [_graph(True, "sum combines positions")]) for r in (0, 1)])
    assert refused["status"] == "refused" and refused["reason"].startswith("sum combines positions")
    none = dit_survey.verdict("X", [_rank(r, graphs=[_graph(), _graph(True, no_attention)]) for r in (0, 1)])
    assert none["status"] == "refused"  # no all-to-all anywhere: nothing was sharded


def test_verdict_no_collective_is_not_sharded():
    r = dit_survey.verdict("X", [_rank(0, graphs=[_graph()]), _rank(1, graphs=[_graph()])])
    assert r["status"] == "refused" and "no all-to-all" in r["reason"]
    r = dit_survey.verdict("X", [_rank(0), _rank(1)])
    assert (r["status"], r["reason"]) == ("refused", "no graph reached the backend")


def test_verdict_failures():
    eager = dit_survey.verdict("X", [_rank(0, eager_error="NameError: transforms"), _rank(1, eager_error="NameError: transforms")])
    assert (eager["status"], eager["reason"]) == ("eager-fails", "NameError: transforms")
    rewritten = [_graph(all_to_all=2)]
    crash = dit_survey.verdict("X", [_rank(0, graphs=rewritten, compile_error="RuntimeError: boom"), _rank(1)])
    assert (crash["status"], crash["reason"]) == ("crashed", "RuntimeError: boom")
    assert (crash["graphs"], crash["all_to_all"], crash["max_err"]) == (1, 2, None)  # it crashed after the rewrite
    hung = dit_survey.verdict("X", [_rank(0, phase="compile"), None], timed_out=True, timeout_s=240)
    assert hung["status"] == "crashed"
    assert hung["reason"] == "timed out after 240 s (rank 0: compile, rank 1: not started)"
    log = "[rank1]: Traceback\n[rank1]: torch._dynamo.exc.Unsupported: x\n[rank1]: ValueError: bad split\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    died = dit_survey.verdict("X", [_rank(0), _rank(1, phase="compile")], returncode=1, log_tail=log)
    assert (died["status"], died["reason"]) == ("crashed", "rank 1 died (exit 1): ValueError: bad split")


def test_table_summary_and_write(tmp_path):
    records = [
        dit_survey.verdict("A", [_rank(0, graphs=[_graph(all_to_all=2)]), _rank(1, graphs=[_graph(all_to_all=2)])]),
        dit_survey.verdict("B", [_rank(0, graphs=[_graph(True, "a | b\n\nWhile executing x")]), _rank(1, graphs=[_graph(True, "a | b")])]),
        dit_survey.verdict("C", [_rank(0, compile_error="KeyError: 'x'"), None]),
        dit_survey.verdict("D", [_rank(0, eager_error="E"), _rank(1, eager_error="E")]),
    ]
    assert dit_survey.summary(records) == "1 of 4 sharded, 1 refused, 1 crashed, 1 eager-fails"
    results = {"setup": {"world": 2, "timeout_s": 240, "tolerance": 1e-4, "machine": "m"}, "records": records}
    table = dit_survey.format_table(results, "npu-dit bench dits")
    assert "| B | refused | 1 | 0 | 0.0e+00 | a \\| b |" in table and "While executing" not in table  # first line only
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n")
    dit_survey.write(results, "npu-dit bench dits", str(path))
    dit_survey.write(results, "npu-dit bench dits", str(path))  # replaces its own section
    text = path.read_text()
    assert text.count(dit_survey.MARK_START) == 1 and "| A | sharded |" in text


def test_a_model_over_its_time_limit_is_killed_and_recorded():
    record = dit_survey.survey_one("DiT", world=2, timeout=3)  # the ranks are still importing torch at 3 s
    assert record["status"] == "crashed"
    assert record["reason"].startswith("timed out after 3 s (rank 0: ")
    assert record["seconds"] < 30  # the whole session was killed, not waited for


# diffusers' DiTs sharded through the public call, exact against their eager run: the four the engine
# issue names on 2 and 4 ranks (SD3 and PixArt: patch grids made in the graph; CogView4: RoPE written
# into a slice of q; Wan: a video patch grid and `type_as`), and on 2 ranks the ones that crashed or were
# refused before (LTX-Video: a per-head cross-attention mask; LuminaNextDiT: a pooled mean over the
# caption, so the caption stays whole and the image is sharded; AuraFlow: register tokens next to a grid;
# HunyuanVideo: a mask of ones over the video grid and the text, made in the graph).
# every input stream sharded, none kept whole: LTX-Video's video tokens are F*H*W long, an expression of
# three inputs with no symbol of its own (kept whole before, only its text was sharded)
EVERY_STREAM_SHARDED = {"LTXVideo", "SD3", "Wan"}
DITS_BY_WORLD = {2: ["SD3", "PixArt", "CogView4", "Wan", "LTXVideo", "LuminaNextDiT", "AuraFlow", "HunyuanVideo"],
                 4: ["SD3", "PixArt", "CogView4", "Wan"]}


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("world", [2, 4])
def test_diffusers_dits_are_sharded_and_exact(world, tmp_path):
    from tests.dist_utils import run_ranks
    from tests.dist_workers_dits import diffusers_dits

    records = run_ranks(diffusers_dits, world, tmp_path, timeout=1400, models=DITS_BY_WORLD[world])
    problems = []
    for rank, record in enumerate(records):
        for name, result in record["result"].items():
            if result["fell_back"] or not result["all_to_all"]:
                problems.append(f"{name} rank {rank}: not sharded ({result['fell_back']})")
            if result["error"] > 1e-5:
                problems.append(f"{name} rank {rank}: max abs error {result['error']:.3g}")
            if name in EVERY_STREAM_SHARDED and result["replicated"]:
                problems.append(f"{name} rank {rank}: streams kept whole: {result['replicated']}")
    assert not problems, "\n".join(problems)


# The Ulysses pass on the capture of diffusers DiTs that were refused or failed before (ranks 0 and 1 of 2, in this
# process, no collectives run; `npu-dit bench dits --models ...` checks them against eager on 2 Gloo ranks,
# docs/BENCHMARKS.md): a patch grid whose sizes Dynamo specialised (DiT, CogVideoX, ConsisID: the model compares
# its latent's size with a constant), frames x rows x cols made by nested merges (Allegro), an input laying two
# streams side by side plus attention across text-encoder layers token by token (Krea2), a RoPE table built by
# einsum from positions next to the grid's (ErnieImage). Every node's meta must equal a fresh propagation.
PASS_CHECKED = ["DiT", "CogVideoX", "ConsisID", "Allegro", "Krea2", "ErnieImage"]


@pytest.mark.parametrize("name", PASS_CHECKED)
def test_ulysses_pass_shards_diffusers_dit(name):
    import functools
    import warnings

    from npu_dit.passes.analysis.fake_prop import meta_mismatches
    from npu_dit.passes.infra import PassSpec, run_passes
    from npu_dit.passes.scalar_inputs import scalar_inputs_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.runtime.dist import inspection_context
    from npu_dit.tools.capture import capture_graph

    entry = get_entry(name)
    captured = capture_graph(entry.build(), entry.example_inputs(), dynamic=True)
    for rank in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a refusal warns: fail on it with its reason
            gm, report = run_passes(captured.gm, [
                PassSpec("scalar_inputs", scalar_inputs_pass),
                PassSpec("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, rank)))])
        assert not report.fell_back, report.fallback_reason
        assert report.counts.get("all_to_all", 0) >= 4  # q, k, v and the output of at least one site
        # every rank's share is a symbol of its own (the chunk lengths are kept by every propagation), so a
        # fresh propagation agrees on rank 0 too (it once read tensor_split's (s + 1)//2 by the example's parity)
        assert meta_mismatches(gm) == [], rank


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stream_whose_length_is_an_expression_is_sharded(rank, monkeypatch):
    """LTX-Video's `hidden_states` carry F*H*W tokens, and Dynamo writes their length through the frames,
    height and width inputs (`s51*s81*s98`), with no symbol of its own. The stream is sharded with that
    expression as its length (the global length in the RoPE table built from those inputs, this rank's share
    in its tokens), not kept whole as before ("not a plain symbol"); strict mode agrees with the recorded
    shapes. `test_diffusers_dits_are_sharded_and_exact[2]` runs it on 2 Gloo ranks against eager."""
    import functools

    import sympy

    from npu_dit.passes.analysis.fake_prop import meta_mismatches
    from npu_dit.passes.infra import PassSpec, run_passes
    from npu_dit.passes.scalar_inputs import scalar_inputs_pass
    from npu_dit.passes.ulysses import ulysses_pass
    from npu_dit.plans import SHARDING_META_KEY
    from npu_dit.runtime.dist import inspection_context
    from npu_dit.tools.capture import capture_graph

    monkeypatch.setenv("NPU_DIT_LINT", "1")
    entry = get_entry("LTXVideo")
    captured = capture_graph(entry.build(), entry.example_inputs(), dynamic=True)
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    gm, report = run_passes(captured.gm, [
        PassSpec("scalar_inputs", scalar_inputs_pass),
        PassSpec("ulysses", functools.partial(ulysses_pass, ctx=inspection_context(2, rank)), changes_shapes=True)])
    assert not report.fell_back, report.fallback_reason
    [video] = [s for s in gm.meta[SHARDING_META_KEY].streams
               if any(placeholders[i].name.endswith("hidden_states_") and "encoder" not in placeholders[i].name
                      for i, _ in s.inputs)]
    assert video.sharded, video.reason
    [length] = video.lengths
    assert isinstance(length, sympy.Mul) and len(length.free_symbols) == 3 and not video.symbols
    assert meta_mismatches(gm) == []


def test_only_a_count_of_tokens_is_a_stream_length():
    """The expressions a stream may take as its length: products of input symbols and sums of them (grids);
    not a difference or a constant term (Lumina2 pads its caption to `80 - s29`: sharding that stream
    failed in the pass), not a floor division."""
    import sympy

    from npu_dit.passes.ulysses_plan import _length_expression
    from npu_dit.plans import Stream

    f, h, w, s = sympy.symbols("f h w s", integer=True, positive=True)
    alone = Stream(0, (0,), [], True, "", frozenset(), None)
    assert all(_length_expression(e, alone) for e in (f * h * w, f * h + w * s, 2 * h * w))
    assert not any(_length_expression(e, alone) for e in (80 - s, h - w, h + 1, (h // 2) * w, s))
    with_symbol = Stream(0, (0,), [], True, "", frozenset({s}), None)
    assert not _length_expression(f * h * w, with_symbol)  # a plain symbol already names its length
