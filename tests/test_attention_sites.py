import pytest
import torch
import torch.fx as fx

from npu_dit.passes.analysis import attention_sites, module_path


def test_flux_sites_structure(tiny_capture):
    _, _, cap = tiny_capture("flux")
    sites = attention_sites(cap.gm)
    assert len(sites) == 4
    double, single = sites[0], sites[2]
    assert double.kind == "joint" and double.block_kind == "FluxTransformerBlock"
    # FLUX concatenates [text, image]: the added (text) projection comes first in the sequence
    assert [module_path(n) for n in double.q.projections] == [
        "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_q"]
    assert [module_path(n) for n in double.v.projections] == [
        "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_v"]
    assert double.q.norm_modules == ("transformer_blocks.0.attn.norm_added_q", "transformer_blocks.0.attn.norm_q")
    assert double.q.rope_nodes and double.k.rope_nodes and not double.v.rope_nodes
    assert not double.v.norm_modules
    assert [module_path(n) for n in double.out_projections] == [
        "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out"]
    assert (double.num_heads, double.head_dim) == (4, 16)
    assert single.kind == "single" and single.block_kind == "FluxSingleTransformerBlock"
    assert [module_path(n) for n in single.q.projections] == ["single_transformer_blocks.0.attn.to_q"]
    assert [module_path(n) for n in single.out_projections] == ["single_transformer_blocks.0.proj_out"]
    assert single.mask is None


@pytest.mark.parametrize("key, masked", [("qwen-edit", False), ("qwen-edit-masked", True)])
def test_qwen_sites_structure(tiny_capture, key, masked):
    _, _, cap = tiny_capture(key)
    sites = attention_sites(cap.gm)
    assert len(sites) == 3 and all(s.kind == "joint" for s in sites)
    s = sites[1]
    assert [module_path(n) for n in s.k.projections] == [
        "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.1.attn.to_k"]
    assert "transformer_blocks.1.attn.norm_k" in s.k.norm_modules
    assert s.q.rope_nodes and s.k.rope_nodes
    assert [module_path(n) for n in s.out_projections] == [
        "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.attn.to_add_out"]
    assert (s.mask is not None) == masked


@pytest.mark.parametrize("key", ["flux", "qwen-edit"])
def test_zeroing_the_found_q_and_k_projections_makes_attention_uniform(tiny_capture, key):
    """Numerics: q and k of every site come from exactly the projections found (weights and biases
    zeroed -> q = k = 0 -> softmax is uniform -> each output row is the mean of v)."""
    _, _, cap = tiny_capture(key)
    gm = cap.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for site in attention_sites(gm):
        zeroed = {arg for proj in site.q.projections + site.k.projections for arg in proj.args[1:3]}
        inputs = [torch.zeros_like(v) if p in zeroed else v for p, v in zip(placeholders, cap.real_inputs)]
        captured = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n is site.node:
                    captured["out"] = out
                    captured["v"] = self.env[n.kwargs["value"]] if "value" in n.kwargs else self.env[n.args[2]]
                return out

        with torch.no_grad():
            Recorder(gm).run(*inputs)
        expected = captured["v"].mean(dim=-2, keepdim=True).expand_as(captured["out"])
        torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)
