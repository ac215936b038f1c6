import os
import warnings

import pytest
import torch

from npu_dit.models import build_transformer, get_model
from npu_dit.tools.capture import capture_graph

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message="There are modules in")

TINY_CALLS = {
    # name -> (model, example_inputs kwargs)
    "flux": ("flux.1-dev", dict(height=128, width=128, prompt_len=12)),
    "qwen-edit": ("qwen-image-edit", dict(height=128, width=128, prompt_len=12)),
    "qwen-edit-masked": ("qwen-image-edit", dict(height=128, width=128, prompt_len=12, batch=2)),
    "qwen-edit-2509": (
        "qwen-image-edit-2509",
        dict(height=128, width=128, prompt_len=10, input_images=[(128, 128), (64, 96)]),
    ),
}


def tiny_model_and_inputs(key: str, config_overrides: dict | None = None, **overrides):
    name, kwargs = TINY_CALLS[key]
    spec = get_model(name)
    config = spec.config("tiny", **(config_overrides or {}))
    model = build_transformer(spec, config, seed=0)
    inputs = spec.example_inputs(config, **{**kwargs, **overrides})
    return spec, model, inputs


_CAPTURES = {}


@pytest.fixture(scope="session")
def tiny_capture():
    """capture(key) -> (model, inputs, Captured); cached for the session."""

    def get(key: str):
        if key not in _CAPTURES:
            _, model, inputs = tiny_model_and_inputs(key)
            _CAPTURES[key] = (model, inputs, capture_graph(model, inputs, dynamic=True))
        return _CAPTURES[key]

    return get
