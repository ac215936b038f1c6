"""Small convolutional modules for the spatial pass's refusal tests (importable by spawned ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ConvFlip(torch.nn.Module):
    """A convolution, then an op no spatial rule covers: flipping the rows (each band would flip its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flip(2)


class ConvBilinear(torch.nn.Module):
    """Bilinear upsampling reads the next band's first row: not covered (only nearest is local)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear")
