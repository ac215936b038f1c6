"""Attention lowering: the NPU reference ops against SDPA (property test), the structure of lowered graphs
(no permutes around the kernel or the all-to-all), numerics through the backend (eager, Inductor, Ulysses
on 2 Gloo ranks), kernel selection and its refusals, and what `npu-dit inspect` reports."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from npu_dit.backend import RECORDS
from npu_dit.config import CompileConfig
from npu_dit.passes.analysis import attention_sites, token_dims
from npu_dit.passes.analysis.attention_calls import CallInfo, Environment
from npu_dit.passes.analysis.attention_ops import is_sdpa
from npu_dit.passes.attention_kernels import default_registry
from npu_dit.passes.attention_lowering import KERNELS_META_KEY, attention_lowering_pass
from npu_dit.passes.infra import UserError, clone_graph_module, run_passes
from npu_dit.passes.pipeline import build_pipeline
from npu_dit.runtime.dist import inspection_context
from npu_dit.runtime.npu_attention import fused_infer_attention_op, fusion_attention_op
from npu_dit.tools.capture import capture_graph
from npu_dit.tools.cli import main as cli_main
from tests.conftest import tiny_model_and_inputs
from tests.dist_utils import run_ranks
from tests.dist_workers_lowering import run_lowering_cases, transposes_around_collectives

FIA = fused_infer_attention_op(reference=True)
FA = fusion_attention_op(reference=True)
NPU_OPS = {"npu_fia": FIA, "npu_fa": FA}


def lower(gm: fx.GraphModule, backend: str, **options) -> fx.GraphModule:
    cfg = CompileConfig.from_options({"attention_backend": backend, **options})
    result = attention_lowering_pass(gm, cfg=cfg)
    gm.graph.lint()
    gm.recompile()
    return result


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is target]


def swaps(gm: fx.GraphModule) -> int:
    """permute(0, 2, 1, 3) / transpose(1, 2) nodes: BSND <-> BNSD."""
    from npu_dit.passes.analysis.attention_layout import is_swap12

    return sum(is_swap12(n) for n in gm.graph.nodes)


# --- (a) property test: one SDPA call, lowered through each reference op, against SDPA --------------


class OneAttention(torch.nn.Module):
    """SDPA on q/k/v given as [B, S, N, D] (permuted to BNSD, as Dynamo captures) or directly as BNSD."""

    def __init__(self, permuted: bool, **sdpa_kwargs) -> None:
        super().__init__()
        self.permuted, self.sdpa_kwargs = permuted, sdpa_kwargs

    def forward(self, q, k, v, mask):
        if self.permuted:
            q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa_kwargs)
        return out.permute(0, 2, 1, 3).flatten(2)


def traced(module: torch.nn.Module, *inputs) -> fx.GraphModule:
    """An FX graph with meta["val"] (fake values) as the backend would see it, without Dynamo."""
    gm = fx.symbolic_trace(module)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t
                                         for t in inputs])
    return gm


@st.composite
def attention_problems(draw):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.sampled_from([1, 1, 2]))  # GQA sometimes
    head_dim = draw(st.sampled_from([4, 8, 16, 24, 40, 64]))
    q_len = draw(st.integers(2, 40))  # length 1 is the incremental branch, refused by npu_fia
    kv_len = draw(st.integers(1, 40))
    mask_shape = draw(st.sampled_from([None, "B11K", "B1QK", "11QK", "QK"]))
    permuted = draw(st.booleans())  # BSND (permuted inputs) or BNSD (the tensors as they are)
    seed = draw(st.integers(0, 2**16))
    return batch, heads, kv_heads, head_dim, q_len, kv_len, mask_shape, permuted, seed


def problem_inputs(batch, heads, kv_heads, head_dim, q_len, kv_len, mask_shape, permuted, seed):
    g = torch.Generator().manual_seed(seed)
    shape_q = (batch, q_len, heads, head_dim) if permuted else (batch, heads, q_len, head_dim)
    shape_kv = (batch, kv_len, kv_heads, head_dim) if permuted else (batch, kv_heads, kv_len, head_dim)
    q, k, v = torch.randn(shape_q, generator=g), torch.randn(shape_kv, generator=g), torch.randn(shape_kv, generator=g)
    shapes = {"B11K": (batch, 1, 1, kv_len), "B1QK": (batch, 1, q_len, kv_len), "11QK": (1, 1, q_len, kv_len),
              "QK": (q_len, kv_len)}
    # some rows fully masked: SDPA gives 0 there, as the NPU ops do with invalid-row correction
    mask = None if mask_shape is None else torch.rand(shapes[mask_shape], generator=g) > 0.4
    return q, k, v, mask


MAX_ERRORS: dict[str, float] = {}


@pytest.mark.parametrize("backend", ["npu_fia", "npu_fa"])
def test_reference_ops_match_sdpa_on_drawn_problems(backend):
    op = NPU_OPS[backend]

    @settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(attention_problems())
    def check(problem):
        *_, permuted, _ = problem
        q, k, v, mask = problem_inputs(*problem)
        model = OneAttention(permuted, enable_gqa=problem[1] != problem[2])
        gm = traced(model, q, k, v, mask)
        result = lower(gm, backend)
        assert result.counts[backend] == 1 and len(calls(gm, op)) == 1 and not any(is_sdpa(n) for n in gm.graph.nodes)
        (node,) = calls(gm, op)
        assert node.meta["npu_dit.attention_layout"] == ("BSND" if permuted else "BNSD")
        if permuted:
            assert swaps(gm) == 0  # neither the input permutes nor the output permute are left
        with torch.no_grad():
            err = (gm(q, k, v, mask) - model(q, k, v, mask)).abs().max().item()
        MAX_ERRORS[backend] = max(MAX_ERRORS.get(backend, 0.0), err)
        assert err <= 1e-5, (problem, err)

    check()
    print(f"\n{backend}: max abs error vs SDPA over the drawn problems: {MAX_ERRORS[backend]:.2e}")


def test_reference_ops_follow_the_schemas():
    """Beyond what the lowering emits: BSH layout, a (B, Sq, Skv) mask, the default scale 1.0,
    softmax_lse / softmax_max+sum, and a clear error for the parts of the schema not implemented."""
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)  # BNSD
    keep = torch.rand(2, 5, 7) > 0.3
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], scale=1.0)
    bsh = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]
    out, lse = FIA(*bsh, atten_mask=~keep, num_heads=3, input_layout="BSH", inner_precise=2, softmax_lse_flag=True)
    torch.testing.assert_close(out.unflatten(-1, (3, 8)).transpose(1, 2), expected, atol=1e-5, rtol=0)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~keep[:, None], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1, keepdim=True), atol=1e-5, rtol=0)
    out, softmax_max, softmax_sum, softmax_out, *ints = FA(q, k, v, 3, "BNSD", atten_mask=(~keep)[:, None].expand(2, 1, 5, 7))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert softmax_max.shape == softmax_sum.shape == (2, 3, 5, 8) and softmax_out.numel() == 0 and ints == [0, 0, 0]
    with pytest.raises(NotImplementedError, match="'pse_shift' is not implemented by the reference op"):
        FIA(q, k, v, pse_shift=torch.zeros(1), num_heads=3, input_layout="BNSD")
    with pytest.raises(ValueError, match="num_heads=4 does not match"):
        FIA(q, k, v, num_heads=4, input_layout="BNSD")


def test_per_head_mask_goes_to_npu_fa_not_npu_fia():
    q, k, v = torch.randn(2, 9, 3, 8), torch.randn(2, 11, 3, 8), torch.randn(2, 11, 3, 8)
    mask = torch.rand(1, 3, 9, 11) > 0.3  # a head axis: npu_fa takes it (as BNSS), npu_fia does not
    model = OneAttention(True)
    with pytest.raises(UserError, match=r"per-head mask"):
        lower(traced(model, q, k, v, mask), "npu_fia")
    gm = traced(model, q, k, v, mask)
    lower(gm, "npu_fa")
    torch.testing.assert_close(gm(q, k, v, mask), model(q, k, v, mask), atol=1e-5, rtol=0)


# --- (b) structure on tiny FLUX -----------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_lowered(tiny_capture):
    _, _, cap = tiny_capture("flux")
    cfg = CompileConfig.from_options({"attention_backend": "npu_fia"})
    gm, report = run_passes(cap.gm, build_pipeline(cfg))
    assert not report.fell_back, report.fallback_reason
    return cap.gm, gm, report


def test_flux_structure_every_sdpa_becomes_npu_fia_in_bsnd(flux_lowered):
    captured, gm, report = flux_lowered
    assert [r.name for r in report.records] == ["scalar_inputs", "attention_lowering"]
    assert not any(is_sdpa(n) for n in gm.graph.nodes)
    lowered = calls(gm, FIA)
    assert len(lowered) == 4 and report.counts["npu_fia"] == 4
    # 3 input permutes and 1 output permute per site are gone; no other permute was added
    assert swaps(captured) - swaps(gm) == 16 == report.counts["permutes_removed"]
    for node in lowered:
        kw = node.kwargs
        assert kw["input_layout"] == "BSND" and node.meta["npu_dit.attention_layout"] == "BSND"
        assert kw["num_heads"] == 4 and kw["scale"] == pytest.approx(16 ** -0.5) and "atten_mask" not in kw
        # before: permute -> sdpa -> permute -> flatten; after: contiguous -> npu_fia -> [0] -> flatten
        assert [a.target for a in node.args[:3]] == ["contiguous"] * 3
        assert all(a.args[0].target not in ("permute", "transpose") for a in node.args[:3])
        (out,) = node.users
        assert [u.target for u in out.users] == ["flatten"]
        assert tuple(out.meta["val"].shape[2:]) == (4, 16)  # [B, S, N, D]


def test_flux_analyses_still_see_the_lowered_sites(flux_lowered):
    captured, gm, _ = flux_lowered
    before, after = attention_sites(captured), attention_sites(gm)
    assert [s.summary() for s in before] == [s.summary() for s in after]  # heads from the BSND axis
    assert token_dims(gm).summary()["inputs"] == token_dims(captured).summary()["inputs"]
    assert gm.meta[KERNELS_META_KEY][0]["kernel"] == "npu_fia" and gm.meta[KERNELS_META_KEY][0]["reference"]


# --- (c) numerics through the backend; (f) Inductor traces the reference ops ----------------------


def compiled_output(key, options, **overrides):
    _, model, inputs = tiny_model_and_inputs(key, **overrides)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
    with torch.no_grad():
        expected = model(**inputs)[0]
        actual = compiled(**inputs)[0]
    return actual, expected, RECORDS[-1]


@pytest.mark.parametrize("key", ["flux", "qwen-edit-masked"])
@pytest.mark.parametrize("backend", ["npu_fia", "npu_fa"])
def test_compiled_model_matches_eager(key, backend):
    actual, expected, record = compiled_output(key, {"attention_backend": backend})
    assert not record.report.fell_back, record.report.fallback_reason
    assert record.report.counts[backend] == record.report.counts["lowered"] == (4 if key == "flux" else 3)
    assert len(calls(record.graph, NPU_OPS[backend])) == record.report.counts[backend]
    assert (actual - expected).abs().max().item() <= 1e-5


def test_inductor_traces_the_reference_ops():
    actual, expected, record = compiled_output("flux", {"attention_backend": "npu_fia", "inner_compiler": "inductor"})
    assert not record.report.fell_back and record.report.counts["npu_fia"] == 4
    assert (actual - expected).abs().max().item() <= 1e-5


def test_npugraph_ex_without_torch_npu_is_a_clear_error():
    from npu_dit.runtime.npu_attention import torch_npu_available

    if torch_npu_available():
        pytest.skip("torch_npu is installed here")
    with pytest.raises(Exception) as info:
        compiled_output("flux", {"attention_backend": "npu_fia", "inner_compiler": "npugraph_ex"})
    message = str(info.value)
    assert "needs torch_npu" in message and "inner_compiler='eager' or 'inductor'" in message


# --- (d) where the lowering must not fire, or must refuse -----------------------------------------


def test_auto_on_cpu_keeps_sdpa_bitwise(tiny_capture):
    assert build_pipeline(CompileConfig.from_options({"attention_backend": "auto"})) == []
    actual, expected, record = compiled_output("qwen-edit-masked", {"attention_backend": "auto"})
    assert torch.equal(actual, expected) and record.report.records == []
    # and the pass itself, run anyway, changes nothing: every site keeps SDPA, with the reasons why
    _, _, cap = tiny_capture("flux")
    gm = clone_graph_module(cap.gm)
    code = gm.code
    result = lower(gm, "auto")
    assert not result.modified and gm.code == code
    assert {s["kernel"] for s in gm.meta[KERNELS_META_KEY]} == {"sdpa"}
    refused = gm.meta[KERNELS_META_KEY][0]["refused"]
    assert refused["npu_fia"] == "torch_npu not available" and "needs a CUDA tensor" in refused["flash"]


def test_forcing_flash_on_cpu_is_a_clear_error():
    with pytest.raises(Exception) as info:
        compiled_output("flux", {"attention_backend": "flash"})
    message = str(info.value)
    assert "attention_backend='flash' cannot lower attention site 0 (transformer_blocks.0.attn)" in message
    assert "needs a CUDA tensor, this call is on cpu" in message and "sdpa, math" in message


@pytest.mark.parametrize(
    "sdpa_kwargs, mask, reason",
    [
        ({"is_causal": True}, None, "is_causal=True"),
        ({"dropout_p": 0.1}, None, "dropout_p=0.1"),
        ({}, "float", "additive float mask"),
    ],
)
@pytest.mark.parametrize("backend", ["npu_fia", "npu_fa"])
def test_npu_kernels_refuse_what_they_cannot_compute(sdpa_kwargs, mask, reason, backend):
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    attn_mask = torch.zeros(1, 1, 6, 6) if mask == "float" else None
    model = OneAttention(True, **sdpa_kwargs)
    gm = traced(model, q, k, v, attn_mask)
    with pytest.raises(UserError, match=f"cannot lower attention site 0 .*{reason}"):
        lower(gm, backend)
    result = lower(traced(model, q, k, v, attn_mask), "auto")  # auto keeps such a call as SDPA
    assert not result.modified and result.graph_module.meta[KERNELS_META_KEY][0]["kernel"] == "sdpa"


def call_on(device: str, dtype=torch.float16, *, heads=24, kv_heads=24, head_dim=128, mask=None, env=None, **kw):
    return CallInfo(
        index=0, module="transformer_blocks.0.attn", device_type=device, dtype=dtype,
        q_shape=(1, heads, 4608, head_dim), k_shape=(1, kv_heads, 4608, head_dim), v_shape=(1, kv_heads, 4608, head_dim),
        mask=mask, mask_shape=None if mask is None else (1, 1, 1, 4608), is_causal=kw.pop("is_causal", False),
        dropout_p=kw.pop("dropout_p", 0.0), scale=head_dim ** -0.5, enable_gqa=heads != kv_heads, bsnd=True,
        env=env or Environment(torch_npu=device == "npu", cuda=device == "cuda", graph_mode=False), **kw,
    )


@pytest.mark.parametrize(
    "call, chosen, refused",
    [
        # an NPU: npu_fia first; float32 is npu_fa's only; graph mode has no npu_fa
        (call_on("npu", torch.bfloat16), "npu_fia", {}),
        (call_on("npu", torch.float32), "npu_fa", {"npu_fia": "dtype float32 (npu_fia takes float16/bfloat16)"}),
        (call_on("npu", torch.float32, env=Environment(True, False, graph_mode=True)), "sdpa",
         {"npu_fa": "npu_fusion_attention has no graph mode (npu_fia serves npugraph_ex)"}),
        (call_on("npu", head_dim=72), "npu_fa", {"npu_fia": "head dim 72 is not a multiple of 16 (float16/bfloat16 alignment)"}),
        (call_on("npu", is_causal=True), "sdpa", {"npu_fia": "is_causal=True (causal sparse modes are not lowered; DiT attention is bidirectional)"}),
        # a CUDA GPU: flash, then cuDNN, then the memory-efficient kernel
        (call_on("cuda"), "flash", {"npu_fia": "torch_npu not available"}),
        (call_on("cuda", mask="bool"), "efficient", {"flash": "attn_mask (flash takes no mask)", "cudnn": "attn_mask (not lowered to cuDNN)"}),
        (call_on("cuda", head_dim=264), "efficient", {"flash": "head dim 264 (at most 256)", "cudnn": "head dim 264 (at most 128)"}),
        (call_on("cuda", torch.float32), "efficient", {"flash": "dtype float32 (flash takes float16/bfloat16)"}),
        (call_on("cuda", torch.float32, kv_heads=8), "sdpa", {"efficient": "grouped-query attention (the memory-efficient kernel has none)"}),
        (call_on("cuda", kv_heads=8), "flash", {"cudnn": "grouped-query attention (not lowered to cuDNN)"}),
    ],
    ids=["npu-bf16", "npu-fp32", "npu-graph-fp32", "npu-d72", "npu-causal", "cuda", "cuda-mask", "cuda-d264",
         "cuda-fp32", "cuda-fp32-gqa", "cuda-gqa"],
)
def test_auto_picks_the_first_kernel_whose_checker_accepts(call, chosen, refused):
    choice = default_registry().select(call, "auto")
    assert choice.kernel == chosen, choice.describe()
    for name, reason in refused.items():
        assert choice.refused.get(name) == reason if reason else name not in choice.refused, choice.describe()


def test_reference_ops_only_when_forced_without_torch_npu():
    registry = default_registry()
    cpu = call_on("cpu", torch.float32, env=Environment(torch_npu=False, cuda=False, graph_mode=False))
    assert registry.select(cpu, "auto").kernel == "sdpa"
    forced = registry.select(cpu, "npu_fia")
    assert forced.kernel == "npu_fia" and forced.reference and "reference op" in forced.describe()
    # with torch_npu present, CPU tensors are an error, not a reason to run the reference
    with_npu = dataclasses.replace(cpu, env=Environment(torch_npu=True, cuda=False, graph_mode=False))
    refused = registry.select(with_npu, "npu_fia")
    assert refused.kernel is None and refused.refused["npu_fia"] == "tensors on cpu, not on an NPU"


# --- (e) Ulysses on 2 Gloo ranks ------------------------------------------------------------------

UNEVEN = dict(height=112, width=80, prompt_len=7)  # 35 image tokens, 7 text tokens
DIST_CASES = [
    ("flux-fia", "flux", {}, {}, {"attention_backend": "npu_fia"}),
    ("flux-uneven-3-heads-async-fa", "flux", UNEVEN, {"num_attention_heads": 3}, {"attention_backend": "npu_fa", "async_ulysses": True}),
    ("qwen-static-text-mask-fia", "qwen-edit-masked", UNEVEN, {}, {"attention_backend": "npu_fia", "async_ulysses": True}),
]


def test_ulysses_with_npu_fia_matches_the_serial_sdpa_run(tmp_path):
    records = run_ranks(run_lowering_cases, 2, tmp_path, timeout=600, cases=DIST_CASES)
    for name, key, overrides, config_overrides, options in DIST_CASES:
        _, model, inputs = tiny_model_and_inputs(key, config_overrides=config_overrides, **overrides)
        with torch.no_grad():
            expected = model(**inputs)[0]
        for rank, record in enumerate(records):
            out, counts, fell_back, reason, (permutes, crossed) = record["result"][name]
            assert not fell_back, (name, reason)
            assert counts["lowered"] == counts["attention_sites"] and counts["all_to_all"] > 0, counts
            assert permutes == [] and crossed > 0, (name, permutes)
            err = (out - expected).abs().max().item()
            assert err <= 1e-5, (name, rank, err)


@pytest.mark.parametrize("key, async_", [("flux", False), ("qwen-edit-masked", True)])
def test_ulysses_structure_no_transpose_around_the_all_to_all(key, async_):
    _, model, inputs = tiny_model_and_inputs(key)
    cap = capture_graph(model, inputs)
    cfg = CompileConfig.from_options({"ulysses_degree": 2, "async_ulysses": async_, "attention_backend": "npu_fia"})
    specs = build_pipeline(cfg, inspection_context(2, 0))
    names = [s.name for s in specs]
    lowering = names.index("attention_lowering")
    # sync Ulysses then sends Q, K and V in one all-to-all per site (the lowering saw them apart)
    assert names[lowering + 1:] == ([] if async_ else ["fuse_qkv"])
    sharded, _ = run_passes(cap.gm, specs[:lowering])
    lowered, report = run_passes(cap.gm, specs)
    assert not report.fell_back, report.fallback_reason
    sites = report.counts["attention_sites"]
    before, crossed_before = transposes_around_collectives(sharded)
    after, crossed_after = transposes_around_collectives(lowered)
    assert len(before) == 4 * sites  # the check sees Ulysses' q/k/v and output permutes ...
    assert after == [] and crossed_after == crossed_before > 0  # ... and none after lowering
    assert report.counts["permutes_removed"] == 4 * sites
    for node in calls(lowered, FIA):
        assert node.kwargs["input_layout"] == "BSND" and node.kwargs["num_heads"] == 2  # 4 heads / 2 ranks
    # the kernel is fed straight from the all-to-all: wait(start(..., seq_dim=1, head_dim=2)) -> contiguous
    from npu_dit.runtime import collectives as C

    waits = calls(lowered, C.seq_to_heads_wait) + calls(lowered, C.seq_to_heads_qkv_wait)
    assert waits and all(w.args[1:] == (1, 2) for w in waits)
    if not async_:
        assert len(calls(lowered, C.seq_to_heads_qkv_wait)) == sites and not calls(lowered, C.seq_to_heads_wait)
    assert all(s.args[1:3] == (1, 2) for s in calls(lowered, C.heads_to_seq_start))


# --- (6) inspect reports the kernel of each site and why the others refused -----------------------


def test_inspect_reports_kernels_and_refusals(capsys):
    argv = ["inspect", "flux.1-dev", "--size", "tiny", "--height", "64", "--width", "64", "--prompt-len", "8", "--quiet"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "4 x sdpa [BNSD] (npu_fia: torch_npu not available; npu_fa: torch_npu not available; " \
           "flash: needs a CUDA tensor, this call is on meta" in out
    assert cli_main(argv + ["--attention-backend", "npu_fia", "--ulysses-degree", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kernels = [s["kernel"] for s in report["attention"]["sites"]]
    assert [k["kernel"] for k in kernels] == ["npu_fia"] * 4
    assert all(k["layout"] == "BSND" and k["reference"] for k in kernels)
    assert kernels[0]["refused"]["flash"] == "needs a CUDA tensor, this call is on meta"
    assert report["passes"]["counts"]["permutes_removed"] == 16
