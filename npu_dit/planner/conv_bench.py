"""`python -m npu_dit.planner.conv_bench`: a CPU profile's `kernels` factors for convolutions, measured.

On one thread (one rank = one core): the rate of a fixed sweep of 3x3 and 3x3x3 convolutions (2-D and a
causal 3-D one on one frame, 8 to 128 channels, two spatial sizes each: the shapes VAEs run) against a
1024^3 matmul's, both from CPU seconds (best of 3, so other jobs on the machine move them little). Each
factor (`conv2d`, `conv3d`) is its sweep's FLOPs over its time, over the matmul rate: what the profile
multiplies the compute efficiency by for that kind's FLOPs. CPU convolution kernels are far from their matmuls on narrow channels
(a slow path below 16-32 channels) and about equal above, so the factor depends on the sweep: it is a
kernel-class average, not a per-shape rule.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

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
    flops = {"conv2d": 0.0, "conv3d": 0.0}
    seconds = {"conv2d": 0.0, "conv3d": 0.0}
    with torch.no_grad():
        for channels in CHANNELS:
            for side in (4096 // channels, 8192 // channels):  # wide layers at low resolution, as in a VAE
                x3, w3 = torch.randn(1, channels, 3, side, side), torch.randn(channels, channels, 3, 3, 3)
                x2, w2 = torch.randn(1, channels, side, side), torch.randn(channels, channels, 3, 3)
                pixel = 2 * channels * channels * side * side
                seconds["conv3d"] += _seconds(lambda: F.conv3d(x3, w3, padding=(0, 1, 1)))
                seconds["conv2d"] += _seconds(lambda: F.conv2d(x2, w2, padding=1))
                flops["conv3d"] += pixel * 27
                flops["conv2d"] += pixel * 9
    return {kind: round(flops[kind] / seconds[kind] / matmul_rate, 3) for kind in flops}


if __name__ == "__main__":
    print(json.dumps(measure()))
