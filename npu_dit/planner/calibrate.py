"""`npu-dit plan calibrate`: fit a profile's free constants (at most 3) to measured runs.

Measurements come as `npu-dit generate --json` reports (one, or a list; a report may carry `"label"` and
`"use": "validate"` to be kept out of the fit and only checked), as `npu-dit bench seed --json` output
(`seed-tables.json`), or as a plain list of published figures:

    {"measurements": [{"model": "flux.1-dev", "size": "full", "height": 1024, "width": 1024, "steps": 28,
                       "ulysses_degree": 2, "async_ulysses": false, "tp_degree": 1, "cfg_degree": 1,
                       "text_encoder_parallel": false, "vae_parallel": false, "attention_backend": "sdpa",
                       "measured_s": 11.45}]}

(`prompt_len`: the text tokens the transformer sees; `input_images`: an edit pipeline's images as [height, width]
after its own resize; both default to the model's.)

A run with stage times contributes one point per stage (text encoding, denoising, VAE), a total only one.
The fit minimises the squared log ratio predicted / measured over all points (Nelder-Mead in log space),
fitting no more constants than there are points.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

from npu_dit.planner.hardware import Hardware
from npu_dit.planner.model import Config, busy_s, predict

STAGE_KEYS = {"text encoding": "text_encoding", "denoising": "denoising", "VAE": "vae"}


@dataclasses.dataclass
class Measurement:
    model: str
    size: str
    height: int
    width: int
    steps: int
    prompt_len: int | None
    config: Config
    stages_s: dict[str, float] | None  # text_encoding / denoising / vae
    total_s: float | None
    label: str = ""
    dtype: str = "bfloat16"
    use: str = "calibrate"  # or "validate": a published figure kept out of the fit
    input_images: list[tuple[int, int]] | None = None  # None: the pipeline's default
    busy_s: float | None = None  # the busiest rank's CPU seconds (`generate --json`: peak_memory_per_rank[].cpu_s)
    cfg_learning_steps: int = 0  # CFG-2 steps not run paired (`generate --json`: steps - cfg_parallel_steps)


def _config_from_options(options: dict[str, Any], *, tep: bool, vae: bool, default_backend: str) -> Config:
    backend = options.get("attention_backend", "auto")
    return Config(ulysses_degree=int(options.get("ulysses_degree", 1)), async_ulysses=bool(options.get("async_ulysses")),
                  tp_degree=int(options.get("tp_degree", 1)), cfg_degree=int(options.get("cfg_degree", 1)),
                  text_encoder_parallel=tep, vae_parallel=vae,
                  attention_backend=default_backend if backend == "auto" else backend)


def _from_generate(r: dict[str, Any], default_backend: str) -> Measurement:
    weights = str(r.get("weights", ""))
    size = weights.split()[0] if "random" in weights else "full"
    tokens = r.get("transformer_tokens") or []
    stages = {STAGE_KEYS[k]: float(v) for k, v in r["stages_s"].items() if k in STAGE_KEYS}
    options = dict(r.get("options", {}))
    # an edit pipeline's input image: the image tokens beyond the output's (square: the pipeline keeps ~1024^2)
    extra = tokens[0][0] - (r["height"] // 16) * (r["width"] // 16) if tokens else 0
    side = int(round(math.sqrt(extra))) * 16 if extra > 0 else 0
    return Measurement(r["model"], size, r["height"], r["width"], r["steps"], tokens[0][-1] if tokens else None,
                       _config_from_options(options, tep=bool(r.get("text_encoder_parallel")),
                                            vae=bool(options.get("vae_parallel") or r.get("vae_parallel")),
                                            default_backend=default_backend), stages, None,
                       label=r.get("label") or f"{r['model']} {r['world_size']} rank(s)", dtype=r.get("dtype", "float32"),
                       use=r.get("use", "calibrate"), input_images=[(side, side)] if side else None,
                       busy_s=max((float(p["cpu_s"]) for p in r.get("peak_memory_per_rank") or () if "cpu_s" in p),
                                  default=None),
                       cfg_learning_steps=max(0, r["steps"] - r["cfg_parallel_steps"]) if r.get("cfg_parallel_steps") is not None else 0)


def _flags_to_options(flags: list[str]) -> tuple[dict[str, Any], bool, bool]:
    options: dict[str, Any] = {}
    it = iter(flags)
    for flag in it:
        if flag == "--ulysses":
            options["ulysses_degree"] = int(next(it))
        elif flag == "--tp":
            options["tp_degree"] = int(next(it))
        elif flag == "--async-ulysses":
            options["async_ulysses"] = True
        elif flag == "--attention-backend":
            options["attention_backend"] = next(it)
        elif flag in ("--cfg-parallel", "--parallel-cfg"):
            options["cfg_degree"] = 2
    return options, "--text-encoder-parallel" in flags, "--vae-parallel" in flags


def load_measurements(data: Any, default_backend: str = "sdpa") -> list[Measurement]:
    if isinstance(data, list):
        return [m for item in data for m in load_measurements(item, default_backend)]
    if not isinstance(data, dict):
        raise ValueError("measurements: expected a JSON object or list (generate --json, bench seed --json, or "
                         "{\"measurements\": [...]})")
    if "measurements" in data:
        out = []
        for m in data["measurements"]:
            fields = {f.name for f in dataclasses.fields(Config)}
            config = Config(**{k: v for k, v in m.items() if k in fields})
            images = m.get("input_images")
            out.append(Measurement(m["model"], m.get("size", "full"), m["height"], m["width"], m["steps"],
                                   m.get("prompt_len"), config, None, float(m["measured_s"]), m.get("label", ""),
                                   m.get("dtype", "bfloat16"), m.get("use", "calibrate"),
                                   [tuple(map(int, hw)) for hw in images] if images is not None else None))
        return out
    if "tables" in data:  # bench seed
        out = []
        for table in data["tables"].values():
            for row in table["rows"]:
                options, tep, vae = _flags_to_options(list(row["flags"]))
                stages = {STAGE_KEYS[k]: float(v) for k, v in row["stages_s"].items() if k in STAGE_KEYS}
                tokens = row.get("tokens") or []
                out.append(Measurement(table["model"], data.get("size", "bench"), table["height"], table["width"],
                                       table["steps"], tokens[0][-1] if tokens else None,
                                       _config_from_options(options, tep=tep, vae=vae, default_backend=default_backend),
                                       stages, None, label=f"{table['model']} {row['label']}", dtype="float32"))
        return out
    if "stages_s" in data:
        return [_from_generate(data, default_backend)]
    raise ValueError("measurements: not a generate --json report, bench seed --json output or {\"measurements\": [...]}")


def points(m: Measurement, predicted: dict[str, Any], *, cpu_seconds: bool = False) -> list[tuple[float, float]]:
    """(predicted, measured) pairs of one run (`cpu_seconds`: `predicted` is `model.busy_s`'s)."""
    if cpu_seconds:
        return [(predicted["predicted_s"], m.busy_s)]
    if m.stages_s:
        return [(predicted["stages_s"][k], v) for k, v in m.stages_s.items() if v > 0]
    return [(predicted["predicted_s"], m.total_s)]


def _nelder_mead(f: Callable[[list[float]], float], x0: list[float], step: float = 0.7, iters: int = 1000) -> list[float]:
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < 1e-12:
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflect = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = f(reflect)
        if fr < values[0]:
            expand = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = f(expand)
            simplex[-1], values[-1] = (expand, fe) if fe < fr else (reflect, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflect, fr
        else:
            contract = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = f(contract)
            if fc < values[-1]:
                simplex[-1], values[-1] = contract, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, s)] for s in simplex[1:]]
                values = [values[0]] + [f(s) for s in simplex[1:]]
    return simplex[min(range(n + 1), key=values.__getitem__)]


