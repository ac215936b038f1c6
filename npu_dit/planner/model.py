"""The cost model: every legal configuration for N devices, and its predicted time, memory and traffic.

Per transformer call on one rank:

    compute   = (matmul + attention FLOPs) / (peak x compute efficiency), convolutions (VAE) x the profile's
                factor for that kernel class
              + (memory-bound bytes [+ the score matrix a materialising kernel writes]) / (bandwidth x memory eff.)
    collective = (count x latency + bytes on the wire / link bandwidth) / link efficiency, per link class
                 (a full mesh reaches min(peers, links per device) peers at once, each over its own link)
    async Ulysses: each transfer hides behind the work the schedule placed between its start and its wait
    (read from the async Ulysses-2 graph): min(transfer, that work), summed over the collectives

each quantity at degree P from the serial and degree-2 graphs (`costs.split_by_degree`). Devices are laid out
TP innermost, then Ulysses, then CFG: a group of G consecutive ranks talks over the intra-node link when G fits
in a node. A CFG group computes one branch of a true-CFG step; the branches exchange their outputs once per
step. Where a machine has fewer compute units than ranks (`concurrent_devices`: a CPU's cores), the ranks
share them. Text encoders (TEP: their linears / N, two all-reduces per layer) and the VAE (VAE parallel:
/ N) run once per image on every rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from npu_dit.planner.hardware import Hardware

SCORE_PASSES = 4  # a materialising kernel writes the float32 scores, softmax reads and writes them, PV reads them
SCORE_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Config:
    ulysses_degree: int = 1
    async_ulysses: bool = False
    tp_degree: int = 1
    cfg_degree: int = 1
    text_encoder_parallel: bool = False
    vae_parallel: bool = False
    attention_backend: str = "sdpa"

    @property
    def devices(self) -> int:
        return self.ulysses_degree * self.tp_degree * self.cfg_degree

    def label(self) -> str:
        parts = []
        if self.ulysses_degree > 1:
            parts.append(f"{'async ' if self.async_ulysses else ''}Ulysses-{self.ulysses_degree}")
        if self.tp_degree > 1:
            parts.append(f"TP-{self.tp_degree}")
        if self.cfg_degree > 1:
            parts.append(f"CFG-{self.cfg_degree}")
        if self.text_encoder_parallel:
            parts.append("TEP")
        if self.vae_parallel:
            parts.append("VAE parallel")
        parts.append(self.attention_backend)
        return " + ".join(parts) if len(parts) > 1 else f"1 device, {parts[0]}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_configs(costs: dict[str, Any], hw: Hardware, devices: int) -> list[Config]:
    """Every legal configuration on exactly `devices` devices: ulysses x tp x cfg = devices; TP divides the
    heads (Ulysses need not: uneven heads are padded, UAA); CFG 2 only where the pipeline runs true CFG;
    Ulysses / TP only where their pass shards this graph; async only with Ulysses; TEP and VAE parallel
    only with several devices."""
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    heads = costs["heads"]
    cfg_choices = [1, 2] if costs["true_cfg"] else [1]
    out = []
    for cfg in cfg_choices:
        if devices % cfg:
            continue
        for tp in divisors(devices // cfg):
            ulysses = devices // cfg // tp
            if tp > 1 and (costs["tp"] is None or heads % tp):
                continue
            if ulysses > 1 and (costs["ulysses"] is None or ulysses > heads):
                continue
            for asynchronous, tep, vae, backend in itertools.product(
                    (False, True) if ulysses > 1 else (False,), (False, True) if devices > 1 else (False,),
                    (False, True) if devices > 1 else (False,), tuple(hw.attention_kernels)):
                out.append(Config(ulysses, asynchronous, tp, cfg, tep, vae, backend))
    return out


def _scaled(split: dict[str, dict[str, float]] | None, field: str, degree: int) -> float:
    """q(P) / q(1) for one field."""
    if split is None or degree == 1:
        return 1.0
    entry = split[field]
    total = entry["kept"] + entry["sharded"]
    return (entry["kept"] + entry["sharded"] / degree) / total if total else 1.0


def _collective_s(hw: Hardware, span: int, peers: int, wire_bytes: float, count: int) -> float:
    """`count` collectives among `peers` + 1 ranks whose layout spans `span` consecutive ranks (the link class),
    each rank putting `wire_bytes` on the wire in all; the link efficiency scales latency and bandwidth alike:
    (alpha + bytes / beta) / eff. In a full mesh each peer is reached over its own link."""
    link = hw.link(span)
    return (count * link.latency_s + wire_bytes / link.bandwidth_for(peers)) / hw.efficiency["link"]


def _compute_s(hw: Hardware, share: float, matmul: float, attention: float, memory: float,
               conv: dict[str, float] | None = None, divide: float = 1.0) -> tuple[float, float]:
    """(matmul + attention time, memory-bound time) on one rank; `conv`: the convolution FLOPs among `matmul`
    by kind (`conv2d`, `conv3d`; divided by `divide` too), at the profile's factor for that kernel class."""
    flops = hw.peak_flops * hw.efficiency["compute"] / share
    bandwidth = hw.memory_bandwidth * hw.efficiency["memory"] / share
    slower = sum(f / divide * (1.0 / hw.kernels.get(kind, 1.0) - 1.0) for kind, f in (conv or {}).items())
    return (matmul + attention + slower) / flops, memory / bandwidth


