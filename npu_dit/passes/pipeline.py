"""The one ordered list of passes for a CompileConfig.

Order matters and is written down here, not left to import side effects:
(the list grows as the rewriting passes land; see docs/ARCHITECTURE.md)
"""

from __future__ import annotations

from npu_dit.config import CompileConfig
from npu_dit.passes.infra import PassSpec


def build_pipeline(cfg: CompileConfig) -> list[PassSpec]:
    passes: list[PassSpec] = []
    return passes
