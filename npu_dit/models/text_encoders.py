"""The seed pipelines' text encoders, for text-encoder parallelism (TEP) and `inspect`.

FLUX.1-dev's `text_encoder_2` is the T5-v1.1-XXL encoder (`T5EncoderModel`: 24 layers, d_model 4096,
64 heads x 64, d_ff 10240, gated-GELU; attention written as matmul + softmax with a relative position
bias per head). Qwen-Image's text encoder is Qwen2.5-VL-7B; its language model
(`text_encoder.model.language_model`: 28 layers, hidden 3584, 28 heads, 4 K/V heads, intermediate
18944, multimodal RoPE) is what TEP compiles (the whole VL model breaks into three graphs). Configs
are built with transformers' own classes on any device, the meta device included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    name: str
    full_config: dict[str, Any]
    tiny_config: dict[str, Any]
    build: Callable[[dict[str, Any]], torch.nn.Module]
    example_inputs: Callable[[dict[str, Any], int, int], dict[str, Any]]

    def config(self, size: str = "full", **overrides: Any) -> dict[str, Any]:
        return {**(self.full_config if size == "full" else self.tiny_config), **overrides}


def _build_t5(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config)).eval()


def _build_qwen_lm(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    full = Qwen2_5_VLConfig(text_config=config)
    return Qwen2_5_VLTextModel(full.text_config).eval()


def _ids(config: dict[str, Any], batch: int, length: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (batch, length), generator=generator)
    return {"input_ids": ids.to(device)}


def _qwen_inputs(config: dict[str, Any], batch: int, length: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    inputs = _ids(config, batch, length, device)
    inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=device)
    return inputs


T5_XXL = TextEncoderSpec(
    name="t5-v1.1-xxl",
    full_config=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     use_cache=False),
    tiny_config=dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     use_cache=False),
    build=_build_t5,
    example_inputs=_ids,
)

QWEN25_VL_7B_LM = TextEncoderSpec(
    name="qwen2.5-vl-7b-lm",
    full_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                     rope_theta=1000000.0, use_cache=False),
    tiny_config=dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2,
                     rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     rope_theta=1000000.0, use_cache=False, bos_token_id=0, eos_token_id=1),
    build=_build_qwen_lm,
    example_inputs=_qwen_inputs,
)

TEXT_ENCODERS = {spec.name: spec for spec in (T5_XXL, QWEN25_VL_7B_LM)}


def build_text_encoder(spec: TextEncoderSpec, config: dict[str, Any], *, device: str | torch.device = "cpu",
                       seed: int = 0) -> torch.nn.Module:
    device = torch.device(device)
    if device.type != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        return spec.build(config)
