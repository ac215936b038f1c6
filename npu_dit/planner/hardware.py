"""Hardware profiles: data files (`hardware/NAME.json`) that name their sources.

A profile holds published peaks (matmul FLOP/s, memory bandwidth and size, link bandwidth and latency per
link class: `intra` inside a node, `inter` between nodes; in a full mesh, `links_per_device` peers at once), the attention kernels it has (and whether each
materialises the score matrix; `kernels`: a measured factor on the compute efficiency for a kernel class
such as 2-D or 3-D convolutions), and three efficiencies (`compute`, `memory`, `link`): the share of each peak
that kernels reach (`link` scales a collective's latency and bandwidth alike). `free` names the constants
`npu-dit plan calibrate` may fit (at most 3: efficiencies, and for a CPU `concurrent_devices`, the cores its
ranks actually get); nothing else in a profile is fitted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

PROFILE_DIR = Path(__file__).parent / "hardware"
EFFICIENCIES = ("compute", "memory", "link")
FREE_CONSTANTS = (*EFFICIENCIES, "concurrent_devices")


@dataclasses.dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes per second, one direction, per device and link
    latency_s: float
    # peers a device reaches at once over links of their own: a full mesh's links per chip (each peer of an
    # all-to-all or all-reduce over its own link); 1 behind a switch or a shared port, where `bandwidth` is the
    # device's whole share
    links_per_device: int = 1

    def bandwidth_for(self, peers: int) -> float:
        """A device's bandwidth towards `peers` other ranks of one collective."""
        return self.bandwidth * max(1, min(peers, self.links_per_device))


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    peak_flops: float
    memory_bandwidth: float
    memory_bytes: int
    devices_per_node: int
    concurrent_devices: int | None  # devices that compute at once (a CPU's cores); None: every device
    links: dict[str, Link]
    attention_kernels: dict[str, dict[str, Any]]
    efficiency: dict[str, float]
    sources: tuple[str, ...]
    free: tuple[str, ...] = ("compute", "memory", "link")  # what `plan calibrate` fits (at most 3)
    # kernel classes slower or faster than the matmuls, as a factor on the compute efficiency (measured or
    # published, never fitted): {"conv2d": 0.5, "conv3d": 0.2}; absent: 1
    kernels: dict[str, float] = dataclasses.field(default_factory=dict)

    def constants(self) -> dict[str, float]:
        out = dict(self.efficiency)
        if self.concurrent_devices is not None:
            out["concurrent_devices"] = float(self.concurrent_devices)
        return out

    def with_constants(self, **values: float) -> "Hardware":
        """A copy with some free constants replaced (efficiencies, and a CPU's concurrent devices)."""
        concurrent = values.pop("concurrent_devices", self.concurrent_devices)
        return dataclasses.replace(self, efficiency={**self.efficiency, **values}, concurrent_devices=concurrent)

    def link(self, group_size: int) -> Link:
        """The link class a group of `group_size` consecutive ranks talks over."""
        return self.links["intra"] if group_size <= self.devices_per_node else self.links["inter"]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        d["free"] = list(self.free)
        return d


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def from_dict(d: dict[str, Any]) -> Hardware:
    missing = [k for k in ("name", "peak_flops", "memory_bandwidth", "memory_bytes", "links", "efficiency") if k not in d]
    if missing:
        raise ValueError(f"hardware profile lacks {', '.join(missing)}; see npu_dit/planner/hardware/cpu.json for the format")
    unknown = set(d["efficiency"]) - set(EFFICIENCIES)
    if unknown or set(d["efficiency"]) != set(EFFICIENCIES):
        raise ValueError(f"hardware profile {d['name']!r}: efficiency must have exactly {', '.join(EFFICIENCIES)}")
    return Hardware(
        name=d["name"], description=d.get("description", ""), peak_flops=float(d["peak_flops"]),
        memory_bandwidth=float(d["memory_bandwidth"]), memory_bytes=int(d["memory_bytes"]),
        devices_per_node=int(d.get("devices_per_node", 8)), concurrent_devices=d.get("concurrent_devices"),
        links={k: Link(float(v["bandwidth"]), float(v["latency_s"]), int(v.get("links_per_device", 1)))
               for k, v in d["links"].items()},
        attention_kernels=dict(d.get("attention_kernels") or {"sdpa": {"materializes_scores": False}}),
        efficiency={k: float(v) for k, v in d["efficiency"].items()}, sources=tuple(d.get("sources", ())),
        free=_free(d),
        kernels={k: float(v) for k, v in (d.get("kernels") or {}).items()},
    )


def _free(d: dict[str, Any]) -> tuple[str, ...]:
    free = tuple(d.get("free", ("compute", "memory", "link")))
    bad = [k for k in free if k not in FREE_CONSTANTS]
    if bad or len(free) > 3 or len(set(free)) != len(free):
        raise ValueError(f"hardware profile {d['name']!r}: free must name at most 3 distinct constants of "
                         f"{', '.join(FREE_CONSTANTS)}; got {list(free)}")
    if "concurrent_devices" in free and d.get("concurrent_devices") is None:
        raise ValueError(f"hardware profile {d['name']!r}: concurrent_devices is free but not set")
    return free


def load(name: str) -> Hardware:
    """A shipped profile by name, or a profile file by path (what `plan calibrate --out` writes)."""
    path = Path(name)
    if name.endswith(".json") and path.is_file():
        return from_dict(json.loads(path.read_text()))
    file = PROFILE_DIR / f"{name}.json"
    if not file.is_file():
        raise ValueError(f"unknown hardware {name!r}: choose one of {', '.join(available())}, or a profile file (.json) "
                         f"such as `npu-dit plan calibrate --out` writes")
    return from_dict(json.loads(file.read_text()))
