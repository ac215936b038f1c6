import json

import pytest

from npu_dit.tools.cli import main
from tests.conftest import tiny_model_and_inputs


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_full_size_flux_on_the_meta_device(capsys):
    code, out, err = run_cli(capsys, "inspect", "flux.1-dev", "--height", "1024", "--width", "1024",
                             "--prompt-len", "512", "--ulysses-degree", "2", "--cfg-degree", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["parameters"]["count"] > 11.8e9  # FLUX.1-dev: 11.9 B parameters
    assert report["blocks"]["count"] == 57 and report["blocks"]["all_contiguous"]
    assert report["attention"]["count"] == 57
    assert report["attention"]["by_kind"] == {
        "FluxTransformerBlock (joint)": 19, "FluxSingleTransformerBlock (single)": 38}
    assert {s["heads"] for s in report["attention"]["sites"]} == {24}
    inputs = {(d["name"], d["dim"]) for d in report["token_dims"]["inputs"]}
    assert inputs == {("hidden_states", 1), ("encoder_hidden_states", 1), ("img_ids", 0), ("txt_ids", 0)}
    assert all(d["dynamic"] for d in report["token_dims"]["inputs"])
    assert [(d["name"], d["dim"]) for d in report["token_dims"]["outputs"]] == [("output[0]", 1)]
    examples = sorted(s["example"] for s in report["token_dims"]["segments"])
    assert examples == [512, 4096]  # 512 text tokens, 4096 image tokens at 1024x1024
    assert report["timings"]["analysis_s"] < 30.0  # a sanity bound only: the figure is measured in docs/BENCHMARKS.md
    # sync Ulysses-2: every site wrapped in 2 all-to-alls (Q, K and V in one, the output); the
    # per-layer volume is still DeepSpeed's 4*N*h/P
    comm = report["communication"]
    assert comm["collectives"]["all_to_all (seq->heads, Q/K/V in one)"]["count"] == 57
    assert "all_to_all (seq->heads)" not in comm["collectives"]
    assert comm["collectives"]["all_to_all (heads->seq)"]["count"] == 57
    n, h, p, bf16 = 4096 + 512, 24 * 128, 2, 2
    assert comm["all_to_all_bytes_per_layer"] == comm["deepspeed_formula_bytes_per_layer"] == 4 * n * h // p * bf16
    # CFG-2 x Ulysses-2: each rank runs one call per step and exchanges the output [1, 4096, 64] once
    cfg = report["cfg"]
    assert cfg["mesh"] == {"cfg": 2, "ulysses": 2, "tp": 1} and cfg["ranks"] == 4
    assert cfg["exchange_bytes_per_step"] == 4096 * 64 * bf16
    assert cfg["bytes_per_step"] == comm["bytes_per_step"] + 4096 * 64 * bf16
    assert cfg["without_cfg_bytes_per_step"] == 2 * comm["bytes_per_step"]


def test_inspect_tiny_qwen_edit_2509_text_report(capsys):
    code, out, err = run_cli(capsys, "inspect", "qwen-image-edit-2509", "--size", "tiny", "--height", "128",
                             "--width", "128", "--prompt-len", "10", "--input-image", "128x128",
                             "--input-image", "64x96", "--dtype", "float32")
    assert code == 0, err
    assert "attention sites: 3" in out
    assert "hidden_states" in out and "pos_embed: freqs" in out
    assert "Tracing with Dynamo" in err  # progress goes to stderr


def test_inspect_dump_writes_the_captured_graph(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", "flux.1-dev", "--size", "tiny", "--height", "64", "--width", "64",
                           "--prompt-len", "8", "--quiet", "--dump", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "captured.txt").read_text().count("scaled_dot_product_attention") >= 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "flux.2"], "unknown model 'flux.2'; known models: flux.1-dev"),
        (["inspect", "flux.1-dev", "--size", "tiny", "--height", "100"], "height=100 is not a multiple of 16"),
        (["inspect", "qwen-image-edit", "--size", "tiny", "--input-image", "64x64", "--input-image", "64x64"],
         "takes at most 1 input image"),
        (["inspect", "flux.1-dev", "--size", "tiny", "--options", '{"bogus": 1}'], "unknown npu_dit option(s) 'bogus'"),
    ],
)
def test_inspect_bad_input_is_a_clear_error(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err


def test_models_lists_the_zoo(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for name in ["flux.1-dev", "qwen-image-edit", "qwen-image-edit-2509", "qwen-image-lightning",
                 "qwen-image-edit-lightning", "qwen-image-edit-2509-lightning"]:
        assert name in out


def test_inspect_shows_cache_regions_with_parameter_and_flop_shares(capsys):
    code, out, err = run_cli(capsys, "inspect", "flux.1-dev", "--size", "tiny", "--height", "64", "--width", "64",
                             "--prompt-len", "8", "--dtype", "float32", "--quiet", "--json",
                             "--cache", '{"Fn_compute_blocks": 1, "Bn_compute_blocks": 1}')
    assert code == 0, err
    regions = json.loads(out)["cache_regions"]
    assert [r["region"] for r in regions] == ["front", "middle", "back"]
    assert [r["blocks"] for r in regions] == [1, 2, 1]
    # against the model itself: the middle region holds exactly the second double block and the first
    # single block, and every parameter of the model lands in one region
    _, model, _ = tiny_model_and_inputs("flux")

    def nbytes(*modules):
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    middle = nbytes(model.transformer_blocks[1], model.single_transformer_blocks[0])
    assert regions[1]["parameter_bytes"] == middle, (regions[1]["parameter_bytes"], middle)
    assert sum(r["parameter_bytes"] for r in regions) == nbytes(model)
    assert regions[0]["parameter_bytes"] > nbytes(model.transformer_blocks[0])  # and the embedders
    assert regions[2]["parameter_bytes"] > nbytes(model.single_transformer_blocks[1])  # and the output norm
    shares = [r["parameter_bytes"] / nbytes(model) for r in regions]
    assert [r["parameter_share"] for r in regions] == pytest.approx(shares)
    assert abs(sum(r["flop_share"] for r in regions) - 1) < 1e-9
    assert regions[1]["flops"] > regions[0]["flops"] > 0


def test_help_shows_every_default_once():
    import argparse

    from npu_dit.tools.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    checked = 0
    for parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default is not None and not isinstance(action.default, bool) \
                    and action.default is not argparse.SUPPRESS:
                assert f"default: {action.default}" in text or "default" in (action.help or ""), (parser.prog, action.dest)
                checked += 1
        assert "(default: None)" not in text and "benchmark commands later" not in text, parser.prog
    assert checked > 20
