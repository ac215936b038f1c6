"""The six seed models' tiny offline pipelines run end to end (real diffusers/transformers classes,
tokenizers and processor from npu_dit/pipelines/assets), and npu_dit.parallelize in one process gives
the plain pipeline's image."""

import numpy as np
import pytest
import torch

import npu_dit
from npu_dit.models import MODELS, get_model
from npu_dit.pipelines import load_pipeline
from tests.pipeline_cases import HEIGHT, WIDTH, edit_image, generate

_PIPES = {}


def tiny(model):
    if model not in _PIPES:
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[model] = pipe
    return _PIPES[model]


@pytest.mark.parametrize("model", list(MODELS))
def test_tiny_pipeline_end_to_end(model):
    spec = get_model(model)
    pipe = tiny(model)
    assert type(pipe).__name__ == spec.pipeline
    steps = 2  # the fewest the Qwen scheduler takes (its terminal shift divides by the last sigma)
    latents, image = generate(pipe, spec, steps=steps)
    assert image.shape == (1, HEIGHT, WIDTH, 3)
    assert torch.isfinite(image).all() and image.std() > 1e-3  # not a constant (saturated) image
    # the edit pipelines always VAE-encode their input at 1024x1024 (4096 tokens), so they are slow
    # here: their prompt path is tested through encode_prompt below
    if not spec.max_input_images:
        again, _ = generate(pipe, spec, steps=steps)
        assert torch.equal(latents, again)  # seeded: the same generation twice
        other_prompt, _ = generate(pipe, spec, prompt="a dog running on the beach", steps=steps)
        assert (other_prompt - latents).abs().max() > 1e-4  # the prompt reaches the transformer


@pytest.mark.parametrize("model", [m for m in MODELS if get_model(m).max_input_images])
def test_edit_text_encoder_sees_the_input_image(model):
    pipe = tiny(model)
    image_arg = (lambda im: [im]) if get_model(model).max_input_images > 1 else (lambda im: im)
    # the Qwen2.5-VL processor turns the image into <|image_pad|> tokens the vision tower fills in
    a, _ = pipe.encode_prompt("make it blue", image=image_arg(edit_image(0)), device="cpu")
    b, _ = pipe.encode_prompt("make it blue", image=image_arg(edit_image(1)), device="cpu")
    assert a.shape == b.shape and (a - b).abs().max() > 1e-4


def test_edit_2509_text_encoder_sees_three_images():
    pipe = tiny("qwen-image-edit-2509")
    one, _ = pipe.encode_prompt("make it blue", image=[edit_image(0)], device="cpu")
    three, _ = pipe.encode_prompt("make it blue", image=[edit_image(0), edit_image(1, 48), edit_image(2, 80)], device="cpu")
    # "Picture 2: <|vision_start|><|image_pad|>...": each image adds its own tokens to the prompt
    assert three.shape[1] > one.shape[1]


@pytest.mark.parametrize("model", ["flux.1-dev", "qwen-image-edit"])
def test_parallelize_one_process_matches_plain_pipeline(model):
    spec = get_model(model)
    expected_latents, expected_image = generate(tiny(model), spec)
    torch._dynamo.reset()
    pipe = npu_dit.parallelize(load_pipeline(model))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == spec.pipeline  # the wrapper keeps the pipeline's class name
    latents, image = generate(pipe, spec)
    assert (latents - expected_latents).abs().max() <= 1e-5
    assert (image - expected_image).abs().max() <= 1e-5


def test_from_pretrained_local_folder(tmp_path):
    """Users with weights load them with from_pretrained(local dir): round-trip the tiny FLUX pipeline."""
    spec = get_model("flux.1-dev")
    tiny(spec.name).save_pretrained(tmp_path)
    loaded = load_pipeline(spec, weights=tmp_path)
    loaded.set_progress_bar_config(disable=True)
    expected, _ = generate(tiny(spec.name), spec)
    latents, _ = generate(loaded, spec)
    assert torch.equal(latents, expected)
    with pytest.raises(ValueError, match="not a directory"):
        load_pipeline(spec, weights=tmp_path / "missing")


def test_shipped_tokenizers_are_what_the_script_builds(tmp_path):
    from transformers import AutoTokenizer

    from npu_dit.pipelines.tokenizers import asset, write_assets

    write_assets(tmp_path)
    text = "Replace the sky with a rainbow, 4k"
    for name in ("clip_tokenizer", "t5_tokenizer", "qwen2_tokenizer", "qwen2_5_vl_processor"):
        shipped = AutoTokenizer.from_pretrained(asset(name))
        rebuilt = AutoTokenizer.from_pretrained(tmp_path / name)
        # the BPE trainer breaks count ties in no fixed order, so ids may differ between builds;
        # the vocabulary size, the special tokens and the round trip may not
        assert len(shipped) == len(rebuilt), name
        assert shipped.all_special_tokens == rebuilt.all_special_tokens, name
        for tok in (shipped, rebuilt):
            assert tok.decode(tok(text, add_special_tokens=False).input_ids).lower().replace(" ", "") == text.lower().replace(" ", ""), name
    assert np.isscalar(AutoTokenizer.from_pretrained(asset("qwen2_tokenizer")).convert_tokens_to_ids("<|image_pad|>"))


def test_bench_size_pipeline_components_fit_its_transformer(tmp_path):
    """`size="bench"` (npu-dit bench seed): the bench transformer, and text encoder / VAE widths that feed it."""
    spec = get_model("qwen-image-edit")
    pipe = load_pipeline(spec, size="bench")
    cfg = spec.config("bench")
    assert pipe.transformer.config.num_attention_heads == cfg["num_attention_heads"]
    assert pipe.text_encoder.config.text_config.hidden_size == cfg["joint_attention_dim"]
    assert pipe.vae.config.z_dim * 4 == cfg["in_channels"]  # 2x2 packing of the latent channels
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("make it blue", image=edit_image(0), device="cpu")
    assert embeds.shape[-1] == cfg["joint_attention_dim"]
    with pytest.raises(ValueError, match="choose one of tiny, bench"):
        load_pipeline(spec, size="huge")
    with pytest.raises(ValueError, match="pass one or the other"):
        load_pipeline(spec, size="bench", weights=tmp_path)
