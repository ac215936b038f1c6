"""Which device a rank runs on: `--device auto|cpu|cuda|npu` (generate) and `device=` (parallelize).

auto = an Ascend NPU when torch_npu imports and sees one, else a CUDA GPU, else the CPU. Each rank
takes its torchrun LOCAL_RANK device (and makes it current before the process group starts, as NCCL
and HCCL want). Accelerators run bfloat16 by default, the CPU float32. Asking for a device that is not
there is a `UserError` naming what is missing (the package, the driver, or the device index).
"""

from __future__ import annotations

import os

import torch

from npu_dit.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "npu")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device this rank runs on, made current; raises UserError when it is not available."""
    if isinstance(name, torch.device):
        name = name.type if name.index is None else str(name)
    kind, _, index_text = str(name).partition(":")
    if kind not in DEVICES:
        raise UserError(f"device={name!r} is not one of {', '.join(DEVICES)} (optionally with an index: cuda:1)")
    if kind == "auto":
        kind = "npu" if _npu_error() is None else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    index = int(index_text) if index_text else local_rank()
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(
                f"device 'cuda': no CUDA GPU is available to this process (torch {torch.__version__} is {build}; "
                f"torch.cuda.is_available() is False). Install a CUDA build of torch on a machine with an NVIDIA "
                f"GPU and driver, or use --device cpu (auto picks what is there)"
            )
        count = torch.cuda.device_count()
        if index >= count:
            raise UserError(f"device 'cuda:{index}' (LOCAL_RANK {local_rank()}): this machine has {count} GPU(s); "
                            f"launch at most {count} rank(s) per node")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    problem = _npu_error()
    if problem is not None:
        raise UserError(f"device 'npu': {problem}. Use --device cpu or cuda, or auto")
    count = torch.npu.device_count()  # type: ignore[attr-defined]
    if index >= count:
        raise UserError(f"device 'npu:{index}' (LOCAL_RANK {local_rank()}): this machine has {count} NPU(s); "
                        f"launch at most {count} rank(s) per node")
    torch.npu.set_device(index)  # type: ignore[attr-defined]
    return torch.device("npu", index)


def _npu_error() -> str | None:
    """None when an Ascend NPU is usable, else why not."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as exc:
        return (f"the package torch_npu (Ascend's PyTorch adapter, with the CANN toolkit) cannot be imported "
                f"({type(exc).__name__}: {exc}); pip install torch-npu matching torch {torch.__version__}")
    except Exception as exc:  # noqa: BLE001 - torch_npu present but CANN's libraries missing
        return f"torch_npu is installed but failed to load ({type(exc).__name__}: {exc}); source CANN's set_env.sh"
    if not torch.npu.is_available():  # type: ignore[attr-defined]
        return "torch_npu imports but sees no NPU (torch.npu.is_available() is False): check the driver and ASCEND_RT_VISIBLE_DEVICES"
    return None


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on accelerators, float32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory allocated on an accelerator since the process started (None on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device) / 2**20  # type: ignore[attr-defined]
    return None
