"""npu-dit: a torch.compile backend that turns one captured Diffusion-Transformer graph into a
parallel, cached, hardware-lowered program.

    torch.compile(transformer, backend="npu_dit", dynamic=True, options={...})

The backend is registered under the `torch_dynamo_backends` entry point, so importing this package
is not needed for `backend="npu_dit"` to work.
"""

from npu_dit.config import CacheConfig, CompileConfig

__version__ = "0.1.0"

__all__ = ["CacheConfig", "CompileConfig", "__version__"]
