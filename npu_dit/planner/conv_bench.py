"""`python -m npu_dit.planner.conv_bench`: a CPU profile's `kernels` factors for convolutions, measured.

On one thread (one rank = one core): the rate of a fixed sweep of 3x3 and causal 3x3x3 convolutions (8 to
128 channels, two spatial sizes each: the shapes VAEs run) against a 1024^3 matmul's, both from CPU
seconds (best of 3, so other jobs on the machine move them little). Each convolution falls in the kernel
class `costs.conv_class` names: oneDNN's (`conv2d`, `conv3d`) or PyTorch's own slower kernel where its rule
picks that (`conv3d_native`: the smaller of the two sizes here). A class's factor is its FLOPs over its time,
over the matmul rate: what the profile multiplies the compute efficiency by for that class's FLOPs. The
factors average over widths: narrow convolutions are slower than wide ones in each class.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from npu_dit.planner.costs import conv_class

CHANNELS = (8, 16, 32, 64, 128)


def _seconds(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure() -> dict[str, float]:
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul_rate = 2 * 1024 ** 3 / _seconds(lambda: a @ b)
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with torch.no_grad():
        for channels in CHANNELS:
            for side in (4096 // channels, 8192 // channels):  # equal FLOPs per width, as in a VAE's stages
                pixel = 2 * channels * channels * side * side
                for x, w, pad, taps in (
                        (torch.randn(1, channels, 3, side, side), torch.randn(channels, channels, 3, 3, 3), (0, 1, 1), 27),
                        (torch.randn(1, channels, side, side), torch.randn(channels, channels, 3, 3), 1, 9)):
                    kind = conv_class(x, w)
                    conv = F.conv3d if x.dim() == 5 else F.conv2d
                    seconds[kind] = seconds.get(kind, 0.0) + _seconds(lambda: conv(x, w, padding=pad))
                    flops[kind] = flops.get(kind, 0.0) + pixel * taps
    return {kind: round(flops[kind] / seconds[kind] / matmul_rate, 3) for kind in sorted(flops)}


if __name__ == "__main__":
    print(json.dumps(measure()))