def _predict(costs: dict[str, Any], hw: Hardware, m: Measurement, cpu_seconds: bool) -> dict[str, Any]:
    if not cpu_seconds:
        return predict(costs, hw, m.config, steps=m.steps, cfg_learning_steps=m.cfg_learning_steps)
    busy = busy_s(costs, hw, m.config, steps=m.steps, cfg_learning_steps=m.cfg_learning_steps)
    return {"predicted_s": busy, "stages_s": None}


def check_cpu_seconds(measurements: list[Measurement]) -> None:
    lacking = [m.label or m.config.label() for m in measurements if m.busy_s is None]
    if lacking:
        raise ValueError(f"--cpu-seconds: {', '.join(lacking)} carries no CPU seconds; only `npu-dit generate --json` "
                         f"reports do (peak_memory_per_rank[].cpu_s): drop --cpu-seconds or give those reports")


def fitted_names(hw: Hardware, measurements: list[Measurement], *, cpu_seconds: bool = False) -> list[str]:
    """The constants a fit moves: the profile's `free` ones in order, no more than there are points; with
    `cpu_seconds` only those that change what a rank computes (compute, memory: links and shared cores do not)."""
    if cpu_seconds:
        return [k for k in hw.free if k in ("compute", "memory")][:len(measurements)]
    return list(hw.free[:sum(len(m.stages_s) if m.stages_s else 1 for m in measurements)])


