"""torch_npu's fused attention ops, and reference implementations of them for machines without an NPU.

The lowering pass emits calls to two ops, exactly as torch_npu defines them (op-plugin schemas):

    npu::npu_fused_infer_attention_score(query, key, value, *, atten_mask, num_heads, scale, input_layout,
                                         num_key_value_heads, sparse_mode, inner_precise, ...) -> (out, lse)
    npu::npu_fusion_attention(query, key, value, head_num, input_layout, *, atten_mask, scale, keep_prob,
                              inner_precise, ...) -> (out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)

Their semantics differ from SDPA's in ways a lowering must get right: `scale` defaults to 1.0 (SDPA's is
1/sqrt(D)); `atten_mask` is bool/uint8 with 1 = masked OUT (SDPA's bool mask is True = keep); the head
count is an argument; `input_layout` names the layout (BSND, BNSD, BSH, ...) and the op reads the tensors
in it, so no transpose is needed to feed it; with a user mask `inner_precise=2` enables "invalid-row"
correction (a fully masked row gives 0, as SDPA does).

Without torch_npu (this project's CI), `npu_dit_ref::npu_fused_infer_attention_score` and
`npu_dit_ref::npu_fusion_attention` take their place: the SAME schemas, plain matmul + softmax in
float32, with fake kernels so Dynamo and Inductor trace them. They are reference code for testing the
lowering, never a kernel anyone should run for speed, and `auto` never picks them. They implement the
subset of the schema the lowering emits (layouts BSND/BNSD/BSH, bool/int8/uint8 masks, GQA,
`sparse_mode=0`) and raise NotImplementedError for the rest (quantisation, pse, paged KV, varlen).
They do not enforce the hardware's dtype limits (float16/bfloat16), so the tests can check the lowering
in float32; the lowering's checkers enforce those limits when the real op is the target.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

REFERENCE_NAMESPACE = "npu_dit_ref"
INT_MAX = 2147483647

# op-plugin's schema (torch_npu >= 2.1 names the scale argument `scale`; older releases `scale_value`)
FIA_SCHEMA = (
    "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
    "Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, "
    "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, "
    "Tensor? quant_scale2=None, Tensor? quant_offset2=None, Tensor? antiquant_scale=None, "
    "Tensor? antiquant_offset=None, Tensor? block_table=None, Tensor? query_padding_size=None, "
    "Tensor? kv_padding_size=None, Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, "
    "Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None, Tensor? key_shared_prefix=None, "
    "Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, "
    "Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, "
    "int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout=\"BSH\", "
    "int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, "
    "int antiquant_mode=0, bool softmax_lse_flag=False, int key_antiquant_mode=0, "
    "int value_antiquant_mode=0) -> (Tensor, Tensor)"
)
FA_SCHEMA = (
    "npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, "
    "Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1.0, "
    "float keep_prob=1.0, int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, "
    "int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, "
    "bool gen_mask_parallel=True, bool sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)"
)
FIA_LAYOUTS = ("BSH", "BSND", "BNSD")  # the subset the reference implements (the real op has more)
FA_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD")

# schema arguments the reference implements; any other argument must keep its default
_FIA_IMPLEMENTED = {"atten_mask", "num_heads", "scale", "input_layout", "num_key_value_heads", "sparse_mode",
                    "inner_precise", "softmax_lse_flag", "pre_tokens", "next_tokens", "block_size",
                    "antiquant_mode", "key_antiquant_mode", "value_antiquant_mode"}
_FA_IMPLEMENTED = {"atten_mask", "scale", "keep_prob", "inner_precise", "sparse_mode", "pre_tockens",
                   "next_tockens", "gen_mask_parallel", "sync"}


@functools.lru_cache(maxsize=None)
def torch_npu_available() -> bool:
    """True when torch_npu imports (it needs Ascend's CANN libraries)."""
    try:
        import torch_npu  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or CANN libraries missing
        return False
    return True


def fused_infer_attention_op(*, reference: bool) -> Any:
    """The op overload a lowered graph calls: torch_npu's, or the reference with the same schema."""
    if reference:
        return torch.ops.npu_dit_ref.npu_fused_infer_attention_score.default
    return torch.ops.npu.npu_fused_infer_attention_score.default


def fusion_attention_op(*, reference: bool) -> Any:
    if reference:
        return torch.ops.npu_dit_ref.npu_fusion_attention.default
    return torch.ops.npu.npu_fusion_attention.default


def scale_keyword(op: Any) -> str:
    """`scale` in current torch_npu, `scale_value` in releases before the rename."""
    names = {a.name for a in op._schema.arguments}
    return "scale" if "scale" in names else "scale_value"


# --- layouts ---------------------------------------------------------------------------------------


def _to_bnsd(x: torch.Tensor, layout: str, num_heads: int) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    if layout == "SBH":
        return x.unflatten(-1, (num_heads, -1)).permute(1, 2, 0, 3)
    raise ValueError(f"input_layout {layout!r} is not implemented by the reference op")


def _from_bnsd(o: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return o.contiguous()
    if layout == "BSND":
        return o.transpose(1, 2).contiguous()
    if layout == "BSH":
        return o.transpose(1, 2).flatten(2).contiguous()
    if layout == "SBH":
        return o.permute(2, 0, 1, 3).flatten(2).contiguous()
    raise ValueError(f"input_layout {layout!r} is not implemented by the reference op")


def _heads_of(x: torch.Tensor, layout: str, fallback: int) -> int:
    if layout == "BNSD":
        return x.shape[1]
    if layout == "BSND":
        return x.shape[2]
    return fallback


def _out_shape(query: torch.Tensor, value: torch.Tensor, layout: str, num_heads: int, kv_heads: int) -> list:
    shape = list(query.shape)
    if layout in ("BSND", "BNSD"):
        shape[-1] = value.shape[-1]
    else:  # BSH / SBH: hidden = heads * value head dim
        shape[-1] = num_heads * (value.shape[-1] // kv_heads)
    return shape


# --- the shared math -------------------------------------------------------------------------------


def _attention_bnsd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked_out: torch.Tensor | None, scale: float,
    *, fix_invalid_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T, masked) v in float32.

    Returns (out [B,N,Sq,Dv], row max [B,N,Sq,1], row sum of exp(score - max) [B,N,Sq,1])."""
    if k.shape[1] != q.shape[1]:  # GQA: each key/value head serves num_heads / kv_heads query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if masked_out is not None:
        # the kernels fill masked positions with the most negative value, not -inf: a fully masked row
        # comes out as the mean of V unless invalid-row correction (inner_precise bit 1) zeroes it
        scores = scores.masked_fill(masked_out, torch.finfo(torch.float32).min)
    row_max = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights / row_sum, v.float())
    if masked_out is not None and fix_invalid_rows:
        out = out.masked_fill(masked_out.all(dim=-1, keepdim=True), 0.0)
    return out, row_max, row_sum


def _masked_out(mask: torch.Tensor | None, allowed_dtypes: tuple[torch.dtype, ...], allowed_ranks: tuple[int, ...],
                op: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype not in allowed_dtypes:
        raise ValueError(f"{op}: atten_mask must be {', '.join(map(str, allowed_dtypes))} (1 = masked out), got {mask.dtype}")
    if mask.dim() not in allowed_ranks:
        raise ValueError(f"{op}: atten_mask of rank {mask.dim()} is not one of the documented shapes")
    masked = mask.bool()
    if masked.dim() == 3:  # (B|1, Q_S, KV_S): the batch axis leads
        masked = masked.unsqueeze(1)
    while masked.dim() < 4:  # (Q_S, KV_S)
        masked = masked.unsqueeze(0)
    return masked


def _check_defaults(op: str, options: dict[str, Any], implemented: set[str], schema_defaults: dict[str, Any]) -> None:
    for name, value in options.items():
        if name in implemented:
            continue
        if value is not None and value != schema_defaults.get(name):
            raise NotImplementedError(f"{op} (reference): argument {name!r} is not implemented by the reference op")


def _schema_defaults(schema: str) -> dict[str, Any]:
    parsed = torch._C.parse_schema("x::" + schema)
    return {a.name: a.default_value for a in parsed.arguments if a.has_default_value()}


def _by_name(schema: str, fn):
    """Adapt `fn(query, key, value, **options)` to the dispatcher, which passes the schema's
    positional arguments positionally and its keyword-only arguments by name."""
    names = [a.name for a in torch._C.parse_schema("x::" + schema).arguments]

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        return fn(bound.pop("query"), bound.pop("key"), bound.pop("value"), **bound)

    return kernel


# --- npu_fused_infer_attention_score ---------------------------------------------------------------


def reference_fused_infer_attention_score(query, key, value, **options):
    """The reference for torch_npu.npu_fused_infer_attention_score (prompt branch, Q_S > 1 or 1)."""
    op = "npu_fused_infer_attention_score"
    _check_defaults(op, options, _FIA_IMPLEMENTED, _FIA_DEFAULTS)
    layout = options.get("input_layout", "BSH")
    num_heads = options.get("num_heads", 1)
    kv_heads = options.get("num_key_value_heads", 0) or num_heads
    if layout not in FIA_LAYOUTS:
        raise NotImplementedError(f"{op} (reference): input_layout {layout!r}; implemented: {', '.join(FIA_LAYOUTS)}")
    if _heads_of(query, layout, num_heads) != num_heads:
        raise ValueError(f"{op}: num_heads={num_heads} does not match the query's N axis in layout {layout}")
    if _heads_of(key, layout, kv_heads) != kv_heads:
        raise ValueError(f"{op}: num_key_value_heads={options.get('num_key_value_heads', 0)} does not match the key's N axis")
    if key.shape != value.shape:
        raise ValueError(f"{op}: key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if options.get("sparse_mode", 0) != 0:
        raise NotImplementedError(f"{op} (reference): only sparse_mode=0 is implemented")
    if options.get("pre_tokens", INT_MAX) != INT_MAX or options.get("next_tokens", INT_MAX) != INT_MAX:
        raise NotImplementedError(f"{op} (reference): pre_tokens/next_tokens bands are not implemented")
    masked = _masked_out(options.get("atten_mask"), (torch.bool, torch.int8, torch.uint8), (2, 3, 4), op)
    if masked is not None and masked.shape[1] != 1:
        raise ValueError(f"{op}: atten_mask must be (Q_S, KV_S), (B|1, Q_S, KV_S) or (B|1, 1, Q_S, KV_S); got {tuple(masked.shape)}")
    q = _to_bnsd(query, layout, num_heads)
    k = _to_bnsd(key, layout, kv_heads)
    v = _to_bnsd(value, layout, kv_heads)
    out, row_max, row_sum = _attention_bnsd(q, k, v, masked, options.get("scale", 1.0),
                                            fix_invalid_rows=bool(options.get("inner_precise", 0) & 2))
    out = _from_bnsd(out.to(query.dtype), layout)
    if options.get("softmax_lse_flag", False):
        return out, row_max + torch.log(row_sum)
    return out, torch.zeros(1, dtype=torch.float32, device=query.device)


def _fake_fused_infer_attention_score(query, key, value, **options):
    layout = options.get("input_layout", "BSH")
    num_heads = options.get("num_heads", 1)
    kv_heads = options.get("num_key_value_heads", 0) or num_heads
    out = query.new_empty(_out_shape(query, value, layout, num_heads, kv_heads))
    if options.get("softmax_lse_flag", False):
        seq = query.shape[2] if layout == "BNSD" else query.shape[1]
        return out, query.new_empty((query.shape[0], num_heads, seq, 1), dtype=torch.float32)
    return out, query.new_empty((1,), dtype=torch.float32)


# --- npu_fusion_attention --------------------------------------------------------------------------


def reference_fusion_attention(query, key, value, head_num, input_layout, **options):
    """The reference for torch_npu.npu_fusion_attention (no dropout: keep_prob must be 1)."""
    op = "npu_fusion_attention"
    _check_defaults(op, options, _FA_IMPLEMENTED, _FA_DEFAULTS)
    if input_layout not in FA_LAYOUTS:
        raise NotImplementedError(f"{op} (reference): input_layout {input_layout!r}; implemented: {', '.join(FA_LAYOUTS)}")
    if _heads_of(query, input_layout, head_num) != head_num:
        raise ValueError(f"{op}: head_num={head_num} does not match the query's N axis in layout {input_layout}")
    if key.shape != value.shape:
        raise ValueError(f"{op}: key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if options.get("keep_prob", 1.0) != 1.0:
        raise NotImplementedError(f"{op} (reference): dropout (keep_prob < 1) is not implemented")
    if options.get("sparse_mode", 0) != 0:
        raise NotImplementedError(f"{op} (reference): only sparse_mode=0 is implemented")
    if options.get("pre_tockens", INT_MAX) != INT_MAX or options.get("next_tockens", INT_MAX) != INT_MAX:
        raise NotImplementedError(f"{op} (reference): pre_tockens/next_tockens bands are not implemented")
    masked = _masked_out(options.get("atten_mask"), (torch.bool, torch.uint8), (2, 4), op)
    head_dim = query.shape[-1] if input_layout in ("BSND", "BNSD") else query.shape[-1] // head_num
    kv_heads = _heads_of(key, input_layout, key.shape[-1] // head_dim)
    q = _to_bnsd(query, input_layout, head_num)
    k = _to_bnsd(key, input_layout, kv_heads)
    v = _to_bnsd(value, input_layout, kv_heads)
    out, row_max, row_sum = _attention_bnsd(q, k, v, masked, options.get("scale", 1.0),
                                            fix_invalid_rows=bool(options.get("inner_precise", 0) & 2))
    out = _from_bnsd(out.to(query.dtype), input_layout)
    # softmax_max / softmax_sum as the kernel returns them: [B, N, Sq, 8] float32, the row's value
    # repeated in 8 lanes; softmax_out is reserved (empty); seed, offset, numels of the (absent) dropout
    lanes = (*row_max.shape[:-1], 8)
    return out, row_max.expand(lanes).contiguous(), row_sum.expand(lanes).contiguous(), query.new_empty((0,)), 0, 0, 0


def _fake_fusion_attention(query, key, value, head_num, input_layout, **options):
    head_dim = query.shape[-1] if input_layout in ("BSND", "BNSD") else query.shape[-1] // head_num
    kv_heads = _heads_of(key, input_layout, key.shape[-1] // head_dim)
    out = query.new_empty(_out_shape(query, value, input_layout, head_num, kv_heads))
    batch = query.shape[1] if input_layout == "SBH" else query.shape[0]
    seq = query.shape[2] if input_layout == "BNSD" else query.shape[0] if input_layout == "SBH" else query.shape[1]
    stats = query.new_empty((batch, head_num, seq, 8), dtype=torch.float32)
    return out, stats, stats.clone(), query.new_empty((0,)), 0, 0, 0


_FIA_DEFAULTS = _schema_defaults(FIA_SCHEMA)
_FA_DEFAULTS = _schema_defaults(FA_SCHEMA)

_LIBRARY = torch.library.Library(REFERENCE_NAMESPACE, "DEF")
_LIBRARY.define(FIA_SCHEMA)
_LIBRARY.define(FA_SCHEMA)
for _name, _schema, _kernel, _fake in (
    ("npu_fused_infer_attention_score", FIA_SCHEMA, reference_fused_infer_attention_score, _fake_fused_infer_attention_score),
    ("npu_fusion_attention", FA_SCHEMA, reference_fusion_attention, _fake_fusion_attention),
):
    _LIBRARY.impl(_name, _by_name(_schema, _kernel), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{REFERENCE_NAMESPACE}::{_name}", _by_name(_schema, _fake), lib=_LIBRARY)
