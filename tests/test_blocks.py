import pytest
import torch
import torch.fx as fx

from npu_dit.passes.analysis import block_index_of, module_path, normalize_path, transformer_blocks


@pytest.mark.parametrize(
    "source, expected",
    [
        ("L['self'].__dict__['_modules']['transformer_blocks'].0.attn", "transformer_blocks.0.attn"),
        ("L['self'].__dict__['_modules']['x_embedder']", "x_embedder"),
        ("L['self']._modules['norm_out']._modules['linear']", "norm_out.linear"),
        ("L['self'].transformer_blocks[3].ff.net[0]", "transformer_blocks.3.ff.net.0"),
        ("L['self']", ""),
    ],
)
def test_normalize_path(source, expected):
    assert normalize_path(source) == expected


def test_flux_blocks_in_execution_order(tiny_capture):
    _, _, cap = tiny_capture("flux")
    blocks = transformer_blocks(cap.gm)
    assert [b.path for b in blocks] == [
        "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1",
    ]
    assert [b.kind for b in blocks] == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2
    assert all(b.contiguous for b in blocks)
    assert all(a.last < b.first for a, b in zip(blocks, blocks[1:]))


def test_qwen_blocks(tiny_capture):
    _, _, cap = tiny_capture("qwen-edit")
    blocks = transformer_blocks(cap.gm)
    assert [b.path for b in blocks] == [f"transformer_blocks.{i}" for i in range(3)]
    assert {b.kind for b in blocks} == {"QwenImageTransformerBlock"}


def test_every_linear_is_attributed_to_its_module(tiny_capture):
    model, _, cap = tiny_capture("flux")
    linear_modules = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear_nodes = [n for n in cap.gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    assert {module_path(n) for n in linear_nodes} == linear_modules


def test_block_outputs_equal_the_real_modules_outputs(tiny_capture):
    """Numerics: the values leaving each block's node range are exactly what the module returned."""
    model, inputs, cap = tiny_capture("flux")
    recorded = {}
    hooks = []
    for path in ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]:
        module = model.get_submodule(path)
        hooks.append(module.register_forward_hook(lambda m, a, out, path=path: recorded.__setitem__(path, out)))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()

    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Recorder(cap.gm).run(*cap.real_inputs)
    owner = block_index_of(cap.gm)
    for block in transformer_blocks(cap.gm):
        leaving = [
            n for n, b in owner.items()
            if b == block.index and any(owner.get(u) != block.index for u in n.users) and isinstance(values[n], torch.Tensor)
        ]
        expected = recorded[block.path]
        # whatever flows out of the block's node range is exactly what the module returned
        assert leaving, block.path
        for n in leaving:
            assert any(values[n].shape == t.shape and torch.equal(values[n], t) for t in expected), (block.path, n)