def calibrate(hw: Hardware, measurements: list[Measurement], costs_for: Callable[[Measurement], dict[str, Any]],
              *, cpu_seconds: bool = False) -> tuple[Hardware, list[dict[str, Any]]]:
    """Fit `hw.free` (as many as there are points, in the profile's order) to `measurements`; return the
    fitted profile and a row per measurement (predicted before and after, measured). `cpu_seconds`: fit the
    busiest rank's CPU seconds (`model.busy_s`) instead of the wall times, for a machine shared with other jobs."""
    if not measurements:
        raise ValueError("no measurements to calibrate on")
    if cpu_seconds:
        check_cpu_seconds(measurements)
    costs = [costs_for(m) for m in measurements]
    free = fitted_names(hw, measurements, cpu_seconds=cpu_seconds)
    start = hw.constants()

    # each constant through a smooth map onto its range (efficiencies in (0, 1]; a CPU's concurrent devices
    # between 1 and its cores), so the search itself is unconstrained
    low = {k: 1.0 if k == "concurrent_devices" else 0.0 for k in free}
    high = {k: start[k] if k == "concurrent_devices" else 1.0 for k in free}

    def value(k: str, x: float) -> float:
        return low[k] + (high[k] - low[k]) / (1.0 + math.exp(-x))

    def inverse(k: str, v: float) -> float:
        share = min(max((v - low[k]) / (high[k] - low[k]), 0.02), 0.98) if high[k] > low[k] else 0.5
        return math.log(share / (1.0 - share))

    def profile(x: list[float]) -> Hardware:
        return hw.with_constants(**{k: value(k, v) for k, v in zip(free, x)})

    def loss(x: list[float]) -> float:
        h = profile(x)
        total = 0.0
        for m, c in zip(measurements, costs):
            for p, actual in points(m, _predict(c, h, m, cpu_seconds), cpu_seconds=cpu_seconds):
                total += math.log(p / actual) ** 2
        return total

    fitted = hw
    if free:
        x = _nelder_mead(loss, [inverse(k, start[k]) for k in free])
        x = _nelder_mead(loss, x, step=0.1)  # a restart from the best point: the simplex may have collapsed early
        fitted = profile(x)
    rows = []
    for m, c in zip(measurements, costs):
        before, after = _predict(c, hw, m, cpu_seconds), _predict(c, fitted, m, cpu_seconds)
        measured_total = m.busy_s if cpu_seconds else sum(m.stages_s.values()) if m.stages_s else m.total_s
        rows.append({"label": m.label or m.config.label(), "measured_s": measured_total,
                     "before_s": before["predicted_s"], "after_s": after["predicted_s"],
                     "stages_measured": None if cpu_seconds else m.stages_s, "stages_after": after["stages_s"]})
    return fitted, rows


def profile_json(fitted: Hardware, source: str, fitted_names: list[str]) -> str:
    d = fitted.to_dict()
    d["sources"] = [*d["sources"], f"{', '.join(fitted_names)} fitted by `npu-dit plan calibrate` to {source}"]
    d["links"] = {k: {"bandwidth": v["bandwidth"], "latency_s": v["latency_s"],
                      **({"links_per_device": v["links_per_device"]} if v["links_per_device"] != 1 else {})}
                  for k, v in d["links"].items()}
    return json.dumps(d, indent=1)


def check(hw: Hardware, measurements: list[Measurement], costs_for: Callable[[Measurement], dict[str, Any]],
          *, cpu_seconds: bool = False) -> list[dict[str, Any]]:
    """Predicted against measured for runs kept out of the fit (`cpu_seconds`: the busiest rank's CPU seconds)."""
    if cpu_seconds:
        check_cpu_seconds(measurements)
    rows = []
    for m in measurements:
        p = _predict(costs_for(m), hw, m, cpu_seconds)
        measured = m.busy_s if cpu_seconds else sum(m.stages_s.values()) if m.stages_s else m.total_s
        rows.append({"label": m.label or m.config.label(), "measured_s": measured, "after_s": p["predicted_s"],
                     "error": p["predicted_s"] / measured - 1, "stages_measured": None if cpu_seconds else m.stages_s,
                     "stages_after": p["stages_s"]})
    return rows


def format_rows(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"  {title:<62} {'measured':>9} {'predicted':>10} {'error':>7}"]
    for r in rows:
        error = r["after_s"] / r["measured_s"] - 1
        lines.append(f"  {r['label']:<62} {r['measured_s']:8.2f}s {r['after_s']:9.2f}s {error:+7.1%}")
    return "\n".join(lines)
