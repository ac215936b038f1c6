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
    image tokens through any of these would be wrong: the Ulysses pass must refuse, or keep the image stream
    whole and shard only the text."""

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


class PairMaskedAttention(torch.nn.Module):
    """Self-attention over one token stream with a pairwise additive mask [B, N, N] (OmniGen's form: the
    stream is on two dims of one input), then a `tail` that needs every token of the only stream:
    "drop_first" keeps tokens 1.. (a slice inside the stream), "token_mean" subtracts the mean over
    the tokens, "pooled_query" adds attention from one query of no stream over every token (Mochi's
    attention pool); "none" returns the attention's output."""

    TAILS = ("none", "drop_first", "token_mean", "pooled_query")

    def __init__(self, tail: str = "none", heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        if tail not in self.TAILS:
            raise ValueError(tail)
        dim = heads * head_dim
        self.tail, self.heads, self.dim = tail, heads, dim
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, tokens, mask):
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2).flatten(2)
        x = tokens + self.out(o)
        if self.tail == "drop_first":
            return (x[:, 1:],)
        if self.tail == "token_mean":
            return (x - x.mean(dim=1, keepdim=True),)
        if self.tail == "pooled_query":
            query = torch.ones(x.shape[0], self.heads, 1, self.dim // self.heads, dtype=x.dtype)
            kv = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            return (x + F.scaled_dot_product_attention(query, kv, kv).transpose(1, 2).flatten(2),)
        return (x,)

    def example_inputs(self, batch: int, length: int):
        g = torch.Generator().manual_seed(length)
        keep = torch.rand(batch, length, length, generator=g) > 0.3
        keep |= torch.eye(length, dtype=torch.bool)  # every query sees itself
        mask = torch.zeros(batch, length, length).masked_fill(~keep, float("-inf"))
        return {"tokens": torch.randn(batch, length, self.dim, generator=g), "mask": mask}


class PatchDiT(torch.nn.Module):
    """A DiT whose tokens are made inside the graph: latent [B, C, H, W] -> patchify (a convolution
    with kernel = stride = p, or reshape/permute) -> [B, (H/p)(W/p), D], plus a learned positional
    table cropped to the latent's patch grid and a per-sample timestep embedding; one self-attention;
    unpatchify back to [B, C, H, W] (or, with `unpatchify=False`, the tokens [B, (H/p)(W/p), D]).
    `mix=True` adds a cumulative sum over the tokens right after they are made.
    `kernel > patch` makes the patches overlap."""

    def __init__(self, channels: int = 4, patch: int = 2, heads: int = 2, head_dim: int = 8,
                 max_grid: int = 16, patchify: str = "conv", kernel: int | None = None,
                 unpatchify: bool = True, mix: bool = False) -> None:
        super().__init__()
        self.mix = mix  # a cumulative sum over the tokens right where they are made: needs every token
        dim = heads * head_dim
        self.patch, self.heads, self.channels, self.patchify = patch, heads, channels, patchify
        self.unpatchify = unpatchify
        kernel = kernel or patch
        self.proj = torch.nn.Conv2d(channels, dim, kernel_size=kernel, stride=patch)
        self.proj_tokens = torch.nn.Linear(channels * patch * patch, dim)
        self.pos = torch.nn.Parameter(torch.randn(1, max_grid, max_grid, dim) * 0.1)
        self.time = torch.nn.Linear(1, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.unproj = torch.nn.Linear(dim, patch * patch * channels)

    def forward(self, latent, timestep):
        b, c, height, width = latent.shape
        p = self.patch
        h, w = height // p, width // p
        if self.patchify == "conv":
            x = self.proj(latent)
            h, w = x.shape[-2], x.shape[-1]
            x = x.flatten(2).transpose(1, 2)
        else:
            x = latent.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
            x = self.proj_tokens(x)
        if self.mix:
            x = x + torch.cumsum(x, 1) * 0.1
        x = x + self.pos[:, :h, :w].reshape(1, h * w, -1)
        x = x + self.time(timestep[:, None].to(x.dtype))[:, None]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.out(o)
        if not self.unpatchify:
            return (x,)
        y = self.unproj(x).reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return (y.reshape(b, c, h * p, w * p),)

    def example_inputs(self, batch: int, height: int, width: int):
        g = torch.Generator().manual_seed(height + 7 * width)
        return {"latent": torch.randn(batch, self.channels, height, width, generator=g),
                "timestep": torch.tensor([3.0] * batch)}


def tiny_sd3(height: int, width: int, generator: torch.Generator | None = None):
    """diffusers' SD3Transformer2DModel, tiny (seed 0), and a call on a 4-channel latent of height x width:
    a DiT whose image tokens are made inside the graph by a patch-embedding convolution."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, height, width, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=generator),
                  pooled_projections=torch.randn(1, 16, generator=generator), timestep=torch.tensor([3.0]))
    return model, inputs


def tiny_pixart(height: int, width: int, generator: torch.Generator | None = None, sample_size: int = 10):
    """diffusers' PixArtTransformer2DModel, tiny (seed 0), and a call on a 4-channel latent: tokens made by
    a patch-embedding convolution, self- and cross-attention, and at the model's own sample size a
    positional table (`pos_embed` buffer) the size of the grid, so Dynamo specialises the grid's size."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=8, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, cross_attention_dim=16, caption_channels=12, use_additional_conditions=False,
        norm_type="ada_norm_single").eval()
    inputs = dict(hidden_states=torch.randn(1, 4, height, width, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 12, generator=generator),
                  timestep=torch.tensor([3.0]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs


class GroupedQueryAttention(torch.nn.Module):
    """Self-attention whose K/V have fewer heads than Q, grouped by SDPA itself (`enable_gqa=True`),
    not repeated in the model (as transformers' attention does when no mask is passed)."""

    def __init__(self, heads: int = 4, kv_heads: int = 1, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        dim = heads * head_dim
        self.q = torch.nn.Linear(dim, dim)
        self.k = torch.nn.Linear(dim, kv_heads * head_dim)
        self.v = torch.nn.Linear(dim, kv_heads * head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.k(x).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return (self.o(out.transpose(1, 2).flatten(2)),)
