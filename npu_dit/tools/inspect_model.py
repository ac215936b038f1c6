"""`npu-dit inspect MODEL`: what the passes see and do, for a full-size model, offline.

The transformer is built on the meta device (no weights, no accelerator), traced by Dynamo with
dynamic token dims at the chosen resolution and prompt length, analysed, and run through the pass
pipeline for the given options. The result is a plain dict (`--json`) that `format_report` renders.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Iterator

import torch

from npu_dit.config import CompileConfig
from npu_dit.models import build_transformer, count_parameters, get_model
from npu_dit.passes.analysis import attention_sites, parameter_placeholders, token_dims, transformer_blocks
from npu_dit.passes.analysis.attention_ops import node_value
from npu_dit.passes.attention_lowering import KERNELS_META_KEY, attention_environment, attention_kernel_choices
from npu_dit.passes.infra import dump_graph, run_passes
from npu_dit.passes.pipeline import build_pipeline
from npu_dit.plans import CACHE_PLAN_KEY, SHARDING_META_KEY, TP_META_KEY
from npu_dit.runtime.dist import inspection_context
from npu_dit.tools.capture import capture_graph
from npu_dit.tools.collective_report import collective_report, tp_collectives
from npu_dit.tools.tp_report import format_tp, tp_summary
from npu_dit.tools.region_report import region_costs


@contextlib.contextmanager
def progress(message: str, *, quiet: bool = False, every: float = 5.0) -> Iterator[None]:
    """Print `message`, then the elapsed time every few seconds until the block ends."""
    if quiet:
        yield
        return
    start = time.perf_counter()
    print(f"{message} ...", file=sys.stderr, flush=True)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            print(f"  ... {message.lower()}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def inspect_model(
    model: str,
    *,
    size: str = "full",
    height: int = 1024,
    width: int = 1024,
    prompt_len: int | None = None,
    input_images: list[tuple[int, int]] | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    options: dict[str, Any] | None = None,
    dump_dir: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    spec = get_model(model)
    cfg = CompileConfig.from_options(options)
    config = spec.config(size)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    with progress(f"Building {spec.transformer_cls} ({size} config) on the meta device", quiet=quiet):
        transformer = build_transformer(spec, config, device="meta", dtype=dtype)
        inputs = spec.example_inputs(
            config, height=height, width=width, prompt_len=prompt_len, batch=batch,
            input_images=input_images, device="meta", dtype=dtype,
        )
    timings["build_s"] = time.perf_counter() - t0
    num_params, param_bytes = count_parameters(transformer)

    t0 = time.perf_counter()
    with progress("Tracing with Dynamo (dynamic token dims)", quiet=quiet):
        captured = capture_graph(transformer, inputs, dynamic=True)
    timings["trace_s"] = time.perf_counter() - t0
    gm = captured.gm
    if dump_dir:
        dump_graph(gm, dump_dir, "captured")

    t0 = time.perf_counter()
    blocks = transformer_blocks(gm)
    t1 = time.perf_counter()
    sites = attention_sites(gm)
    t2 = time.perf_counter()
    tokens = token_dims(gm)
    t3 = time.perf_counter()
    timings["analysis_blocks_s"] = t1 - t0
    timings["analysis_attention_s"] = t2 - t1
    timings["analysis_token_dims_s"] = t3 - t2
    timings["analysis_s"] = t3 - t0

    ctx = inspection_context(cfg.ulysses_degree, rank=0) if cfg.ulysses_degree > 1 else None
    tp_ctx = inspection_context(cfg.tp_degree, rank=0) if cfg.tp_degree > 1 else None
    t0 = time.perf_counter()
    rewritten, report = run_passes(gm, build_pipeline(cfg, ctx, tp_ctx), dump_dir=dump_dir, graph_tag="graph")
    timings["passes_s"] = time.perf_counter() - t0
    communication = None
    regions = None
    cache_plan = rewritten.meta.get(CACHE_PLAN_KEY) if rewritten is not gm else None
    if cache_plan is not None:
        regions = region_costs(cache_plan, rewritten)
    plan = rewritten.meta.get(SHARDING_META_KEY) if rewritten is not gm else None
    tp_plan = rewritten.meta.get(TP_META_KEY) if rewritten is not gm else None
    tensor_parallel = None
    if plan is not None:
        with progress("Measuring what rank 0 sends (the rewritten graph on meta tensors)", quiet=quiet):
            # the width Ulysses exchanges: the heads this rank holds after tensor parallelism
            hidden = sites[0].num_heads * sites[0].head_dim // cfg.tp_degree if sites else 0
            communication = collective_report(rewritten, plan, ctx, captured.real_inputs, len(sites), hidden,
                                              tp_plan=tp_plan)
    if tp_plan is not None:
        if communication is not None:
            tp_kinds = {k: v for k, v in communication["collectives"].items() if "TP" in k}
        else:
            with progress("Measuring what rank 0 sends (the rewritten graph on meta tensors)", quiet=quiet):
                tp_kinds = tp_collectives(rewritten, tp_plan, captured.real_inputs)
        tensor_parallel = tp_summary(tp_plan, tp_kinds)

    # the kernel each site got: from the lowering pass when it ran, else the selection it would make
    # (`auto` without an accelerator, or `sdpa`: every site keeps SDPA; the reasons still show)
    kernels = rewritten.meta.get(KERNELS_META_KEY) if rewritten is not gm else None
    if kernels is None:
        choices = attention_kernel_choices(gm, backend=cfg.attention_backend, env=attention_environment(cfg))
        kernels = [{"site": c.call.index, "module": c.call.module, **c.summary()} for c in choices]
    site_summaries = [s.summary() for s in sites]
    for summary, kernel in zip(site_summaries, kernels):
        summary["kernel"] = {k: v for k, v in kernel.items() if k not in ("site", "module")}

    graph_params = parameter_placeholders(gm)
    graph_param_bytes = sum(_nbytes(node_value(n)) for n in graph_params)
    block_kinds: dict[str, int] = {}
    for block in blocks:
        block_kinds[block.kind] = block_kinds.get(block.kind, 0) + 1
    site_kinds: dict[str, int] = {}
    for site in sites:
        key = f"{site.block_kind or 'root'} ({site.kind})"
        site_kinds[key] = site_kinds.get(key, 0) + 1

    return {
        "cfg": _cfg_summary(gm, cfg, communication),
        "model": spec.name,
        "transformer": spec.transformer_cls,
        "config_size": size,
        "resolution": [height, width],
        "prompt_len": prompt_len or spec.default_prompt_len,
        "input_images": input_images if input_images is not None else ([[height, width]] if spec.max_input_images else []),
        "dtype": str(dtype).removeprefix("torch."),
        "options": {k: v for k, v in vars(cfg).items() if k != "cache"} | {"cache": vars(cfg.cache) if cfg.cache else None},
        "parameters": {"count": num_params, "bytes": param_bytes, "in_graph": len(graph_params), "in_graph_bytes": graph_param_bytes},
        "graph": {"nodes": len(gm.graph.nodes), "graphs": captured.num_graphs, "nodes_after_passes": len(rewritten.graph.nodes)},
        "blocks": {"count": len(blocks), "by_kind": block_kinds, "all_contiguous": all(b.contiguous for b in blocks),
                   "order": [b.path for b in blocks]},
        "attention": {"count": len(sites), "by_kind": site_kinds, "sites": site_summaries},
        "token_dims": tokens.summary(),
        "passes": {
            "fell_back": report.fell_back,
            "fallback_reason": report.fallback_reason,
            "records": [
                {"name": r.name, "modified": r.modified, "seconds": r.seconds, "counts": r.counts, "notes": r.notes}
                for r in report.records
            ],
            "counts": report.counts,
        },
        "communication": communication,
        "tensor_parallel": tensor_parallel,
        "cache_regions": regions,
        "timings": timings,
    }


def inspect_text_encoder(name: str, *, size: str = "full", prompt_len: int = 512, dtype: torch.dtype = torch.bfloat16,
                         options: dict[str, Any] | None = None, quiet: bool = False) -> dict[str, Any]:
    """TEP for a text encoder (T5-v1.1-XXL, the Qwen2.5-VL-7B language model) on the meta device: each
    linear's placement, rank 0's collectives and the parameter bytes per rank."""
    from npu_dit.models.text_encoders import TEXT_ENCODERS, build_text_encoder

    spec = TEXT_ENCODERS[name]
    cfg = CompileConfig.from_options(options)
    config = spec.config(size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with progress(f"Building {name} ({size} config) on the meta device", quiet=quiet):
            model = build_text_encoder(spec, config, device="meta")
    finally:
        torch.set_default_dtype(previous)
    num_params, param_bytes = count_parameters(model)
    inputs = spec.example_inputs(config, 1, prompt_len, "meta")
    with progress("Tracing with Dynamo", quiet=quiet):
        captured = capture_graph(model, inputs, dynamic=True)
    tp_ctx = inspection_context(cfg.tp_degree, rank=0) if cfg.tp_degree > 1 else None
    rewritten, report = run_passes(captured.gm, build_pipeline(cfg, None, tp_ctx), graph_tag="graph")
    tp_plan = rewritten.meta.get(TP_META_KEY) if rewritten is not captured.gm else None
    tensor_parallel = None
    if tp_plan is not None:
        with progress("Measuring what rank 0 sends (the rewritten graph on meta tensors)", quiet=quiet):
            tensor_parallel = tp_summary(tp_plan, tp_collectives(rewritten, tp_plan, captured.real_inputs))
    return {"model": name, "config_size": size, "dtype": str(dtype).removeprefix("torch."), "prompt_len": prompt_len,
            "parameters": {"count": num_params, "bytes": param_bytes}, "graph": {"nodes": len(captured.gm.graph.nodes),
            "graphs": captured.num_graphs}, "fell_back": report.fell_back, "fallback_reason": report.fallback_reason,
            "tensor_parallel": tensor_parallel}


def format_text_encoder_report(r: dict[str, Any]) -> str:
    lines = [f"{r['model']}  ({r['config_size']} config, {r['dtype']}), {r['prompt_len']} tokens",
             f"  parameters: {r['parameters']['count'] / 1e9:.2f} B ({_human_bytes(r['parameters']['bytes'])})",
             f"  graph: {r['graph']['nodes']} nodes in {r['graph']['graphs']} graph(s)"]
    if r["fell_back"]:
        lines.append(f"  FALLBACK: {r['fallback_reason']}")
    if r["tensor_parallel"]:
        lines.extend(format_tp(r["tensor_parallel"], _human_bytes))
    return "\n".join(lines)


def _kernel_text(kernel: dict[str, Any]) -> str:
    """`npu_fia [BSND, reference op] (npu_fa: ...; flash: ...)`, as KernelChoice.describe() writes it."""
    head = f"{kernel['kernel']} [{kernel['layout']}{', reference op' if kernel['reference'] else ''}]"
    refused = "; ".join(f"{name}: {reason}" for name, reason in kernel["refused"].items())
    return f"{head} ({refused})" if refused else head


def _cfg_summary(gm, cfg: CompileConfig, communication: dict[str, Any] | None) -> dict[str, Any] | None:
    """CFG parallelism's mesh and what a rank sends per denoising step (two transformer calls): its own
    call's collectives plus one exchange of the output, against both calls on the same Ulysses/TP ranks."""
    if cfg.cfg_degree == 1:
        return None
    out = gm.graph.output_node().args[0]
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    exchange = 0
    for node in outputs:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(value, torch.Tensor):
            numel = value.numel()
            numel = numel.node.hint if isinstance(numel, torch.SymInt) else numel
            exchange += int(numel) * value.element_size()
    per_call = communication["bytes_per_step"] if communication else 0
    return {"mesh": {"cfg": cfg.cfg_degree, "ulysses": cfg.ulysses_degree, "tp": cfg.tp_degree},
            "ranks": cfg.world_degree, "exchange_bytes_per_step": exchange, "per_call_bytes": per_call,
            "bytes_per_step": per_call + exchange, "without_cfg_bytes_per_step": 2 * per_call}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def format_report(r: dict[str, Any]) -> str:
    lines = []
    add = lines.append
    add(f"{r['model']}  ({r['transformer']}, {r['config_size']} config, {r['dtype']})")
    images = ", ".join(f"{h}x{w}" for h, w in r["input_images"]) or "none"
    add(f"  call: {r['resolution'][0]}x{r['resolution'][1]} output, {r['prompt_len']} text tokens, input images: {images}")
    p = r["parameters"]
    add(f"  parameters: {p['count'] / 1e9:.2f} B ({_human_bytes(p['bytes'])}); {p['in_graph']} tensors lifted into the graph")
    g = r["graph"]
    add(f"  graph: {g['nodes']} nodes in {g['graphs']} graph(s)")
    b = r["blocks"]
    kinds = ", ".join(f"{n} x {k}" for k, n in b["by_kind"].items())
    add(f"  blocks: {b['count']} ({kinds}){'' if b['all_contiguous'] else '  [some blocks are not contiguous]'}")
    a = r["attention"]
    add(f"  attention sites: {a['count']}")
    for kind, n in a["by_kind"].items():
        add(f"    {n:4d} x {kind}")
    if a["sites"]:
        s = a["sites"][0]
        add(f"    e.g. {s['module']}: {s['heads']} heads x {s['head_dim']}, q from {', '.join(s['q_proj'])}; "
            f"qk-norm {'yes' if s['qk_norm'] else 'no'}, rope {'yes' if s['rope'] else 'no'}, "
            f"out {', '.join(s['out_proj'])}{', masked' if s['mask'] else ''}")
    kernels: dict[str, int] = {}
    for s in a["sites"]:
        if "kernel" in s:
            text = _kernel_text(s["kernel"])
            kernels[text] = kernels.get(text, 0) + 1
    if kernels:
        add("  attention kernels (why the others refused):")
        for text, n in kernels.items():
            add(f"    {n:4d} x {text}")
    t = r["token_dims"]
    add(f"  token segments (attention sequence = {' | '.join(t['attention_lengths'])}):")
    for seg in t["segments"]:
        add(f"    #{seg['id']}: {seg['size']:<24} {'dynamic' if seg['dynamic'] else 'static '}  (e.g. {seg['example']}), first seen at {seg['origin']}")
    add("  token dims of inputs:")
    for d in t["inputs"]:
        add(f"    {d['name']:<32} dim {d['dim']}  {d['size']:<28} {'dynamic' if d['dynamic'] else 'static (stays replicated)'}")
    if t["built_in_graph"]:
        add("  token dims of tensors built inside the graph:")
        for d in t["built_in_graph"]:
            add(f"    {d['name']:<40} dim {d['dim']}  {d['size']}")
    add("  token dims of outputs:")
    for d in t["outputs"]:
        add(f"    {d['name']:<32} dim {d['dim']}  {d['size']}")
    ps = r["passes"]
    if ps["records"]:
        add("  passes:")
        for rec in ps["records"]:
            counts = ", ".join(f"{k}={v}" for k, v in rec["counts"].items()) or "-"
            # a pass that only plans (cache_regions builds its regions beside the graph) is not "unchanged"
            state = "modified" if rec["modified"] else "planned" if rec["counts"] else "unchanged"
            add(f"    {rec['name']:<24} {state:<10} {rec['seconds'] * 1000:8.1f} ms  {counts}")
            for note in rec["notes"]:
                add(f"      {note}")
    else:
        add("  passes: none enabled by these options (the backend would run the captured graph as is)")
    if ps["fell_back"]:
        add(f"  FALLBACK: {ps['fallback_reason']}")
    if r.get("cache_regions"):
        add("  cache regions (per transformer call):")
        for row in r["cache_regions"]:
            add(f"    {row['region']:<7} {row['blocks']:3d} blocks {row['nodes']:6d} nodes  parameters "
                f"{_human_bytes(row['parameter_bytes']):>11} ({100 * row['parameter_share']:5.1f} %)  "
                f"FLOPs {row['flops'] / 1e12:8.3f} T ({100 * row['flop_share']:5.1f} %)")
    if r.get("tensor_parallel"):
        lines.extend(format_tp(r["tensor_parallel"], _human_bytes))
    comm = r.get("communication")
    if comm:
        add(f"  communication of rank {comm['rank']} of {comm['world_size']} per transformer call:")
        for line in comm["streams"]:
            add(f"    {line}")
        for kind, entry in comm["collectives"].items():
            add(f"    {entry['count']:5d} x {kind:<34} {_human_bytes(entry['bytes'])}")
        add(f"    total sent per step: {_human_bytes(comm['bytes_per_step'])}")
        add(f"    all-to-all per attention layer: {_human_bytes(comm['all_to_all_bytes_per_layer'])} "
            f"(DeepSpeed-Ulysses 4*N*h/P with N={comm['tokens']}, h={comm['hidden']}: "
            f"{_human_bytes(comm['deepspeed_formula_bytes_per_layer'])})")
    c = r.get("cfg")
    if c:
        m = c["mesh"]
        add(f"  CFG parallelism: mesh cfg {m['cfg']} x ulysses {m['ulysses']} x tp {m['tp']} = {c['ranks']} ranks; "
            f"per denoising step (two transformer calls, one per branch) rank 0 sends:")
        add(f"    its call's collectives {_human_bytes(c['per_call_bytes'])} + the output exchange (1 all-gather) "
            f"{_human_bytes(c['exchange_bytes_per_step'])} = {_human_bytes(c['bytes_per_step'])} "
            f"(both calls on the same {m['ulysses'] * m['tp']} rank(s) without CFG parallelism: "
            f"{_human_bytes(c['without_cfg_bytes_per_step'])})")
    tm = r["timings"]
    add(f"  time: build {tm['build_s']:.1f} s, trace {tm['trace_s']:.1f} s, analyses {tm['analysis_s']:.2f} s "
        f"(blocks {tm['analysis_blocks_s']:.2f}, attention {tm['analysis_attention_s']:.2f}, "
        f"token dims {tm['analysis_token_dims_s']:.2f}), passes {tm['passes_s']:.2f} s "
        f"= {tm['passes_s'] / max(tm['trace_s'], 1e-9):.3f} x trace")
    return "\n".join(lines)
