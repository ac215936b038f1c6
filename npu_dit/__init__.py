"""npu-dit: a torch.compile backend that turns one captured Diffusion-Transformer graph into a
parallel, cached, hardware-lowered program.

    torch.compile(transformer, backend="npu_dit", dynamic=True, options={...})

The backend is registered under the `torch_dynamo_backends` entry point, so importing this package
is not needed for `backend="npu_dit"` to work.
"""

from npu_dit.config import CacheConfig, CompileConfig

__version__ = "0.1.0"


def parallelize(pipe, **options):
    """Compile a diffusers pipeline's transformer with the backend over the torchrun world (see
    `npu_dit.pipeline_parallel`); every option is validated before anything compiles."""
    from npu_dit.pipeline_parallel import parallelize as _parallelize

    return _parallelize(pipe, **options)


def cache_summaries() -> list[dict]:
    """Per live cache controller and each of its last few generations (this thread's): the graph
    label, the generation, and per CFG branch which steps computed, which cached, and the diffs."""
    from npu_dit.runtime.cache import summaries

    return summaries()


def explain(last: int | None = None) -> str:
    """What the backend did to each recent graph: passes, streams sharded or replicated and why,
    collectives inserted, fallbacks with their reasons."""
    from npu_dit.explain import explain as _explain

    return _explain(last)


def print_cache_summary() -> None:
    """Print `cache_summaries()` readably: one line per CFG branch with its compute pattern."""
    from npu_dit.runtime.cache import format_summaries

    print(format_summaries())


def set_verbose(verbose: bool) -> None:
    """Show (the default) or hide rank 0's compile progress lines (the `npu_dit.compile` logger)."""
    from npu_dit.progress import set_verbose as _set_verbose

    _set_verbose(verbose)


def reset_cache() -> None:
    """Start a new generation on every cache controller (generations are also detected from the
    timesteps going back up)."""
    from npu_dit.runtime.cache import reset_all

    reset_all()


__all__ = ["CacheConfig", "CompileConfig", "__version__", "cache_summaries", "explain", "parallelize",
           "print_cache_summary", "reset_cache", "set_verbose"]
