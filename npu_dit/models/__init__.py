"""The seed-model zoo: FLUX.1-dev, Qwen-Image-Edit, Qwen-Image-Edit-2509 and the Lightning variants."""

from __future__ import annotations

from npu_dit.models.flux import FLUX_1_DEV
from npu_dit.models.qwen_image import (
    QWEN_IMAGE_EDIT,
    QWEN_IMAGE_EDIT_2509,
    QWEN_IMAGE_EDIT_2509_LIGHTNING,
    QWEN_IMAGE_EDIT_LIGHTNING,
    QWEN_IMAGE_LIGHTNING,
)
from npu_dit.models.spec import ModelSpec, build_transformer, count_parameters

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        FLUX_1_DEV,
        QWEN_IMAGE_EDIT,
        QWEN_IMAGE_EDIT_2509,
        QWEN_IMAGE_LIGHTNING,
        QWEN_IMAGE_EDIT_LIGHTNING,
        QWEN_IMAGE_EDIT_2509_LIGHTNING,
    )
}
DEFAULT_MODEL = FLUX_1_DEV.name


def get_model(name: str) -> ModelSpec:
    key = name.lower()
    for spec in MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")


__all__ = ["DEFAULT_MODEL", "MODELS", "ModelSpec", "build_transformer", "count_parameters", "get_model"]
