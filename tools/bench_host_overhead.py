"""Host overhead per transformer call of npu-dit's executor and cache controller (issue 20).

bench-deep FLUX (19 double + 38 single blocks = 57 attention sites, hidden 256) is compiled through the
public call; after one real generation the compiled graph (or, with the cache, each of its three
regions) is replaced by a no-op that returns the outputs it returned then, so what is left to time is
the plumbing around it: Dynamo's guard check and frame, the executor (scalar inputs, shape agreement
on a new signature only) and the cache controller (step tracking, the decision, residual bookkeeping).
The executor and controller layers are also timed per computed and per cached step, and in this
thread's CPU time (less moved than the wall time by other jobs on a shared machine).

    PYTHONPATH=. python tools/bench_host_overhead.py [--steps 28] [--generations 20]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import warnings

import torch

CACHE = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08, "max_warmup_steps": 4,
         "separate_cfg": False}  # FLUX: one call per step


def _replay(fn):
    """A callable that runs `fn` once and afterwards returns that first output (a no-op of the same outputs)."""
    saved = []

    def call(*args):
        if not saved:
            saved.append(fn(*args))
        return saved[0]

    return call


def measure(cache: bool, steps: int, generations: int) -> dict[str, float]:
    from npu_dit.models import build_transformer, get_model
    from npu_dit.runtime import cache as cache_runtime
    from npu_dit.runtime.executor import GraphExecutor

    spec = get_model("flux.1-dev")
    config = spec.config("bench-deep")
    model = build_transformer(spec, config, seed=0)
    inputs = spec.example_inputs(config, height=256, width=256, prompt_len=64)
    options = {"cache": dict(CACHE, num_inference_steps=steps)} if cache else {}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
    timesteps = torch.linspace(1.0, 1.0 / steps, steps)

    def generation():
        for t in timesteps:
            compiled(**dict(inputs, timestep=t.reshape(1)))

    with torch.no_grad():
        compiled(**dict(inputs, timestep=timesteps[:1]))  # compiles
        if cache:
            controller = cache_runtime.latest()
            controller.front, controller.middle, controller.back = (
                _replay(controller.front), _replay(controller.middle), _replay(controller.back))
        else:
            (executor,) = [o for o in gc.get_objects() if isinstance(o, GraphExecutor)]  # Ulysses / TP runs
            executor.compiled = _replay(executor.compiled)
        generation()  # the no-ops record their outputs
        per_call = []
        for _ in range(generations):
            start = time.perf_counter()
            generation()
            per_call.append((time.perf_counter() - start) / steps)
        # the same calls one layer down: the executor (with the controller inside) on the arguments
        # Dynamo handed it, and the controller alone on the arguments the executor handed it
        with warnings.catch_warnings():  # gc.get_objects() touches deprecated module attributes
            warnings.simplefilter("ignore")
            (executor,) = [o for o in gc.get_objects() if isinstance(o, GraphExecutor)]
        executor_args, controller_args = [], []

        class Recording(type(executor)):
            def __call__(self, *args):
                executor_args.append(args)
                return super().__call__(*args)

        executor.__class__ = Recording
        inner = executor.compiled
        executor.compiled = lambda *args: controller_args.append(args) or inner(*args)
        generation()
        executor.__class__, executor.compiled = Recording.__mro__[1], inner
        layers = {"executor": (executor, executor_args), "controller": (inner, controller_args)}
        pattern = controller.pattern() if cache else "1" * steps
        by_kind, cpu = {}, {}
        for name, (fn, recorded) in layers.items():
            # wall time, and this thread's CPU time (on a shared machine the wall time also counts
            # the time other processes held the core)
            times, cpu_times, kinds = [], [], {"1": [], "0": []}  # kinds: computed ("1") and cached ("0") steps
            for _ in range(generations):
                per_kind = {"1": 0.0, "0": 0.0}
                start, cpu_start = time.perf_counter(), time.thread_time()
                for args, kind in zip(recorded, pattern):
                    t = time.perf_counter()
                    fn(*args)
                    per_kind[kind] += time.perf_counter() - t
                times.append((time.perf_counter() - start) / len(recorded))
                cpu_times.append((time.thread_time() - cpu_start) / len(recorded))
                for kind, seconds in per_kind.items():
                    if pattern.count(kind):
                        kinds[kind].append(seconds / pattern.count(kind))
            layers[name] = statistics.median(times) * 1e6
            cpu[name] = statistics.median(cpu_times) * 1e6
            by_kind[name] = {kind: statistics.median(v) * 1e6 for kind, v in kinds.items() if v}
    result = {"us_per_call_median": statistics.median(per_call) * 1e6, "us_per_call_min": min(per_call) * 1e6,
              "executor_us": layers["executor"], "controller_us": layers["controller"], "by_kind": by_kind,
              "cpu_us": cpu}
    if cache:
        result["controller_outside_regions_us"] = controller.overhead()["seconds_per_call"] * 1e6
        result["pattern"] = controller.pattern()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--generations", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    # one process without the cache has nothing to time: the backend returns the inner graph itself
    r = measure(True, args.steps, args.generations)
    print(f"cache F1B0, pattern {r['pattern']}, us per call (median over {args.generations} generations):")
    print(f"  whole compiled call (Dynamo's frame and guards, the model's eager wrapper, executor, controller): "
          f"{r['us_per_call_median']:.0f} (min {r['us_per_call_min']:.0f})")
    for name, label in (("executor", "executor + controller"), ("controller", "controller alone")):
        kinds = r["by_kind"][name]
        print(f"  {label}: {r[name + '_us']:.0f} (computed steps {kinds.get('1', 0):.0f}, cached steps "
              f"{kinds.get('0', 0):.0f}; CPU time {r['cpu_us'][name]:.0f})")


if __name__ == "__main__":
    main()
