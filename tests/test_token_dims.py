import pytest

from npu_dit.errors import Refusal
import torch

from npu_dit.passes.analysis import attention_sites, require_dynamic_token_dims, token_dims
from npu_dit.passes.infra import UserError
from npu_dit.tools.capture import capture_graph, prepare_meta
from tests.conftest import tiny_model_and_inputs


def dims(entries):
    return {(t.name, t.dim) for t in entries}


def test_flux_token_dims_match_diffusers_cp_plan(tiny_capture):
    _, _, cap = tiny_capture("flux")
    tokens = token_dims(cap.gm)
    # diffusers' hand-written FluxTransformer2DModel._cp_plan, found without being told
    assert dims(tokens.inputs) == {("hidden_states", 1), ("encoder_hidden_states", 1), ("img_ids", 0), ("txt_ids", 0)}
    assert dims(tokens.outputs) == {("output[0]", 1)}
    assert all(t.dynamic for t in tokens.inputs) and tokens.built == []
    by_name = {t.name: t for t in tokens.inputs}
    image, text = by_name["hidden_states"].segments, by_name["encoder_hidden_states"].segments
    assert by_name["img_ids"].segments == image and by_name["txt_ids"].segments == text
    # every site attends over text then image: s_txt + s_img
    for site in tokens.attention:
        assert site.query_segments == text + image and site.key_segments == text + image
        assert str(site.size) == f"{by_name['encoder_hidden_states'].size} + {by_name['hidden_states'].size}"
    assert len(tokens.attention) == len(attention_sites(cap.gm))


def test_qwen_edit_token_dims_include_rope_tables_built_in_the_graph(tiny_capture):
    _, _, cap = tiny_capture("qwen-edit")
    tokens = token_dims(cap.gm)
    assert dims(tokens.inputs) == {("hidden_states", 1), ("encoder_hidden_states", 1)}
    image = next(t for t in tokens.inputs if t.name == "hidden_states")
    assert len(image.segments) == 2  # target latents + the input image's latents
    built = {t.name for t in tokens.built}
    assert {"pos_embed: freqs", "pos_embed: freqs_1", "pos_embed: txt_freqs"} <= built
    rope = [t for t in tokens.built if t.name.startswith("pos_embed: freqs")]
    assert sorted(t.segments for t in rope) == sorted((s,) for s in image.segments)
    assert dims(tokens.outputs) == {("output[0]", 1)}


def test_qwen_static_text_length_is_reported_as_static_with_the_mask(tiny_capture):
    _, _, cap = tiny_capture("qwen-edit-masked")
    tokens = token_dims(cap.gm)
    assert dims(tokens.inputs) == {("hidden_states", 1), ("encoder_hidden_states", 1), ("encoder_hidden_states_mask", 1)}
    static = {t.name for t in tokens.static_inputs}
    assert static == {"encoder_hidden_states", "encoder_hidden_states_mask"}
    assert {t.name for t in tokens.dynamic_inputs} == {"hidden_states"}
    text = next(t for t in tokens.inputs if t.name == "encoder_hidden_states")
    mask = next(t for t in tokens.inputs if t.name == "encoder_hidden_states_mask")
    assert mask.segments == text.segments and str(text.size) == "12"
    assert any(t.name.endswith("image_mask") for t in tokens.built)  # the all-ones image part of the mask


def test_edit_2509_images_of_different_sizes_are_separate_segments(tiny_capture):
    _, _, cap = tiny_capture("qwen-edit-2509")
    tokens = token_dims(cap.gm)
    image = next(t for t in tokens.inputs if t.name == "hidden_states")
    assert len(image.segments) == 3
    hints = [tokens.segments[s].hint for s in image.segments]
    assert hints == [64, 64, 24]  # 128x128 target, 128x128 and 64x96 input images


def test_flux_token_permutation_equivariance():
    """Numerics: permuting the image tokens of every inferred image token dim permutes the output's
    inferred token dim the same way; permuting the text tokens leaves the output unchanged."""
    _, model, inputs = tiny_model_and_inputs("flux")
    perm_img = torch.randperm(inputs["hidden_states"].shape[1], generator=torch.Generator().manual_seed(1))
    perm_txt = torch.randperm(inputs["encoder_hidden_states"].shape[1], generator=torch.Generator().manual_seed(2))
    cap = capture_graph(model, inputs)
    tokens = token_dims(cap.gm)
    image_seg = next(t for t in tokens.inputs if t.name == "hidden_states").segments

    def permuted(perm_for):
        out = dict(inputs)
        for t in tokens.inputs:
            perm = perm_for(t.segments)
            out[t.name] = inputs[t.name].index_select(t.dim, perm)
        return out

    with torch.no_grad():
        base = model(**inputs)[0]
        shuffled = model(**permuted(lambda seg: perm_img if seg == image_seg else torch.arange(len(perm_txt))))[0]
        text_shuffled = model(**permuted(lambda seg: perm_txt if seg != image_seg else torch.arange(len(perm_img))))[0]
    out_dim = tokens.outputs[0].dim
    torch.testing.assert_close(shuffled, base.index_select(out_dim, perm_img), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_shuffled, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "key, change, recompiles",
    [
        ("flux", dict(height=96), False),  # image tokens: dynamic
        ("flux", dict(prompt_len=7), False),  # text tokens: dynamic
        ("qwen-edit-masked", dict(height=96), False),  # image tokens: dynamic
        ("qwen-edit-masked", dict(prompt_len=9), True),  # text tokens: static (specialised)
    ],
)
def test_dynamic_token_dims_vary_without_recompiling_static_ones_do_not(key, change, recompiles):
    _, model, inputs = tiny_model_and_inputs(key)
    _, _, changed = tiny_model_and_inputs(key, **change)
    graphs = []

    def record(gm, example_inputs):
        prepare_meta(gm)
        graphs.append(gm)
        return gm.forward

    # trace exactly as backend="npu_dit" does (its tracing context: no duck shaping)
    from npu_dit import tracing

    tracing.install()
    record.backend_ctx_ctor = tracing.backend_tracing_context
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, dynamic=True)
    with torch.no_grad():
        compiled(**inputs)
        out = compiled(**changed)[0]
        expected = model(**changed)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (len(graphs) > 1) == recompiles
    # the analysis of the first graph predicted it
    changed_input = "hidden_states" if "height" in change else "encoder_hidden_states"
    tokens = token_dims(graphs[0])
    assert next(t for t in tokens.inputs if t.name == changed_input).dynamic == (not recompiles)


