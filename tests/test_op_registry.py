"""The op-semantics registry: every form of a call binds to the same schema names, overloads are
chosen by the arguments' types, and every op of the seed models' graphs has an entry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from npu_dit.passes.ops import semantics


def _graph(fn, *args):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, dynamic=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


H = torch.randn(2, 5, 8)

# (forms written differently that mean the same call, the semantics they must share)
SAME = [
    ([lambda h: torch.roll(h, 2, 1), lambda h: torch.roll(h, shifts=2, dims=1), lambda h: h.roll(2, 1),
      lambda h: h.roll(shifts=(2,), dims=(1,))], ("mix", (1,))),
    ([lambda h: torch.roll(h, 3), lambda h: h.roll(3)], ("mix", None)),
    ([lambda h: h.norm(2, 1), lambda h: torch.norm(h, p=2, dim=1), lambda h: torch.norm(h, 2, -2)], ("reduce", (1,))),
    ([lambda h: torch.std(h, 1), lambda h: h.std(dim=1), lambda h: torch.std(h, -2, True)], ("reduce", (1,))),
    ([lambda h: torch.var(h, 1, True), lambda h: h.var(1, unbiased=True), lambda h: torch.var(h, dim=(1,))],
     ("reduce", (1,))),
    ([lambda h: torch.max(h, h), lambda h: torch.maximum(h, h), lambda h: h.max(h)], ("pointwise", None)),
    ([lambda h: F.layer_norm(h, h.shape[1:]), lambda h: F.layer_norm(h, (5, 8))], ("mix", (1, 2))),
    ([lambda h: F.layer_norm(h, (8,), torch.ones(8), None, 1e-6), lambda h: F.layer_norm(h, [8])], ("mix", (2,))),
    ([lambda h: torch.softmax(h, 1), lambda h: h.softmax(dim=1), lambda h: F.softmax(h, -2)], ("mix", (1,))),
    ([lambda h: torch.cumsum(h, 1), lambda h: h.cumsum(dim=-2)], ("mix", (1,))),
    ([lambda h: torch.flip(h, [1]), lambda h: h.flip(1), lambda h: h.flip(dims=(-2,))], ("mix", (1,))),
    ([lambda h: h.permute(0, 2, 1), lambda h: h.permute((0, 2, 1)), lambda h: torch.permute(h, dims=[0, 2, 1]),
      lambda h: h.transpose(1, 2), lambda h: torch.swapaxes(h, 2, 1), lambda h: h.movedim(2, 1)],
     ("permute", (0, 2, 1))),
]


@pytest.mark.parametrize("forms,expected", SAME, ids=[str(i) for i in range(len(SAME))])
def test_every_form_of_a_call_has_the_same_semantics(forms, expected):
    for form in forms:
        gm = _graph(form, H)
        found = [semantics(n) for n in _calls(gm) if semantics(n) is not None and semantics(n).kind == expected[0]]
        assert found, (expected, [n.format_node() for n in _calls(gm)])
        sem = found[-1]
        assert (sem.kind, sem.dims) == expected, (sem.kind, sem.dims, sem.node.format_node())


def test_overloads_are_chosen_by_the_argument_types():
    gm = _graph(lambda h: torch.std(h, True) + torch.max(h) + torch.max(h, 1)[0].sum(), H)
    kinds = [(semantics(n).kind, semantics(n).dims, semantics(n).keepdim) for n in _calls(gm)
             if n.target in (torch.std, torch.max)]
    assert kinds == [("reduce", None, False), ("reduce", None, False), ("reduce", (1,), False)], kinds


def test_a_bool_given_for_a_float_binds_as_pytorch_takes_it():
    """`F.pad(mask, (1, 0), value=True)` (Mochi's pooler): PyTorch's parser takes the bool as the float
    `value`; the registry binds it too (it had no semantics: an op with no rule on the tokens)."""
    mask = torch.ones(2, 5, dtype=torch.bool)
    gm = _graph(lambda m: F.pad(m[:, None, None, :], (1, 0), value=True), mask)
    (sem,) = [semantics(n) for n in _calls(gm) if semantics(n) is not None and semantics(n).kind == "pad"]
    assert sem.call.args["pad"] == (1, 0) and sem.call.args["value"] is True
    # where an overload takes the bool as a bool, that one is still chosen (`std(h, True)` is `unbiased`)
    gm = _graph(lambda h: torch.std(h, True), H)
    (std,) = [semantics(n) for n in _calls(gm) if n.target is torch.std]
    assert std.call.args.get("unbiased") is True and std.dims is None


def test_in_place_writes_and_views_are_declared():
    def fn(h):
        h = h * 1
        h[:, 0] = 1.0
        h.add_(1)
        v = h.transpose(1, 2)
        F.relu(v, inplace=True)
        return h

    calls = {n.target if isinstance(n.target, str) else getattr(n.target, "__name__", ""): semantics(n)
             for n in _calls(_graph(fn, H))}
    assert calls["setitem"].mutates == ("input",)
    assert calls["add_"].mutates == ("input",)
    assert calls["relu"].mutates == ("input",)
    assert calls["transpose"].aliases and not calls["transpose"].mutates
    assert not calls["mul"].mutates


def test_a_metadata_operand_and_size_positions():
    def fn(h, t):
        return h.type_as(t) * h.shape[1] + torch.full((h.shape[0], 1, 1), h.shape[1]).to(h)

    gm = _graph(fn, H, torch.randn(3))
    type_as = next(semantics(n) for n in _calls(gm) if n.target == "type_as")
    assert type_as.meta_only == ("other",) and len(type_as.tensor_inputs()) == 1
    full = next(semantics(n) for n in _calls(gm) if n.target is torch.full)
    fill = full.call.args["fill_value"]
    assert full.size_arguments() and all(node_is_size(a) for a in full.size_arguments())
    assert fill not in full.size_arguments()  # the fill is a value: a sharded length there means the global one


def node_is_size(node):
    return isinstance(node.meta.get("val", node.meta.get("example_value")), torch.SymInt)


def test_an_op_without_an_entry_has_no_semantics():
    gm = _graph(lambda h: torch.fft.fft(h, dim=1).real, H)
    fft = next(n for n in _calls(gm) if getattr(n.target, "__name__", "") == "fft_fft")
    assert semantics(fft) is None


@pytest.mark.parametrize("key", ["flux", "qwen-edit-masked", "qwen-edit-2509"])
def test_every_op_of_the_seed_models_has_semantics(key, tiny_capture):
    _, _, cap = tiny_capture(key)
    missing = sorted({n.format_node()[:120] for n in _calls(cap.gm) if semantics(n) is None})
    assert not missing, missing
