import operator
import os
import warnings

import pytest
import torch
import torch.fx as fx

import npu_dit.backend as backend_module
from npu_dit.passes.analysis._cache import cached_analysis
from npu_dit.passes.infra import PassResult, PassSpec, UserError, run_passes


class Toy(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def relu_to_sigmoid_pass(gm: fx.GraphModule) -> PassResult:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.relu:
            node.target = torch.sigmoid
            count += 1
    return PassResult(gm, modified=count > 0, counts={"relu_to_sigmoid": count}, notes=[f"{count} relu"])


def failing_pass(gm: fx.GraphModule) -> PassResult:
    raise RuntimeError("cannot handle this graph")


def user_error_pass(gm: fx.GraphModule) -> PassResult:
    raise UserError("pass dynamic=True")


def breaks_graph_pass(gm: fx.GraphModule) -> PassResult:
    # use a value before it is defined: lint must catch it
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    first, last = nodes[0], nodes[-1]
    first.args = (last,) + tuple(first.args[1:])
    return PassResult(gm, modified=True)


def test_runner_rewrites_a_copy_recompiles_times_counts_and_dumps(tmp_path):
    gm = fx.symbolic_trace(Toy())
    x = torch.randn(5)
    rewritten, report = run_passes(
        gm, [PassSpec("relu_to_sigmoid", relu_to_sigmoid_pass), PassSpec("again", relu_to_sigmoid_pass)],
        dump_dir=str(tmp_path), graph_tag="toy",
    )
    assert torch.equal(rewritten(x), torch.sigmoid(x) + 1)  # recompiled
    assert torch.equal(gm(x), torch.relu(x) + 1)  # the captured graph is untouched
    assert [r.name for r in report.records] == ["relu_to_sigmoid", "again"]
    assert [r.modified for r in report.records] == [True, False]
    assert report.counts == {"relu_to_sigmoid": 1}
    assert all(r.seconds >= 0 for r in report.records) and report.records[0].notes == ["1 relu"]
    files = sorted(os.listdir(tmp_path))
    assert files == [
        "toy_01_relu_to_sigmoid_after.txt", "toy_01_relu_to_sigmoid_before.txt",
        "toy_02_again_after.txt", "toy_02_again_before.txt",
    ]
    assert "relu" in (tmp_path / "toy_01_relu_to_sigmoid_before.txt").read_text()
    assert "sigmoid" in (tmp_path / "toy_01_relu_to_sigmoid_after.txt").read_text()


@pytest.mark.parametrize("bad_pass", [failing_pass, breaks_graph_pass])
def test_a_pass_that_fails_falls_back_to_the_captured_graph_with_one_warning(bad_pass):
    gm = fx.symbolic_trace(Toy())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, report = run_passes(gm, [PassSpec("first", relu_to_sigmoid_pass), PassSpec("bad", bad_pass)])
    ours = [w for w in caught if "npu_dit" in str(w.message)]
    assert len(ours) == 1 and "pass 'bad' failed" in str(ours[0].message)
    assert result is gm and report.fell_back  # earlier rewrites are dropped too
    x = torch.randn(4)
    assert torch.equal(result(x), torch.relu(x) + 1)


def test_user_errors_are_raised_not_swallowed():
    gm = fx.symbolic_trace(Toy())
    with pytest.raises(UserError, match="dynamic=True"):
        run_passes(gm, [PassSpec("user", user_error_pass)])


def test_analysis_cache_is_dropped_after_a_modifying_pass():
    calls = []

    @cached_analysis
    def count_calls(gm):
        calls.append(1)
        return sum(1 for n in gm.graph.nodes if n.target is torch.relu)

    gm = fx.symbolic_trace(Toy())
    assert count_calls(gm) == 1 and count_calls(gm) == 1 and len(calls) == 1

    def check_then_rewrite(gm):
        assert count_calls(gm) == 1
        return relu_to_sigmoid_pass(gm)

    rewritten, _ = run_passes(gm, [PassSpec("rewrite", check_then_rewrite)])
    assert count_calls(rewritten) == 0  # recomputed on the rewritten graph


def test_backend_falls_back_and_stays_correct_when_a_pass_fails(monkeypatch):
    monkeypatch.setattr(backend_module, "build_pipeline", lambda cfg, ctx=None, **contexts: [PassSpec("bad", failing_pass)])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="npu_dit")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(x)
        assert torch.equal(out, model(x))
    assert sum("npu_dit" in str(w.message) for w in caught) == 1
    assert backend_module.RECORDS[-1].report.fell_back


def test_backend_dumps_the_captured_graph_when_asked(tmp_path):
    model = torch.nn.Linear(4, 4)
    torch._dynamo.reset()
    torch.compile(model, backend="npu_dit", options={"dump_dir": str(tmp_path)})(torch.randn(2, 4))
    dumped = list(tmp_path.iterdir())
    assert len(dumped) == 1 and dumped[0].name.endswith("captured.txt")
    assert "linear" in dumped[0].read_text()


def _doubling_pass(refresh: bool):
    """A shape-changing pass: cat(x, x) in place of x + 1. With `refresh` it ends as the sharding
    passes do (a fresh propagation from the placeholders); without, its new node copies an old value."""
    from npu_dit.passes.analysis.fake_prop import SymbolMap, copied_placeholder_values, repropagate

    def run(gm: fx.GraphModule) -> PassResult:
        add = next(n for n in gm.graph.nodes if n.target is operator.add)
        with gm.graph.inserting_before(add):
            doubled = gm.graph.call_function(torch.cat, ([add.args[0], add.args[0]],))
        doubled.meta["val"] = add.meta["val"]
        add.replace_all_uses_with(doubled)
        gm.graph.erase_node(add)
        if refresh:
            repropagate(gm, copied_placeholder_values(gm, SymbolMap()))
        return PassResult(gm, modified=True)

    return run


@pytest.mark.parametrize("refresh", [True, False])
def test_the_meta_lint_catches_values_left_from_before_a_rewrite(refresh, monkeypatch):
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.delenv("NPU_DIT_LINT", raising=False)
    gm = fx.symbolic_trace(Toy())
    FakeTensorProp(gm, FakeTensorMode()).propagate(torch.randn(5))  # Dynamo's values, in its own mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewritten, report = run_passes(gm, [PassSpec("double", _doubling_pass(refresh), changes_shapes=True)])
    if refresh:
        assert not report.fell_back, report.fallback_reason
        out = next(n for n in rewritten.graph.nodes if n.op == "output").args[0]
        assert out.meta["val"].shape == (10,)
    else:  # the cat's value is the old add's, from another propagation: stale, the rewrite is dropped
        assert report.fell_back and "stale shapes" in report.fallback_reason, report.fallback_reason
        assert rewritten is gm and len(caught) == 1