def predict(costs: dict[str, Any], hw: Hardware, config: Config, *, steps: int, cache_fraction: float = 1.0,
            cfg_learning_steps: int = 0) -> dict[str, Any]:
    """One generation's time. `cfg_learning_steps`: steps of it whose two true-CFG calls run one after the
    other under CFG parallelism while the runtime learns the pairing (runtime/cfg_parallel.py): 1 for the
    first generation on a pipeline or one with a new negative prompt, 0 (the default) for a repeated
    generation, which starts paired."""
    u, t, c = config.ulysses_degree, config.tp_degree, config.cfg_degree
    n = config.devices
    share = max(1.0, n / hw.concurrent_devices) if hw.concurrent_devices else 1.0
    tr = costs["transformer"]
    us = costs["ulysses"]["split"] if costs["ulysses"] else None
    ts = costs["tp"]["split"] if costs["tp"] else None

    def at(field: str) -> float:
        return tr[field] * _scaled(us, field, u) * _scaled(ts, field, t)

    heads_per_tp = costs["heads"] / t
    pad = math.ceil(heads_per_tp / u) * u / heads_per_tp  # UAA pads heads to a multiple of the degree
    matmul = at("matmul_flops")
    attention = at("attention_flops") * pad
    memory = at("memory_bytes")
    if hw.attention_kernels[config.attention_backend].get("materializes_scores"):
        memory += at("score_elements") * pad * SCORE_BYTES * SCORE_PASSES
    matmul_s, memory_s = _compute_s(hw, share, matmul, attention, memory)

    sent = 0.0
    comm_s = hidden_s = 0.0
    if u > 1:
        a2a = costs["ulysses"]
        scale = 2.0 / u / t  # send buffers: N/P tokens x the heads this TP rank holds
        qkv, out = a2a["qkv_bytes_at_2"] * scale, a2a["out_bytes_at_2"] * scale
        count = a2a["collectives_at_2"]
        wire = (u - 1) / u
        qkv_s = _collective_s(hw, u * t, u - 1, qkv * wire, count // 2)
        out_s = _collective_s(hw, u * t, u - 1, out * wire, count - count // 2)
        comm_s += qkv_s + out_s
        sent += qkv + out
        if config.async_ulysses:  # each transfer hides behind the work placed between its start and its wait
            bandwidth_link = hw.link(u * t).bandwidth_for(u - 1)
            flops = hw.peak_flops * hw.efficiency["compute"] / share
            bandwidth = hw.memory_bandwidth * hw.efficiency["memory"] / share
            for w in a2a.get("async_windows_at_2", ()):
                transfer = w["bytes"] * scale * wire / (bandwidth_link * hw.efficiency["link"])
                work = (w["flops"] / flops + w["memory_bytes"] / bandwidth) * scale
                hidden_s += min(transfer, work)
    if t > 1:
        tp = costs["tp"]
        reduce_bytes = tp["all_reduce_bytes"] / u
        gather_bytes = tp["all_gather_bytes_at_2"] * 2 / t / u
        comm_s += _collective_s(hw, t, t - 1, 2 * (t - 1) / t * reduce_bytes + (t - 1) * gather_bytes, tp["collectives"])
        sent += 2 * (t - 1) / t * reduce_bytes + (t - 1) * gather_bytes
    call_s = matmul_s + memory_s + comm_s - hidden_s
    calls_per_step = (2 if costs["true_cfg"] else 1) / c
    step_s = call_s * calls_per_step
    step_sent = sent * calls_per_step
    if c > 1:  # one exchange of the branch outputs per step
        exchange = tr["output_bytes"] * (c - 1) / c
        step_s += _collective_s(hw, n, c - 1, exchange, 1)
        step_sent += exchange
    denoise_s = steps * step_s * cache_fraction
    learning_wait_s = 0.0
    if c > 1 and steps > 0:
        # a learning step's two calls run one after the other, each on one branch while the other waits
        learning_wait_s = min(cfg_learning_steps, steps) * call_s * (2 - calls_per_step)
        denoise_s += learning_wait_s

    st = costs["stages"]
    text_s = 0.0
    tep = n if config.text_encoder_parallel else 1
    for enc in st["text_encoders"]:
        mm, mem = _compute_s(hw, share, enc["matmul_flops"] / tep, enc["attention_flops"] / tep, enc["memory_bytes"])
        text_s += mm + mem
        if tep > 1:  # two all-reduces of the hidden states per layer
            layers, hidden_bytes = enc.get("layers", 0), enc.get("hidden_bytes", 0)
            text_s += _collective_s(hw, tep, tep - 1, 2 * layers * 2 * (tep - 1) / tep * hidden_bytes, 2 * layers)
    text_s *= st["text_encodes"]
    vae_deg = n if config.vae_parallel else 1
    vae_s = 0.0
    for part in st["vae"]:
        mm, mem = _compute_s(hw, share, part["matmul_flops"] / vae_deg, part["attention_flops"] / vae_deg,
                             part["memory_bytes"] / vae_deg, part.get("conv_flops"), vae_deg)
        vae_s += mm + mem
    weights = at("parameter_bytes") + sum(e["parameter_bytes"] / tep for e in st["text_encoders"]) \
        + max((p["parameter_bytes"] for p in st["vae"]), default=0)
    peak = weights + at("activation_peak_bytes")
    return {
        **dataclasses.asdict(config),
        "label": config.label(),
        "predicted_s": text_s + denoise_s + vae_s,
        "stages_s": {"text_encoding": text_s, "denoising": denoise_s, "vae": vae_s},
        "step_s": step_s,
        "cfg_learning_wait_s": learning_wait_s,
        "exposed_collective_s_per_step": (comm_s - hidden_s) * calls_per_step,
        "peak_memory_gib": peak / 2**30,
        "bytes_per_step": step_sent,
        "fits": peak <= hw.memory_bytes,
    }


def plan(costs: dict[str, Any], hw: Hardware, devices: int, *, steps: int, cache_fraction: float = 1.0) -> list[dict[str, Any]]:
    """Predictions for every legal configuration, fastest first among those that fit; the first that fits
    is marked `recommended`."""
    if not 0 < cache_fraction <= 1:
        raise ValueError(f"--cache-fraction is the expected share of computed steps, in (0, 1]; got {cache_fraction}")
    rows = [predict(costs, hw, cfg, steps=steps, cache_fraction=cache_fraction)
            for cfg in enumerate_configs(costs, hw, devices)]
    rows.sort(key=lambda r: (not r["fits"], round(r["predicted_s"], 6), r["peak_memory_gib"]))  # ties: less memory
    for i, row in enumerate(rows):
        row["recommended"] = i == 0 and row["fits"]
    return rows


def busy_s(costs: dict[str, Any], hw: Hardware, config: Config, *, steps: int, cfg_learning_steps: int = 0) -> float:
    """What one rank computes, in seconds, on a compute unit of its own and with free collectives: what a rank's
    CPU seconds measure on a shared machine, where waits use no CPU and other jobs take cores."""
    free_links = {k: dataclasses.replace(v, latency_s=0.0, bandwidth=float("inf")) for k, v in hw.links.items()}
    alone = dataclasses.replace(hw, concurrent_devices=None, links=free_links)
    row = predict(costs, alone, config, steps=steps, cfg_learning_steps=cfg_learning_steps)
    return row["predicted_s"] - row["cfg_learning_wait_s"]  # a branch waiting for the other uses no CPU
