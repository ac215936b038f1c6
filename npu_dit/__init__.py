"""npu-dit: a torch.compile backend that turns one captured Diffusion-Transformer graph into a
parallel, cached, hardware-lowered program.

    torch.compile(transformer, backend="npu_dit", dynamic=True, options={...})

The backend is registered under the `torch_dynamo_backends` entry point, so importing this package
is not needed for `backend="npu_dit"` to work.
"""

from npu_dit.config import CacheConfig, CompileConfig

__version__ = "0.1.0"


def cache_summaries() -> list[dict]:
    """Per live cache controller and each of its last few generations (this thread's): the graph
    label, the generation, and per CFG branch which steps computed, which cached, and the diffs."""
    from npu_dit.runtime.cache import summaries

    return summaries()


def print_cache_summary() -> None:
    """Print `cache_summaries()` readably: one line per CFG branch with its compute pattern."""
    from npu_dit.runtime.cache import format_summaries

    print(format_summaries())


def reset_cache() -> None:
    """Start a new generation on every cache controller (generations are also detected from the
    timesteps going back up)."""
    from npu_dit.runtime.cache import reset_all

    reset_all()


__all__ = ["CacheConfig", "CompileConfig", "__version__", "cache_summaries", "print_cache_summary", "reset_cache"]
