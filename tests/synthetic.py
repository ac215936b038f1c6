"""A small joint text+image attention model for property tests (no diffusers, any head count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class JointAttention(torch.nn.Module):
    """Separate text/image projections, joint SDPA over [text, image], per-stream output projections."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads = heads
        self.img_qkv = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(3)])
        self.txt_qkv = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(3)])
        self.img_out = torch.nn.Linear(dim, dim)
        self.txt_out = torch.nn.Linear(dim, dim)
        self.dim = dim

    def forward(self, image, text, text_mask=None):
        def heads(x):
            return x.unflatten(-1, (self.heads, -1))

        q = torch.cat([heads(self.txt_qkv[0](text)), heads(self.img_qkv[0](image))], dim=1)
        k = torch.cat([heads(self.txt_qkv[1](text)), heads(self.img_qkv[1](image))], dim=1)
        v = torch.cat([heads(self.txt_qkv[2](text)), heads(self.img_qkv[2](image))], dim=1)
        mask = None
        if text_mask is not None:
            ones = torch.ones(image.shape[0], image.shape[1], dtype=torch.bool, device=image.device)
            mask = torch.cat([text_mask, ones], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)
        text_out, image_out = out.split([text.shape[1], image.shape[1]], dim=1)
        return (torch.cat([self.txt_out(text_out), self.img_out(image_out)], dim=1),)

    def example_inputs(self, batch: int, text_len: int, image_len: int, *, masked: bool):
        g = torch.Generator().manual_seed(text_len + 7 * image_len)
        inputs = {
            "image": torch.randn(batch, image_len, self.dim, generator=g),
            "text": torch.randn(batch, text_len, self.dim, generator=g),
        }
        if masked:
            mask = torch.ones(batch, text_len, dtype=torch.bool)
            mask[-1, text_len // 2 + 1 :] = False
            inputs["text_mask"] = mask
        return inputs


class TokenMixing(JointAttention):
    """JointAttention followed by one op that mixes positions along the image tokens (or, for
    `kind="matmul_attention"`, attention written as matmul + softmax instead of SDPA). Sharding the
    image tokens through any of these would be wrong; the Ulysses pass must refuse them."""

    KINDS = ("first_token", "cumsum", "flip", "matmul_attention", "token_mean", "no_rule")

    def __init__(self, kind: str, heads: int = 2, head_dim: int = 8) -> None:
        super().__init__(heads, head_dim)
        self.kind = kind

    def forward(self, image, text, text_mask=None):
        (joint,) = super().forward(image, text, text_mask)
        img = joint[:, text.shape[1]:]
        if self.kind == "first_token":
            return (img + img[:, :1],)
        if self.kind == "cumsum":
            return (img.cumsum(dim=1),)
        if self.kind == "flip":
            return (img.flip(1),)
        if self.kind == "token_mean":
            return (img - img.mean(dim=1, keepdim=True),)
        if self.kind == "no_rule":  # an op the rule table does not know, along the tokens
            return (torch.fft.fft(img, dim=1).real,)
        if self.kind == "matmul_attention":
            scores = (img @ img.transpose(1, 2)) / img.shape[-1] ** 0.5
            return (scores.softmax(dim=-1) @ img,)
        raise ValueError(self.kind)