def test_static_token_dims_are_a_refusal_that_names_the_fix():
    _, model, inputs = tiny_model_and_inputs("flux")
    cap = capture_graph(model, inputs, dynamic=False)
    tokens = token_dims(cap.gm)
    assert dims(tokens.inputs) == {("hidden_states", 1), ("encoder_hidden_states", 1), ("img_ids", 0), ("txt_ids", 0)}
    assert not any(t.dynamic for t in tokens.inputs)
    with pytest.raises(Refusal, match=r"Pass dynamic=True to torch.compile"):
        require_dynamic_token_dims(tokens, "Ulysses sequence parallelism")
    require_dynamic_token_dims(token_dims(capture_graph(model, inputs).gm), "Ulysses")  # dynamic: fine


def _patch_tokens(**kwargs):
    from tests.synthetic import PatchDiT

    torch.manual_seed(0)
    model = PatchDiT(**kwargs).eval()
    cap = capture_graph(model, model.example_inputs(1, 10, 8))
    return cap, token_dims(cap.gm)


def test_tokens_of_a_patch_embedding_convolution_are_a_patch_grid_of_the_latent():
    _, tokens = _patch_tokens()
    assert tokens.inputs == []  # no input carries a token dim: the sequence is made in the graph
    (segment,) = tokens.segments
    grid = tokens.grids[segment.id]
    assert (grid.input_name, grid.row_dim, grid.col_dim, grid.patch) == ("latent", 2, 3, (2, 2))
    # the learned table cropped to the patch grid carries the same tokens
    assert any(t.segments == (segment.id,) and t.dim == 1 for t in tokens.built if t.name != "flatten")


def test_tokens_of_a_reshape_permute_patchify_are_a_patch_grid_of_the_latent():
    """`latent.reshape(B, C, H//p, p, W//p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h*w, C*p*p)`:
    Dynamo records the p dims as `H//(H//p)`; the split of H is proven from its guards
    (H % (H//p) == 0, H//(H//p) == p), so h is a dim of whole patches of the latent's dim 2."""
    cap, tokens = _patch_tokens(patchify="reshape")
    assert tokens.inputs == []
    (segment,) = tokens.segments
    grid = tokens.grids[segment.id]
    assert (grid.input_name, grid.row_dim, grid.col_dim, grid.patch) == ("latent", 2, 3, (2, 2))
    # the unpatchify reshape splits the tokens back into the patchify's own patch rows and columns
    reshapes = [n for n in cap.gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    patchify, unpatchify = reshapes[0], reshapes[-2]  # [B, C, h, p, w, p] and [B, h, w, p, p, C]
    assert tokens.flow.seq(unpatchify, 1) == tokens.flow.seq(patchify, 2) is not None
    assert tokens.flow.seq(unpatchify, 2) == tokens.flow.seq(patchify, 4) is not None


def test_an_overlapping_patch_convolution_is_no_patch_grid_and_mixes_rows():
    cap, tokens = _patch_tokens(kernel=3)
    assert tokens.grids == {}
    conv = next(n for n in cap.gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    assert sorted(d for _, d in tokens.flow.mixing[conv]) == [1, 2, 3]


def test_sd3_image_tokens_are_a_patch_grid_of_hidden_states():
    from tests.synthetic import tiny_sd3

    model, inputs = tiny_sd3(12, 8)
    tokens = token_dims(capture_graph(model, inputs).gm)
    assert dims(tokens.inputs) == {("encoder_hidden_states", 1)}
    (grid,) = tokens.grids.values()
    assert (grid.input_name, grid.row_dim, grid.col_dim, grid.patch) == ("hidden_states", 2, 3, (2, 2))
    # the cropped pos_embed table is a token dim of the same segment
    assert any(t.segments == (grid.segment,) and t.name.startswith("pos_embed") and t.dim == 1 for t in tokens.built)
