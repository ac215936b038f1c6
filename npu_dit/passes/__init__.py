"""Graph passes. Each pass is `xxx_pass(gm, *, cfg, ...) -> PassResult`; pipeline.py orders them."""

from npu_dit.passes.infra import PassResult, PassSpec, PipelineReport, UserError, run_passes

__all__ = ["PassResult", "PassSpec", "PipelineReport", "UserError", "run_passes"]
