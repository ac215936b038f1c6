import inspect

import pytest
import torch

from npu_dit.models import MODELS, build_transformer, count_parameters, get_model


def test_zoo_has_the_six_seed_models_with_their_pipeline_settings():
    table = {name: (s.default_steps, s.true_cfg, s.max_input_images) for name, s in MODELS.items()}
    assert table == {
        "flux.1-dev": (28, False, 0),
        "qwen-image-edit": (50, True, 1),
        "qwen-image-edit-2509": (50, True, 3),
        "qwen-image-lightning": (8, False, 0),
        "qwen-image-edit-lightning": (8, False, 1),
        "qwen-image-edit-2509-lightning": (8, False, 3),
    }
    assert get_model("FLUX").name == "flux.1-dev" and get_model("qwen-edit-2509").name == "qwen-image-edit-2509"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_config_is_the_published_one(name):
    """The published transformer configs equal diffusers' class defaults (FLUX.1-dev with guidance)."""
    import diffusers

    spec = MODELS[name]
    defaults = {
        k: p.default for k, p in inspect.signature(getattr(diffusers, spec.transformer_cls).__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    expected = {k: defaults[k] for k in spec.full_config}
    if spec.transformer_cls == "FluxTransformer2DModel":
        expected["guidance_embeds"] = True
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in spec.full_config.items()} == {
        k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in expected.items()}


@pytest.mark.parametrize("name, billions", [("flux.1-dev", 11.90), ("qwen-image-edit", 20.43)])
def test_full_size_builds_on_the_meta_device(name, billions):
    spec = get_model(name)
    model = build_transformer(spec, spec.config("full"), device="meta", dtype=torch.bfloat16)
    count, nbytes = count_parameters(model)
    assert round(count / 1e9, 2) == billions and nbytes == 2 * count
    assert all(p.device.type == "meta" for p in model.parameters())


def test_example_inputs_follow_the_pipelines():
    flux = get_model("flux.1-dev")
    inputs = flux.example_inputs(flux.config("full"), device="meta", dtype=torch.bfloat16)
    assert inputs["hidden_states"].shape == (1, 4096, 64)
    assert inputs["encoder_hidden_states"].shape == (1, 512, 4096)
    assert inputs["img_ids"].shape == (4096, 3) and inputs["txt_ids"].shape == (512, 3)
    assert flux.example_inputs(flux.config("tiny"), height=64, width=64)["guidance"].tolist() == [3.5]

    edit = get_model("qwen-image-edit")
    inputs = edit.example_inputs(edit.config("full"), prompt_len=77, device="meta")
    assert inputs["hidden_states"].shape == (1, 2 * 4096, 64)  # target + input image latents
    assert inputs["img_shapes"] == [[(1, 64, 64), (1, 64, 64)]]
    assert inputs["encoder_hidden_states"].shape == (1, 77, 3584)
    assert inputs["encoder_hidden_states_mask"] is None  # batch 1: the pipeline drops an all-ones mask

    plus = get_model("qwen-image-edit-2509")
    inputs = plus.example_inputs(plus.config("tiny"), height=512, width=512, prompt_len=20, batch=2,
                                 input_images=[(512, 512), (256, 768), (1024, 512)])
    assert inputs["img_shapes"] == [[(1, 32, 32), (1, 32, 32), (1, 16, 48), (1, 64, 32)]] * 2
    assert inputs["hidden_states"].shape == (2, 1024 + 1024 + 768 + 2048, 16)
    mask = inputs["encoder_hidden_states_mask"]
    assert mask.shape == (2, 20) and mask[0].sum() == 20 and mask[1].sum() == 15  # padded second prompt


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_configs_run(name):
    spec = MODELS[name]
    config = spec.config("tiny")
    model = build_transformer(spec, config)
    inputs = spec.example_inputs(config, height=64, width=64, prompt_len=6)
    with torch.no_grad():
        out = model(**inputs)[0]
    assert out.shape[:2] == inputs["hidden_states"].shape[:2] and torch.isfinite(out).all()


def test_bad_requests_are_clear_errors():
    flux = get_model("flux.1-dev")
    with pytest.raises(ValueError, match="has no 'huge' config; choose one of: full, tiny, bench"):
        flux.config("huge")
    with pytest.raises(ValueError, match="takes at most 3 input image"):
        get_model("qwen-image-edit-2509").example_inputs({}, input_images=[(64, 64)] * 4)
