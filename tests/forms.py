"""Ops written in every form a model may use them in (positional, keyword, method, in place, a size
used as a value), applied to the image tokens of a small joint-attention model. Each form says
what the Ulysses rewrite must do with it: "refuse" (it mixes, cuts or writes the image tokens: they
must stay whole, the whole rewrite refused or the image stream kept replicated), "shard" (it does not
touch them: refusing would be a needless fallback) or "either" (exact whichever it does). Whatever the expectation, the result must equal the eager call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.synthetic import JointAttention


def _setitem(h):
    h = h.clone()
    h[:, 0] = 0.5
    return h


def _inplace_view(h):
    h = h * 1
    h[:, :1].add_(1)
    return h


def _inplace_whole(h):
    h = h * 1
    h.add_(1)
    return h


def _masked_fill_(h):
    h = h * 1
    h.masked_fill_(h > 0, 0.25)
    return h


@torch.library.custom_op("npu_dit_forms::positions", mutates_args=())
def _positions(n: int) -> torch.Tensor:
    """An op npu-dit has no rule for, building a table from a length (a model's own positional kernel)."""
    return torch.arange(n, dtype=torch.float32) / 8


@_positions.register_fake
def _(n):
    return torch.empty(n)


@torch.library.custom_op("npu_dit_forms::length_scale", mutates_args=())
def _length_scale(n: int) -> torch.Tensor:
    """An op with no rule whose result does not carry the tokens: one number made from a length."""
    return torch.full((1,), 1 + n / 8)


@_length_scale.register_fake
def _(n):
    return torch.empty(1)


FORMS = {
    # along the tokens (dim 1 of [B, S, D]): must not be sharded
    "roll_positional": ("refuse", lambda h: torch.roll(h, 2, 1)),
    "roll_keywords": ("refuse", lambda h: torch.roll(h, shifts=2, dims=1)),
    "roll_method": ("refuse", lambda h: h.roll(2, 1)),
    "roll_flattened": ("refuse", lambda h: torch.roll(h, 3)),
    "norm_p_dim": ("refuse", lambda h: h / h.norm(2, 1, keepdim=True)),
    "std_dim": ("refuse", lambda h: h - torch.std(h, 1).unsqueeze(1)),
    "var_dim_unbiased": ("refuse", lambda h: h - torch.var(h, 1, True).unsqueeze(1)),
    "max_dim": ("refuse", lambda h: h + torch.max(h, 1)[0].unsqueeze(1)),
    "amax_keepdim": ("refuse", lambda h: h - h.amax(1, keepdim=True)),
    "logsumexp": ("refuse", lambda h: h - torch.logsumexp(h, 1, True)),
    "cumsum_keyword": ("refuse", lambda h: torch.cumsum(h, dim=1)),
    "cummax": ("refuse", lambda h: torch.cummax(h, 1)[0]),
    "softmax_positional": ("refuse", lambda h: torch.softmax(h, 1)),
    "sort": ("refuse", lambda h: torch.sort(h, 1)[0]),
    "repeat_tokens": ("refuse", lambda h: h.repeat(1, 2, 1)[:, h.shape[1] - 1:-1] * 0.5 + h * 0.5),
    "flip_list": ("refuse", lambda h: torch.flip(h, [1])),
    "layer_norm_over_tokens": ("refuse", lambda h: F.layer_norm(h, h.shape[1:])),
    "strided_slice": ("refuse", lambda h: h[:, ::2]),
    "narrow_first": ("refuse", lambda h: h + torch.narrow(h, 1, 0, 1)),
    "select_first": ("refuse", lambda h: h + h.select(1, 0).unsqueeze(1)),
    "setitem_token": ("refuse", _setitem),
    "setitem_inside_the_stream": ("refuse", lambda h: _aligned_write(h)),
    "setitem_whole_stream": ("either", lambda h: _whole_write(h)),
    "inplace_on_a_view": ("refuse", _inplace_view),
    # a size of the sharded dim used as a value: the global length, or a refusal
    "size_as_value": ("either", lambda h: h * h.shape[1]),
    "size_arithmetic_as_value": ("either", lambda h: h / (h.shape[1] * 2 + 1)),
    "size_as_fill": ("either", lambda h: h + torch.full((1,), h.shape[1], dtype=h.dtype)),
    "inplace_whole": ("either", _inplace_whole),
    "masked_fill_inplace": ("either", _masked_fill_),
    # an op with no rule that takes the stream length: run as in the serial graph (global length), or refused
    "opaque_table_of_the_length": ("either", lambda h: h + _positions(h.shape[1]).view(1, -1, 1)),
    "opaque_value_of_the_length": ("either", lambda h: h * _length_scale(h.shape[1])),
    # along the features or elementwise: the tokens stay sharded
    "roll_features": ("shard", lambda h: torch.roll(h, 2, -1)),
    "repeat_features": ("shard", lambda h: h.unsqueeze(2).repeat(1, 1, 2, 1).sum(2) * 0.5),
    "norm_features": ("shard", lambda h: h / h.norm(2, -1, keepdim=True)),
    "std_features": ("shard", lambda h: h / torch.std(h, -1).unsqueeze(-1)),
    "max_binary": ("shard", lambda h: torch.max(h, h * 0.5)),
    "mean_features": ("shard", lambda h: h - h.mean(-1, keepdim=True)),
    "where": ("shard", lambda h: torch.where(h > 0, h, 0.0)),
    "type_as": ("shard", lambda h: h.double().type_as(h) * 2),
    # a table row per token (HunyuanVideo 1.5's condition-type embedding of its text tokens)
    "embedding_per_token": ("shard", lambda h: h + F.embedding(
        (h[..., 0] > 0).long(), torch.linspace(-1, 1, 2 * h.shape[-1]).view(2, -1))),
}


class TokenForm(JointAttention):
    """JointAttention whose image tokens go through `FORMS[form]` before attention."""

    def __init__(self, form: str, heads: int = 2, head_dim: int = 8) -> None:
        super().__init__(heads, head_dim)
        self.form = form

    def forward(self, image, text, text_mask=None):
        return super().forward(FORMS[self.form][1](image), text, text_mask)


class SingleStreamForm(torch.nn.Module):
    """The image tokens alone, one stream: `FORMS[form]`, self-attention, `FORMS[form]` again. With no
    other stream to shard, a form that mixes or cuts the tokens can only get them all (gathered into
    it, or the pass refuses): before attention, and after it, where the tokens are local again."""

    def __init__(self, form: str, heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        dim = heads * head_dim
        self.form, self.heads = form, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, image):
        h = FORMS[self.form][1](image)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return (FORMS[self.form][1](h + self.out(o)),)


def _feature_setitem(h):
    h = h.clone()
    h[..., 0] = 0.5
    return h


def _feature_inplace(h):
    h = h * 1
    h.add_(1)
    return h


# ops between a column-sharded and a row-sharded linear (`fc2(form(fc1(x)))`, tensor parallelism):
# "refuse" = the split must not pass through (the linears stay replicated), "shard" = it must
FEATURE_FORMS = {
    "roll_positional": ("refuse", lambda h: torch.roll(h, 1, -1)),
    "roll_keywords": ("refuse", lambda h: torch.roll(h, shifts=1, dims=-1)),
    "roll_method": ("refuse", lambda h: h.roll(1, 2)),
    "roll_flattened": ("refuse", lambda h: torch.roll(h, 1)),
    "norm_p_dim": ("refuse", lambda h: h / h.norm(2, -1, keepdim=True)),
    "std_dim": ("refuse", lambda h: h / torch.std(h, -1, keepdim=True)),
    "max_dim": ("refuse", lambda h: h - torch.max(h, -1, keepdim=True)[0]),
    "softmax": ("refuse", lambda h: torch.softmax(h, -1)),
    "cumsum": ("refuse", lambda h: torch.cumsum(h, dim=-1)),
    "flip": ("refuse", lambda h: torch.flip(h, [-1])),
    "setitem_feature": ("refuse", _feature_setitem),
    "inplace_add": ("either", _feature_inplace),
    "gelu": ("shard", lambda h: F.gelu(h)),
    "roll_tokens": ("shard", lambda h: torch.roll(h, 1, 1)),
    "mean_tokens": ("shard", lambda h: h - h.mean(1, keepdim=True)),
    "max_binary": ("shard", lambda h: torch.max(h, h * 0.5)),
}


class FeatureForm(torch.nn.Module):
    """`fc2(FEATURE_FORMS[form](fc1(x)))`: a column/row pair around one op."""

    def __init__(self, form: str, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.form = form
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return (self.fc2(FEATURE_FORMS[self.form][1](self.fc1(x))),)


def _aligned_write(h):
    h = h * 1
    h[:, 1:] = h[:, 1:] * 2  # not at a stream boundary of the image tokens: must refuse
    return h


def _whole_write(h):
    h = h * 1
    h[:, :] = h * 2  # every position with its own value: aligned
    return h
