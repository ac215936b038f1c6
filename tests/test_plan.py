"""`npu-dit plan`: the enumeration (legal configurations only), the calibration (recovers constants it was
given), monotonic sanity, the JSON schema, and the CPU prediction against a real 2-rank run.

The cost tables in the first tests are written by hand (numbers in the form `extract.model_costs` returns),
so the checks do not depend on a capture; the last two go through the CLI and a real Gloo run."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess

import pytest

from npu_dit.planner import calibrate, hardware, model
from npu_dit.planner.model import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(kept: float, sharded: float) -> dict[str, float]:
    return {"kept": kept, "sharded": sharded}


def hand_costs(*, heads: int = 24, true_cfg: bool = True) -> dict:
    """A transformer of 1e14 matmul FLOPs per call, 2e13 attention FLOPs, 4e10 memory-bound bytes, 2e10 bytes of
    parameters; Ulysses shards 99 % of the compute, TP 95 % of the matmuls and half of the memory traffic."""
    fields = {"matmul_flops": 1e14, "attention_flops": 2e13, "score_elements": 1e9, "memory_bytes": 4e10,
              "parameter_bytes": 2e10, "activation_peak_bytes": 2e9}
    return {
        "heads": heads, "head_dim": 128, "true_cfg": true_cfg, "default_steps": 28,
        "transformer": {**fields, "output_bytes": 1e7, "attention_calls": 57},
        "ulysses": {"split": {"matmul_flops": _split(1e12, 9.9e13), "attention_flops": _split(0, 2e13),
                              "score_elements": _split(0, 1e9), "memory_bytes": _split(4e8, 3.96e10),
                              "parameter_bytes": _split(2e10, 0), "activation_peak_bytes": _split(2e8, 1.8e9)},
                    "qkv_bytes_at_2": 3e9, "out_bytes_at_2": 1e9, "collectives_at_2": 114,
                    # 57 sites: Q/K/V each behind a projection's worth of work, the output behind nothing
                    "async_windows_at_2": [{"bytes": 1e9 / 57, "flops": 5e11, "memory_bytes": 1e8}] * 171
                    + [{"bytes": 1e9 / 57, "flops": 0.0, "memory_bytes": 0.0}] * 57},
        "tp": {"split": {"matmul_flops": _split(5e12, 9.5e13), "attention_flops": _split(0, 2e13),
                         "score_elements": _split(0, 1e9), "memory_bytes": _split(2e10, 2e10),
                         "parameter_bytes": _split(1e9, 1.9e10), "activation_peak_bytes": _split(1e9, 1e9)},
               "all_reduce_bytes": 2e9, "all_gather_bytes_at_2": 1e6, "collectives": 230},
        "stages": {"text_encoders": [{"matmul_flops": 5e12, "attention_flops": 0, "memory_bytes": 1e9,
                                      "parameter_bytes": 1e10, "layers": 24, "hidden_bytes": 4e6}],
                   "text_encodes": 2 if true_cfg else 1,
                   "vae": [{"matmul_flops": 2e12, "attention_flops": 0, "memory_bytes": 5e9, "parameter_bytes": 2e8}]},
    }


ATLAS = hardware.load("atlas-800i-a2")


@pytest.mark.parametrize("devices,heads,true_cfg", [(1, 24, True), (4, 24, False), (8, 24, True), (6, 24, True),
                                                     (4, 3, True), (16, 24, True)])
def test_enumeration_is_exactly_the_legal_configurations(devices, heads, true_cfg):
    rows = model.enumerate_configs(hand_costs(heads=heads, true_cfg=true_cfg), ATLAS, devices)
    # the legal set, written out from the rules: ulysses x tp x cfg = devices; TP divides the heads; Ulysses at
    # most the heads (uneven heads are padded); CFG 2 only for true CFG; async only with Ulysses; TEP / VAE
    # parallel only with several devices; every attention kernel the profile has
    expected = set()
    for u, t, c in itertools.product(range(1, devices + 1), repeat=3):
        if u * t * c != devices or heads % t or u > heads or c > (2 if true_cfg else 1):
            continue
        for a, tep, vae in itertools.product((False, True), repeat=3):
            if (a and u == 1) or ((tep or vae) and devices == 1):
                continue
            for backend in ("sdpa", "npu_fia"):
                expected.add(Config(u, a, t, c, tep, vae, backend))
    assert set(rows) == expected and len(rows) == len(expected)
    assert all(r.devices == devices for r in rows)
    if true_cfg and devices % 2 == 0:
        assert any(r.cfg_degree == 2 for r in rows)
    if not true_cfg:
        assert all(r.cfg_degree == 1 for r in rows)


def test_calibration_recovers_the_constants_it_was_given():
    costs = {"a": hand_costs(true_cfg=False), "b": hand_costs(heads=24, true_cfg=True)}
    truth = ATLAS.with_constants(compute=0.43, link=0.31, memory=0.82)
    runs = []
    for key, config in [("a", Config()), ("a", Config(ulysses_degree=2)), ("a", Config(ulysses_degree=4, tp_degree=2)),
                        ("b", Config(tp_degree=2, cfg_degree=2)), ("b", Config(ulysses_degree=8))]:
        p = model.predict(costs[key], truth, config, steps=28)
        runs.append(calibrate.Measurement(key, "full", 1024, 1024, 28, None, config,
                                          {k: v for k, v in p["stages_s"].items()}, None))
    start = ATLAS.with_constants(compute=0.9, link=0.9, memory=0.3)
    fitted, rows = calibrate.calibrate(start, runs, lambda m: costs[m.model])
    for name in ("compute", "link", "memory"):
        assert fitted.efficiency[name] == pytest.approx(truth.efficiency[name], rel=0.02), name
    assert all(abs(r["after_s"] / r["measured_s"] - 1) < 1e-3 for r in rows)


def test_calibration_fits_no_more_constants_than_points():
    costs = hand_costs(true_cfg=False)
    p = model.predict(costs, ATLAS, Config(), steps=28)
    run = calibrate.Measurement("m", "full", 1024, 1024, 28, None, Config(), None, 2 * p["predicted_s"])
    fitted, _ = calibrate.calibrate(ATLAS, [run], lambda m: costs)
    assert fitted.efficiency["link"] == ATLAS.efficiency["link"]  # one total: compute only
    assert fitted.efficiency["memory"] == ATLAS.efficiency["memory"]
    assert model.predict(costs, fitted, Config(), steps=28)["predicted_s"] == pytest.approx(2 * p["predicted_s"], rel=1e-3)


def test_cpu_seconds_calibration_recovers_compute_and_needs_cpu_seconds():
    """`plan calibrate --cpu-seconds`: the busiest rank's CPU seconds (what a rank computes; links and shared
    cores cost none) fitted with the compute efficiency alone, whatever the wall times say."""
    costs = hand_costs(true_cfg=False)
    cpu = hardware.load("cpu")
    truth = cpu.with_constants(compute=0.37)
    runs = [calibrate.Measurement("m", "bench", 512, 512, 4, None, config, {"denoising": 1e6}, None, label=str(i),
                                  busy_s=model.busy_s(costs, truth, config, steps=4))
            for i, config in enumerate([Config(), Config(ulysses_degree=2)])]
    fitted, rows = calibrate.calibrate(cpu, runs, lambda m: costs, cpu_seconds=True)
    assert calibrate.fitted_names(cpu, runs, cpu_seconds=True) == ["compute"]
    assert fitted.efficiency["compute"] == pytest.approx(0.37, rel=1e-3)
    assert (fitted.efficiency["link"], fitted.concurrent_devices) == (cpu.efficiency["link"], cpu.concurrent_devices)
    assert all(r["after_s"] == pytest.approx(r["measured_s"], rel=1e-3) for r in rows)
    with pytest.raises(ValueError, match="--cpu-seconds: x carries no CPU seconds"):
        calibrate.check(fitted, [dataclasses.replace(runs[0], busy_s=None, label="x")], lambda m: costs, cpu_seconds=True)


def test_measurement_files_carry_edit_images_and_cfg():
    """The seed file's Qwen rows name their input images and text length (cache-dit's qwen_image_edit example:
    Qwen-Image-Edit-2509 with two images); `bench seed --json` rows with --cfg-parallel are CFG-2."""
    with open(os.path.join(REPO, "npu_dit", "planner", "measurements", "atlas-800i-a2-seed.json")) as f:
        seed = calibrate.load_measurements(json.load(f))
    qwen = [m for m in seed if m.model.startswith("qwen")]
    assert len(qwen) == 4 and all(m.input_images == [(1024, 1024), (1024, 1024)] and m.prompt_len for m in qwen)
    assert [m.use for m in seed].count("calibrate") == 2
    bench = {"size": "bench", "tables": {"q": {"model": "qwen-image-edit", "height": 256, "width": 256, "steps": 4, "rows": [
        {"label": "CFG-2", "flags": ["--cfg-parallel"], "stages_s": {"denoising": 1.0}},
        {"label": "CFG-2 x U2", "flags": ["--cfg-parallel", "--ulysses", "2", "--text-encoder-parallel"],
         "stages_s": {"denoising": 1.0}}]}}}
    rows = calibrate.load_measurements(bench)
    assert [(m.config.cfg_degree, m.config.ulysses_degree, m.config.text_encoder_parallel) for m in rows] == [
        (2, 1, False), (2, 2, True)]


def test_full_mesh_links_carry_each_peer_on_its_own_link():
    """A full mesh (Atlas HCCS: 7 links per chip) moves an all-to-all among 4 cards over 3 links at once; between 2
    cards it is one link either way."""
    costs = hand_costs(true_cfg=False)
    mesh = ATLAS
    assert mesh.links["intra"].links_per_device == 7
    one = dataclasses.replace(ATLAS, links={k: dataclasses.replace(v, links_per_device=1) for k, v in ATLAS.links.items()})
    two = [model.predict(costs, h, Config(ulysses_degree=2), steps=28)["exposed_collective_s_per_step"] for h in (mesh, one)]
    assert two[0] == two[1]
    four = [model.predict(costs, h, Config(ulysses_degree=4), steps=28)["exposed_collective_s_per_step"] for h in (mesh, one)]
    latency = 114 * ATLAS.links["intra"].latency_s / ATLAS.efficiency["link"]
    assert four[0] - latency == pytest.approx((four[1] - latency) / 3, rel=1e-9)


def test_convolutions_run_at_their_kernel_class_factor():
    """A profile's `kernels` factor slows the VAE's convolution FLOPs of that kind (measured on the CPU by
    `conv_bench`), leaves the rest, and VAE parallel divides the slower work too."""
    costs = hand_costs(true_cfg=False)
    costs["stages"]["vae"][0]["conv_flops"] = {"conv3d": 1.5e12, "conv2d": 5e11}
    base = dataclasses.replace(ATLAS, kernels={})
    slow = dataclasses.replace(ATLAS, kernels={"conv3d": 0.25})
    flops = ATLAS.peak_flops * ATLAS.efficiency["compute"]
    for config in (Config(), Config(ulysses_degree=4, vae_parallel=True)):
        a, b = (model.predict(costs, h, config, steps=28) for h in (base, slow))
        degree = config.devices if config.vae_parallel else 1
        assert b["stages_s"]["vae"] - a["stages_s"]["vae"] == pytest.approx(1.5e12 * 3 / flops / degree, rel=1e-9)
        assert (b["stages_s"]["denoising"], b["stages_s"]["text_encoding"]) == (a["stages_s"]["denoising"],
                                                                               a["stages_s"]["text_encoding"])
    cpu = hardware.load("cpu")  # the CPU profile carries its measured factors, PyTorch's own kernel the slowest
    assert cpu.kernels["conv3d_native"] < cpu.kernels["conv3d"] < 1
    # which kernel PyTorch's CPU rule picks: its own below N*C*D*H = 20480, oneDNN above, or for batches
    import torch

    from npu_dit.planner.costs import conv_class

    w = torch.empty(8, 8, 3, 3, 3, device="meta")
    assert conv_class(torch.empty(1, 8, 3, 512, 512, device="meta"), w) == "conv3d_native"
    assert conv_class(torch.empty(1, 8, 3, 1024, 1024, device="meta"), w) == "conv3d"
    assert conv_class(torch.empty(2, 8, 3, 512, 512, device="meta"), w) == "conv3d"
    assert conv_class(torch.empty(1, 8, 512, 512, device="meta"), torch.empty(8, 8, 3, 3, device="meta")) == "conv2d"


def _faster(hw: hardware.Hardware, factor: float, what: str) -> hardware.Hardware:
    if what == "link":
        return dataclasses.replace(hw, links={k: dataclasses.replace(v, bandwidth=v.bandwidth * factor)
                                              for k, v in hw.links.items()})
    if what == "latency":
        return dataclasses.replace(hw, links={k: dataclasses.replace(v, latency_s=v.latency_s / factor)
                                              for k, v in hw.links.items()})
    return dataclasses.replace(hw, **{what: getattr(hw, what) * factor})


@pytest.mark.parametrize("profile", ["atlas-800i-a2", "cpu", "h100"])
@pytest.mark.parametrize("what", ["link", "latency", "peak_flops", "memory_bandwidth"])
def test_more_bandwidth_or_compute_never_predicts_slower(profile, what):
    hw = hardware.load(profile)
    costs = hand_costs()
    for devices in (1, 2, 4, 8):
        for config in model.enumerate_configs(costs, hw, devices):
            base = model.predict(costs, hw, config, steps=28)["predicted_s"]
            for factor in (1.5, 4.0):
                assert model.predict(costs, _faster(hw, factor, what), config, steps=28)["predicted_s"] <= base * (1 + 1e-12)


def test_more_devices_of_one_kind_never_predicts_slower_compute():
    costs = hand_costs(true_cfg=False)
    free_links = _faster(_faster(ATLAS, 1e9, "link"), 1e9, "latency")  # what is left is compute
    times = [model.predict(costs, free_links, Config(ulysses_degree=u), steps=28)["stages_s"]["denoising"]
             for u in (1, 2, 4, 8)]
    assert times == sorted(times, reverse=True)
    sent = [model.predict(costs, ATLAS, Config(ulysses_degree=u), steps=28)["bytes_per_step"] for u in (2, 4, 8)]
    assert sent == sorted(sent, reverse=True)  # 4 N h / P per rank


def test_cfg_parallel_pays_its_learning_step_in_wall_time_not_in_cpu_time():
    """CFG-2 learns the pairing from a pipeline's first generation (or one with a new negative prompt): that
    step's two calls run one after the other, so with free links S steps take S + 1 call times against 2 S
    on one device, and the waiting branch's rank computes nothing meanwhile (its busy time is S calls). A
    repeated generation starts paired: S call times. A measured run says which it was (`generate --json`:
    steps - cfg_parallel_steps)."""
    costs = hand_costs(true_cfg=True)
    free = _faster(_faster(ATLAS, 1e9, "link"), 1e9, "latency")
    for steps in (4, 28):
        one = model.predict(costs, free, Config(), steps=steps)
        call_s = one["stages_s"]["denoising"] / (2 * steps)
        repeated = model.predict(costs, free, Config(cfg_degree=2), steps=steps)
        assert repeated["stages_s"]["denoising"] == pytest.approx(steps * call_s, rel=1e-6)
        assert repeated["cfg_learning_wait_s"] == 0
        first = model.predict(costs, free, Config(cfg_degree=2), steps=steps, cfg_learning_steps=1)
        assert first["stages_s"]["denoising"] == pytest.approx((steps + 1) * call_s, rel=1e-6)
        assert first["cfg_learning_wait_s"] == pytest.approx(call_s, rel=1e-6)
        busy = model.busy_s(costs, free, Config(cfg_degree=2), steps=steps, cfg_learning_steps=1)
        assert busy == pytest.approx(first["predicted_s"] - call_s, rel=1e-6)
        assert busy == pytest.approx(model.busy_s(costs, free, Config(cfg_degree=2), steps=steps), rel=1e-6)
    report = {"model": "qwen-image-edit", "weights": "bench random (offline)", "height": 256, "width": 256,
              "steps": 4, "world_size": 2, "options": {"cfg_degree": 2}, "stages_s": {"denoising": 1.0}}
    assert calibrate.load_measurements({**report, "cfg_parallel_steps": 3})[0].cfg_learning_steps == 1
    assert calibrate.load_measurements({**report, "cfg_parallel_steps": 4})[0].cfg_learning_steps == 0


def test_async_hides_at_most_the_transfers():
    costs = hand_costs(true_cfg=False)
    for u in (2, 4, 8):
        sync = model.predict(costs, ATLAS, Config(ulysses_degree=u), steps=28)
        overlapped = model.predict(costs, ATLAS, Config(ulysses_degree=u, async_ulysses=True), steps=28)
        assert overlapped["predicted_s"] < sync["predicted_s"]
        # the output all-to-all has an empty window: at least its transfer stays exposed
        assert overlapped["exposed_collective_s_per_step"] > 0.2 * sync["exposed_collective_s_per_step"]


def test_bad_profile_and_devices_are_clear_errors(tmp_path, capsys):
    from npu_dit.tools.cli import main

    assert main(["plan", "flux.1-dev", "--hardware", "tpu-v9", "--devices", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tpu-v9" in err[0] and "atlas-800i-a2" in err[0]
    assert main(["plan", "calibrate", "--hardware", "cpu"]) == 2
    assert "--from" in capsys.readouterr().err
    seed = os.path.join(REPO, "npu_dit", "planner", "measurements", "atlas-800i-a2-seed.json")
    assert main(["plan", "calibrate", "--hardware", "atlas-800i-a2", "--from", seed, "--cpu-seconds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # published totals carry no CPU seconds: refused before any capture
    assert len(err) == 1 and "--cpu-seconds" in err[0] and "generate --json" in err[0]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({**hardware.load("cpu").to_dict(), "free": ["compute", "link", "memory", "concurrent_devices"]}))
    with pytest.raises(ValueError, match="at most 3"):
        hardware.load(str(bad))


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan-cache")
    os.environ["NPU_DIT_PLAN_CACHE"] = str(path)
    yield path
    os.environ.pop("NPU_DIT_PLAN_CACHE", None)


def test_json_schema_on_a_captured_tiny_model(plan_cache, capsys):
    from npu_dit.tools.cli import main

    assert main(["plan", "qwen-image-edit", "--size", "tiny", "--height", "128", "--width", "128", "--devices", "4",
                 "--hardware", "h100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"model", "hardware", "devices", "height", "width", "steps", "configs"} <= set(report)
    assert (report["model"], report["hardware"], report["devices"], report["steps"]) == ("qwen-image-edit", "h100", 4, 50)
    keys = {"ulysses_degree", "async_ulysses", "tp_degree", "cfg_degree", "text_encoder_parallel", "vae_parallel",
            "attention_backend", "predicted_s", "stages_s", "peak_memory_gib", "bytes_per_step", "fits"}
    for row in report["configs"]:
        assert keys <= set(row)
        assert row["ulysses_degree"] * row["tp_degree"] * row["cfg_degree"] == 4
        assert set(row["stages_s"]) == {"text_encoding", "denoising", "vae"}
        assert row["predicted_s"] == pytest.approx(sum(row["stages_s"].values()))
        assert row["predicted_s"] > 0 and row["peak_memory_gib"] > 0 and isinstance(row["fits"], bool)
    assert any(r["cfg_degree"] == 2 for r in report["configs"])  # the edit pipeline runs true CFG
    times = [r["predicted_s"] for r in report["configs"] if r["fits"]]
    assert times == sorted(times)
    assert [r["recommended"] for r in report["configs"]].count(True) == 1 and report["configs"][0]["recommended"]
    # the costs behind it (cached by the call above): Ulysses keeps every weight on every rank, TP splits them
    import torch

    from npu_dit.planner.extract import model_costs

    costs = model_costs("qwen-image-edit", size="tiny", height=128, width=128, dtype=torch.float32)
    assert costs["ulysses"]["split"]["parameter_bytes"]["sharded"] == 0
    assert costs["tp"]["split"]["parameter_bytes"]["sharded"] > 0.8 * costs["transformer"]["parameter_bytes"]
    assert costs["ulysses"]["split"]["matmul_flops"]["sharded"] > 0.9 * costs["transformer"]["matmul_flops"]
    assert costs["ulysses"]["async_windows_at_2"] and costs["tp"]["all_reduce_bytes"] > 0
    # an entry cached before a change to the stage costs (no `stages_version`) gets its stages counted again,
    # its transformer costs kept (no new capture)
    from npu_dit.planner.extract import STAGES_VERSION

    [path] = [p for p in plan_cache.iterdir() if json.loads(p.read_text())["model"] == "qwen-image-edit"]
    stale = {**costs, "stages": {"text_encoders": [], "text_encodes": 0, "vae": []}, "transformer": {**costs["transformer"], "marker": 1}}
    stale.pop("stages_version")
    path.write_text(json.dumps(stale))
    refreshed = model_costs("qwen-image-edit", size="tiny", height=128, width=128, dtype=torch.float32)
    assert refreshed["stages"] == costs["stages"] and refreshed["transformer"]["marker"] == 1
    assert json.loads(path.read_text())["stages_version"] == STAGES_VERSION


def _generate(ranks: int, flags: list[str], tmp_path) -> dict:
    from npu_dit.tools.bench_seed import generate_launcher, parse_report

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = str(tmp_path / f"r{ranks}.png")
    command = [*generate_launcher(ranks), "flux.1-dev", "--size", "bench", "--height", "256", "--width", "256",
               "--steps", "2", "--warmup", "1", "--repeat", "3", "--json", "--quiet", "--out", out, *flags]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return parse_report(done.stdout)


def test_cpu_prediction_against_a_real_two_rank_run(plan_cache, tmp_path):
    """The bench FLUX pipeline, 1 rank and Ulysses-2 on 2 real Gloo ranks. The cpu profile's compute
    efficiency is fitted to the 1-rank run; the 2-rank run's busiest rank must then be predicted within 20 %.
    Compared in CPU seconds (the work each rank does), which other jobs on this shared machine do not move
    as they move the wall time, each the least of 3 timed runs (`--repeat 3`: one run of the serial pipeline
    under the suite's other worker once took 4.06 CPU s against 2.9-3.5 s alone, a 21 % miss); docs/PLANNER.md
    compares wall times measured back to back."""
    import torch

    from npu_dit.planner.extract import model_costs

    one, two = _generate(1, [], tmp_path), _generate(2, ["--ulysses", "2"], tmp_path)
    serial, ulysses = calibrate.load_measurements(one)[0], calibrate.load_measurements(two)[0]
    assert ulysses.config.ulysses_degree == 2

    def costs_for(m):
        return model_costs(m.model, size=m.size, height=m.height, width=m.width, prompt_len=m.prompt_len,
                           input_images=m.input_images, dtype=getattr(torch, m.dtype))

    # `plan calibrate --cpu-seconds`: one point, the compute efficiency only
    fitted, _ = calibrate.calibrate(hardware.load("cpu"), [serial], costs_for, cpu_seconds=True)
    [row] = calibrate.check(fitted, [ulysses], costs_for, cpu_seconds=True)
    assert row["measured_s"] == max(rank["cpu_s"] for rank in two["peak_memory_per_rank"])
    assert abs(row["error"]) < 0.20, (row, serial.busy_s)
