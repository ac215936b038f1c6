"""Fuse a LoRA (e.g. lightx2v's Qwen-Image-Lightning distillation) into a transformer's weights.

`W <- W + scale * (alpha / rank) * up @ down` for every adapted Linear, before any compile or
sharding, so the compiled graph sees plain weights. Key conventions read (one file may mix them):
`<module>.lora_A.weight` / `.lora_B.weight` (PEFT, diffusers; optional `.default`),
`<module>.lora_down.weight` / `.lora_up.weight` (kohya, lightx2v) with optional `<module>.alpha`;
prefixes `transformer.`, `diffusion_model.`, `base_model.model.` are dropped. A key naming no Linear of
the transformer is a `ValueError` (the LoRA belongs to another model), never silently skipped.
"""

from __future__ import annotations

import os
import re

import torch

_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "model.")
_PAIR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.default)?\.weight$")


def check_lora_file(path: str | os.PathLike) -> str:
    """The path, once it names a file whose header can be read (cheap: the tensors are not loaded)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"LoRA file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError: a truncated or foreign file
            raise ValueError(f"LoRA file {path!r} is not a readable safetensors file ({exc}); pass a PEFT or "
                             f"kohya LoRA saved as .safetensors") from None
    return path


def read_lora(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"down": A, "up": B, "alpha": a?}} from a .safetensors (or torch) file."""
    path = check_lora_file(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, UnpicklingError, ...: a file we cannot read
        raise ValueError(f"LoRA file {path!r} could not be read ({type(exc).__name__}: {exc}); pass a "
                         f"PEFT or kohya LoRA saved as .safetensors") from None
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.endswith(".alpha"):
            adapters.setdefault(key[: -len(".alpha")], {})["alpha"] = value
            continue
        match = _PAIR.match(key)
        if match is None:
            raise ValueError(f"LoRA file {path!r}: key {key!r} is neither lora_A/lora_B, lora_down/lora_up nor alpha")
        role = "down" if match["kind"] in ("lora_A", "lora_down") else "up"
        adapters.setdefault(match["module"], {})[role] = value
    incomplete = sorted(m for m, a in adapters.items() if not {"down", "up"} <= set(a))
    if incomplete:
        raise ValueError(f"LoRA file {path!r}: modules without both down and up weights: {', '.join(incomplete[:5])}")
    return adapters


@torch.no_grad()
def fuse_lora(transformer: torch.nn.Module, path: str | os.PathLike, *, scale: float = 1.0) -> int:
    """Add the LoRA's low-rank updates to the transformer's Linear weights; returns how many were fused."""
    modules = dict(transformer.named_modules())
    adapters = read_lora(path)
    unknown = sorted(m for m in adapters if not isinstance(modules.get(m), torch.nn.Linear))
    if unknown:
        raise ValueError(
            f"LoRA file {os.fspath(path)!r} adapts {len(unknown)} module(s) that are not Linear layers of "
            f"{type(transformer).__name__} (e.g. {', '.join(unknown[:3])}); is it a LoRA for another model?"
        )
    for name, adapter in adapters.items():
        linear = modules[name]
        down, up = adapter["down"].float(), adapter["up"].float()
        if up.shape[0] != linear.out_features or down.shape[1] != linear.in_features or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"LoRA for {name}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit the Linear's "
                f"weight {tuple(linear.weight.shape)}"
            )
        rank = down.shape[0]
        factor = scale * (float(adapter["alpha"]) / rank if "alpha" in adapter else 1.0)
        linear.weight += (factor * (up @ down)).to(linear.weight.dtype)
    return len(adapters)
