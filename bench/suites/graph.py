"""graph: how big one decoder layer's graph is. The `llama-3.1-tiny` preset at 4 and 5 layers,
exported TP2 float16; for rank 0, the ONNX node count and TensorRT's parsed layers (engines/inspect.py,
TensorRT-RTX), and their differences: one decoder layer. Counts, not times.
"""

from __future__ import annotations

import shutil
from collections import Counter

from bench.harness import Context, MeasurementError, log
from bench.models import cached_checkpoint, tiny_preset

GRAPH_LAYERS = (4, 5)  # the difference is one decoder layer
GRAPH_OPTIONS = {"tp": 2, "dtype": "float16", "max_seq_len": 256, "ranks": [0]}
GRAPH_RANK = 0
GRAPH_WHAT = "llama-3.1-tiny TP2 fp16, rank 0"
# docs/engines.md's table, same model and rank, recorded before this suite existed.
RECORDED = {"onnx_per_layer_before": 80, "onnx_per_layer_after": 68,
            "trt_4l_before": 1454, "trt_4l_after": 948, "trt_per_layer_after": 157}
RECORDED_WHERE = "docs/engines.md"
# TensorRT layer types per decoder layer, and why that many.
PER_LAYER_KINDS = {
    "ATTENTION_INPUT": (1, "one fused IAttention (ONNX Attention)"),
    "ROTARY_EMBEDDING": (2, "q and k (ONNX RotaryEmbedding)"),
    "KV_CACHE_UPDATE": (2, "K and V (TensorScatter), static cache"),
    "DIST_COLLECTIVE": (2, "all-reduce after o_proj and after down_proj, TP2"),
}


def run(ctx: Context) -> None:
    """Export the 4- and 5-layer tiny model (rank 0 of TP2, fp16), count its graph, diff."""
    artifacts, walls = {}, {}
    try:
        for layers in GRAPH_LAYERS:
            ckpt = cached_checkpoint(ctx.workdir, f"llama-3.1-tiny-{layers}L", tiny_preset(layers), "bfloat16",
                                     created=ctx.created)
            out = ctx.scratch(f"graph-{layers}L")
            log(f"graph: export {GRAPH_WHAT}, {layers} layers")
            m = ctx.measure("graph", f"export {layers} layers", "export",
                            {"checkpoint": str(ckpt), "out": str(out), "options": GRAPH_OPTIONS})
            artifacts[layers], walls[layers] = out, m["result"]["wall_s"]
        log("graph: ONNX nodes and TensorRT's parsed layers of rank 0")
        m = ctx.measure("graph", "graph counts", "graph_counts",
                        {"artifacts": [str(artifacts[n]) for n in GRAPH_LAYERS], "rank": GRAPH_RANK})
        counts = {n: m["result"][str(artifacts[n])] for n in GRAPH_LAYERS}
    except MeasurementError as err:
        ctx.fail("graph", GRAPH_WHAT, err)
        return
    finally:
        for path in artifacts.values():
            shutil.rmtree(path, ignore_errors=True)
    graph_rows(ctx, counts, walls)


def _ops_text(ops: dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])) if n)


def graph_rows(ctx: Context, counts: dict[int, dict], walls: dict[int, float]) -> None:
    """Rows from task_graph_counts' result per layer count: totals, per-layer differences, and
    the figures docs/engines.md recorded before, as what they are held against."""
    small, big = GRAPH_LAYERS
    onnx = {n: sum(counts[n]["onnx_ops"].values()) for n in GRAPH_LAYERS}
    layer_ops = Counter(counts[big]["onnx_ops"])
    layer_ops.subtract(counts[small]["onnx_ops"])
    per_layer = onnx[big] - onnx[small]
    ctx.add("graph", f"{GRAPH_WHAT}, {small} layers: ONNX nodes", onnx[small], "nodes",
            f"{big} layers: {onnx[big]}; export wall {walls.get(small, float('nan')):.1f} / "
            f"{walls.get(big, float('nan')):.1f} s")
    ctx.add("graph", "ONNX nodes per decoder layer", per_layer, "nodes",
            f"{RECORDED['onnx_per_layer_before']} recorded before RoPE as ONNX RotaryEmbedding, "
            f"{RECORDED['onnx_per_layer_after']} after ({RECORDED_WHERE}); this layer: {_ops_text(layer_ops)}")
    ctx.add("graph", "ONNX nodes per decoder layer, now / before RotaryEmbedding",
            per_layer / RECORDED["onnx_per_layer_before"], "x",
            f"{per_layer} vs {RECORDED['onnx_per_layer_before']} ({RECORDED_WHERE})")
    trt = {n: counts[n]["trt"] for n in GRAPH_LAYERS}
    missing = next((t["unavailable"] for t in trt.values() if "unavailable" in t), None)
    if missing is not None:
        for what in (f"{GRAPH_WHAT}, {small} layers: TensorRT layers", "TensorRT layers per decoder layer",
                     *(f"per decoder layer: {kind}" for kind in PER_LAYER_KINDS)):
            ctx.add("graph", what, f"unavailable: {missing}")
        return
    layers = {n: trt[n]["layers"] for n in GRAPH_LAYERS}
    total = {n: sum(layers[n].values()) for n in GRAPH_LAYERS}
    parser = f"{'TensorRT-RTX' if trt[small].get('flavour') == 'rtx' else 'TensorRT'} {trt[small].get('version', '?')}"
    ctx.add("graph", f"{GRAPH_WHAT}, {small} layers: TensorRT layers", total[small], "layers",
            f"{RECORDED['trt_4l_before']} recorded before RoPE as RotaryEmbedding, {RECORDED['trt_4l_after']} "
            f"after ({RECORDED_WHERE}); {big} layers: {total[big]}; {parser}'s ONNX parser")
    ctx.add("graph", "TensorRT layers per decoder layer", total[big] - total[small], "layers",
            f"{RECORDED['trt_per_layer_after']} recorded after RotaryEmbedding ({RECORDED_WHERE})")
    ctx.add("graph", f"TensorRT layers of the {small}-layer rank, now / before RotaryEmbedding",
            total[small] / RECORDED["trt_4l_before"], "x",
            f"{total[small]} vs {RECORDED['trt_4l_before']} ({RECORDED_WHERE}; {RECORDED['trt_4l_after']} "
            "recorded after)")
    for kind, (expected, why) in PER_LAYER_KINDS.items():
        ctx.add("graph", f"per decoder layer: {kind}", layers[big].get(kind, 0) - layers[small].get(kind, 0), "layers",
                f"{expected} expected: {why}; {small}-layer rank {layers[small].get(kind, 0)}")
