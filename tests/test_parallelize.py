"""npu_dit.parallelize: every option checked at the call (before any compile), the cache gets each
generation's real step count, and a Lightning LoRA is fused into the transformer's weights."""

import math

import pytest
import torch

import npu_dit
from npu_dit.models import get_model
from npu_dit.pipelines import fuse_lora, load_pipeline
from tests.pipeline_cases import call_kwargs


@pytest.fixture(scope="module")
def flux_pipe_factory():
    return lambda: load_pipeline("flux.1-dev")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"attention_backend": "fastest"}, "attention_backend"),
        ({"inner_compiler": "tvm"}, "inner_compiler"),
        ({"tp_degree": 2}, "torchrun --nproc-per-node 2"),
        ({"tp_degree": 2, "ulysses_degree": 2}, "torchrun --nproc-per-node 4"),
        ({"text_encoder_parallel": "yes"}, "True or False"),
        ({"vae_parallel": "yes"}, "True or False"),
        ({"ulysses_degree": 2}, "torchrun --nproc-per-node 2"),
        ({"async_ulysses": True, "ulysses_degree": 1}, "ulysses_degree"),
        ({"cache": {"Fn_compute_block": 1}}, "Fn_compute_block"),
        ({"cache": "fast"}, "dict of cache settings"),
    ],
)
def test_bad_option_is_a_value_error_before_any_compile(flux_pipe_factory, options, message):
    pipe = flux_pipe_factory()
    transformer = pipe.transformer
    with pytest.raises(ValueError, match=message):
        npu_dit.parallelize(pipe, **options)
    assert pipe.transformer is transformer  # nothing was compiled or replaced
    assert not hasattr(pipe, "_npu_dit_parallel") and type(pipe).__module__.startswith("diffusers")


def test_vae_parallel_compiles_decode_and_encode_over_the_world(flux_pipe_factory, monkeypatch):
    pipe = npu_dit.parallelize(flux_pipe_factory(), vae_parallel=True)  # one process: nothing to shard
    assert "decode" not in vars(pipe.vae) and "encode" not in vars(pipe.vae)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; compiling happens at the first call
    pipe = npu_dit.parallelize(flux_pipe_factory(), vae_parallel=True)
    for name in ("decode", "encode"):
        compiled = vars(pipe.vae)[name]
        assert getattr(compiled, "_torchdynamo_orig_callable", None) is not None, name


def test_not_a_dit_pipeline():
    with pytest.raises(ValueError, match="no `transformer`"):
        npu_dit.parallelize(object())


def test_cache_gets_each_generations_step_count(flux_pipe_factory):
    from npu_dit.runtime.cache import latest

    spec = get_model("flux.1-dev")
    torch._dynamo.reset()
    cache = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.5, "max_warmup_steps": 1, "steps_mask": "fast"}
    pipe = npu_dit.parallelize(flux_pipe_factory(), cache=cache)
    pipe.set_progress_bar_config(disable=True)
    for steps in (6, 4):
        with torch.no_grad():
            pipe(**call_kwargs(spec, steps=steps))
        controller = latest()
        assert controller.cfg.num_inference_steps == steps
        assert len(controller.pattern()) == steps  # one decision per step of this generation


def _lora_file(path, transformer, modules, rank=2, alpha=1.0, style="peft"):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors, expected = {}, {}
    for name in modules:
        linear = dict(transformer.named_modules())[name]
        down = torch.randn(rank, linear.in_features, generator=g) * 0.1
        up = torch.randn(linear.out_features, rank, generator=g) * 0.1
        if style == "peft":
            tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
            expected[name] = up @ down
        else:  # kohya / lightx2v: lora_down / lora_up with alpha
            tensors[f"diffusion_model.{name}.lora_down.weight"], tensors[f"diffusion_model.{name}.lora_up.weight"] = down, up
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
            expected[name] = (alpha / rank) * (up @ down)
    save_file(tensors, str(path))
    return expected


@pytest.mark.parametrize("style", ["peft", "kohya"])
def test_lora_fused_into_lightning_transformer(tmp_path, style):
    spec = get_model("qwen-image-edit-lightning")
    plain = load_pipeline(spec)
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2", "proj_out"]
    expected = _lora_file(tmp_path / "l.safetensors", plain.transformer, modules, alpha=4.0, style=style)
    fused = load_pipeline(spec, lora=tmp_path / "l.safetensors")
    named_plain = dict(plain.transformer.named_parameters())
    for name, param in fused.transformer.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith("weight") and module in expected:
            torch.testing.assert_close(param - named_plain[name], expected[module], rtol=0, atol=1e-6)
        else:
            assert torch.equal(param, named_plain[name]), name
    # Lightning scheduler settings: a constant shift of log(3)
    assert math.isclose(fused.scheduler.config.base_shift, math.log(3))
    assert math.isclose(fused.scheduler.config.max_shift, math.log(3))


def test_lora_for_another_model_is_refused(tmp_path):
    spec = get_model("qwen-image-lightning")
    flux = load_pipeline("flux.1-dev")
    _lora_file(tmp_path / "flux.safetensors", flux.transformer, ["single_transformer_blocks.0.proj_mlp"])
    with pytest.raises(ValueError, match="another model"):
        fuse_lora(load_pipeline(spec).transformer, tmp_path / "flux.safetensors")


def test_short_runs_get_a_warmup_that_leaves_steps_to_cache():
    from npu_dit.pipeline_parallel import build_options

    common = dict(ulysses_degree=1, tp_degree=1, async_ulysses=False, attention_backend="auto",
                  inner_compiler="eager", dump_dir=None, world_size=1)
    for steps, warmup in ((3, 1), (4, 1), (8, 2), (28, None)):
        options = build_options(cache={"Fn_compute_blocks": 1}, num_inference_steps=steps, **common)
        assert options["cache"].get("max_warmup_steps") == warmup, steps
    # an explicit setting is the user's: still checked, never replaced
    with pytest.raises(ValueError, match="max_warmup_steps"):
        build_options(cache={"max_warmup_steps": 8}, num_inference_steps=4, **common)


def test_async_ulysses_is_a_no_op_at_ulysses_degree_1_unless_asked_for_explicitly():
    from npu_dit.pipeline_parallel import build_options

    common = dict(tp_degree=1, attention_backend="auto", cache=None, inner_compiler="eager",
                  num_inference_steps=None, dump_dir=None)
    # the same script under `python` (world 1) and under `torchrun --nproc-per-node 2`
    assert build_options(ulysses_degree=None, async_ulysses=True, world_size=1, **common)["async_ulysses"] is False
    assert build_options(ulysses_degree=None, async_ulysses=True, world_size=2, **common)["async_ulysses"] is True
    with pytest.raises(ValueError, match="needs 'ulysses_degree' > 1"):
        build_options(ulysses_degree=1, async_ulysses=True, world_size=1, **common)


def test_a_tp_degree_that_does_not_divide_the_world_says_what_does(flux_pipe_factory, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"tp_degree to a divisor of 2 \(1, 2\)") as info:
        npu_dit.parallelize(flux_pipe_factory(), tp_degree=3)
    assert "set ulysses_degree=2" not in str(info.value)  # the advice it gave before: already the case
