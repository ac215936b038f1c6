"""Read-only facts about a captured graph. Pure functions, cached per GraphModule."""

from npu_dit.passes.analysis.attention import AttentionSite, attention_sites, parameter_placeholders
from npu_dit.passes.analysis.blocks import Block, block_index_of, transformer_blocks
from npu_dit.passes.analysis.module_paths import module_path, module_stack, normalize_path
from npu_dit.passes.analysis.token_dims import (
    TokenDim,
    TokenDims,
    input_name,
    require_dynamic_token_dims,
    token_dims,
)

__all__ = [
    "AttentionSite",
    "Block",
    "TokenDim",
    "TokenDims",
    "attention_sites",
    "block_index_of",
    "input_name",
    "module_path",
    "module_stack",
    "normalize_path",
    "parameter_placeholders",
    "require_dynamic_token_dims",
    "token_dims",
    "transformer_blocks",
]
