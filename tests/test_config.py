import pytest
import torch

from npu_dit.config import UNAVAILABLE_FEATURES, CacheConfig, CompileConfig


def test_defaults():
    cfg = CompileConfig.from_options(None)
    assert cfg.ulysses_degree == 1 and cfg.tp_degree == 1 and not cfg.async_ulysses
    assert cfg.attention_backend == "auto" and cfg.inner_compiler == "eager"
    assert cfg.cache is None and cfg.dump_dir is None


@pytest.mark.parametrize("backend", ["auto", "sdpa", "npu_fia", "npu_fa", "flash", "cudnn", "efficient", "math"])
def test_attention_backend_choices(backend):
    # attention lowering has landed: every kernel can be asked for (the pass refuses, per call site and
    # with the reason, a kernel that cannot run a call)
    assert "attention_lowering" not in UNAVAILABLE_FEATURES
    assert CompileConfig.from_options({"attention_backend": backend}).attention_backend == backend


@pytest.mark.parametrize("inner", ["eager", "inductor", "npugraph_ex"])
def test_inner_compiler_choices(inner):
    assert CompileConfig.from_options({"inner_compiler": inner}).inner_compiler == inner


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'ulysess_degree'.*allowed: ulysses_degree"):
        CompileConfig.from_options({"ulysess_degree": 2})


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"ulysses_degree": 0}, r"'ulysses_degree' must be >= 1, got 0"),
        ({"ulysses_degree": "2"}, r"'ulysses_degree' must be an int, got '2'"),
        ({"ulysses_degree": True}, r"'ulysses_degree' must be an int"),
        ({"tp_degree": 1.5}, r"'tp_degree' must be an int"),
        ({"async_ulysses": 1}, r"'async_ulysses' must be True or False"),
        ({"attention_backend": "fast"}, r"'attention_backend' must be one of auto, sdpa, npu_fia"),
        ({"inner_compiler": "tvm"}, r"'inner_compiler' must be one of eager, inductor, npugraph_ex"),
        ({"dump_dir": 3}, r"'dump_dir' must be a directory path"),
        ({"cache": 0.08}, r"'cache' must be a dict"),
        ({"cache": {"Fn": 1}}, r"unknown cache option\(s\) 'Fn'"),
        ({"cache": {"Fn_compute_blocks": 0}}, r"'cache.Fn_compute_blocks' must be >= 1"),
        ({"cache": {"residual_diff_threshold": -0.1}}, r"'cache.residual_diff_threshold' must be >= 0"),
        ({"cache": {"taylorseer_order": 3}}, r"must be 0, 1 or 2"),
        ({"cache": {"max_cached_steps": 0}}, r"'cache.max_cached_steps' must be >= 1 or -1"),
        ({"cache": {"steps_mask": "turbo"}}, r"'cache.steps_mask' must be one of slow, medium, fast, ultra"),
        ({"cache": {"steps_mask": [1, 2]}}, r"'cache.steps_mask' must be a preset name"),
        ({"ulysses_degree": 2, "comm_dtype": "fp8"}, r"'comm_dtype' must be None .* or one of float8_e4m3fn"),
        ({"ulysses_degree": 2, "comm_dtype": torch.bfloat16}, r"'comm_dtype' must be None .*; got 'bfloat16'"),
        ({"comm_dtype": "float8_e4m3fn"}, r"'comm_dtype=float8_e4m3fn' compresses Ulysses' all-to-alls and needs "
                                          r"'ulysses_degree' > 1"),
    ],
)
def test_bad_values_are_clear_value_errors(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        CompileConfig.from_options(options)


@pytest.mark.skipif("async_ulysses" in UNAVAILABLE_FEATURES, reason="async Ulysses has not landed yet")
def test_async_needs_ulysses():
    with pytest.raises(ValueError, match="async_ulysses=True' needs 'ulysses_degree' > 1"):
        CompileConfig.from_options({"async_ulysses": True})


def test_cache_options_parse_with_cache_dit_names():
    cache = CacheConfig.from_options(
        {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12, "steps_mask": "1101",
         "max_continuous_cached_steps": 2, "taylorseer_order": 1}
    )
    assert cache.Fn_compute_blocks == 1 and cache.residual_diff_threshold == 0.12
    assert cache.steps_mask == (1, 1, 0, 1) and cache.max_continuous_cached_steps == 2
    assert CacheConfig.from_options({"steps_mask": "fast", "num_inference_steps": 28}).steps_mask == "fast"


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NPU_DIT_DUMP_DIR", str(tmp_path))
    assert CompileConfig.from_options({}).dump_dir == str(tmp_path)


def test_tensor_parallel_options_parse():
    cfg = CompileConfig.from_options({"tp_degree": 2, "ulysses_degree": 2, "release_weights": False})
    assert cfg.tp_degree == 2 and cfg.world_degree == 4 and cfg.release_weights is False
    assert CompileConfig.from_options({"tp_degree": 2}).release_weights is True
    with pytest.raises(ValueError, match="'release_weights' must be True or False"):
        CompileConfig.from_options({"release_weights": "no"})


def test_comm_dtype_parses_a_name_or_the_dtype():
    assert CompileConfig().comm_dtype is None
    for value in ("float8_e4m3fn", torch.float8_e4m3fn):
        assert CompileConfig.from_options({"ulysses_degree": 2, "comm_dtype": value}).comm_dtype == "float8_e4m3fn"
