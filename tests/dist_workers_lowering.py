"""What the attention-lowering tests run on every rank, and the structure check they share."""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx

warnings.filterwarnings("ignore")

PERMUTE_TARGETS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", torch.permute, torch.transpose,
                   torch.swapaxes, torch.movedim, torch.ops.aten.permute.default, torch.ops.aten.transpose.int}


def transposes_around_collectives(gm: fx.GraphModule) -> tuple[list[str], int]:
    """Walk from each attention call's q/k/v back, and from its output forward, through the ops that only
    move data along the way to and from the all-to-all (the collective helpers, pad/strip heads, split,
    cat, getitem, contiguous) and through permutes. Returns the permutes/transposes met, and how many
    collectives the walks crossed (so an empty list means something on a distributed graph)."""
    import operator

    from npu_dit.passes.analysis.attention_ops import attention_qkv, is_attention_call
    from npu_dit.runtime import collectives as C

    collectives = set(C.COLLECTIVE_STARTS) | set(C.COLLECTIVE_WAITS)
    on_path = collectives | {C.pad_heads, C.strip_heads, C.local_heads, torch.split, torch.cat, operator.getitem,
                             "contiguous"} | PERMUTE_TARGETS
    found, crossed = [], 0
    for call in [n for n in gm.graph.nodes if is_attention_call(n)]:
        for start, step in [(t, "args") for t in attention_qkv(call)] + [(u, "users") for u in call.users]:
            stack, seen = [start], set()
            while stack:
                node = stack.pop()
                if node in seen or node.op not in ("call_function", "call_method") or node.target not in on_path:
                    continue
                seen.add(node)
                crossed += node.target in collectives
                if node.target in PERMUTE_TARGETS:
                    found.append(f"{node.name} ({'before' if step == 'args' else 'after'} {call.name})")
                stack.extend(node.all_input_nodes if step == "args" else node.users)
    return found, crossed


def run_lowering_cases(rank, world_size, cases):
    """cases: (name, tiny-call key, input overrides, config overrides, options).
    Returns {name: (output, counts, fell_back, reason, transposes around the collectives)}."""
    from npu_dit.backend import RECORDS
    from tests.conftest import tiny_model_and_inputs
    from tests.dist_workers import compile_and_run

    results = {}
    for name, key, overrides, config_overrides, options in cases:
        _, model, inputs = tiny_model_and_inputs(key, config_overrides=config_overrides, **overrides)
        out = compile_and_run(model, inputs, {"ulysses_degree": world_size, **options})
        record = RECORDS[-1]
        report = record.report
        results[name] = (out, report.counts, report.fell_back, report.fallback_reason,
                         transposes_around_collectives(record.graph))
    return results
