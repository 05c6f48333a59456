"""fp8: artifact size fp16 vs fp8, calibration time and RSS against layers, fidelity fp8 vs fp16.
"""

from __future__ import annotations

import shutil

from bench.harness import Context, MeasurementError, dir_bytes
from bench.models import cached_checkpoint, checkpoint_bytes
from bench.report import gb
from export.quantization import quantization_named


def run(ctx: Context) -> None:
    """Artifact size fp16 vs fp8; calibration time and RSS vs layers; fidelity fp8 vs fp16."""
    width = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=32000)
    from export.synth import synth_config
    layer_counts = (2, 4) if ctx.quick else (4, 16)
    ckpts = {}
    for layers in layer_counts:
        cfg = synth_config("llama-3.1-8b", None, layers, None).replace(**width)
        ckpts[layers] = cached_checkpoint(ctx.workdir, f"fp8-{layers}l", cfg, "bfloat16", created=ctx.created)
    small = ckpts[layer_counts[0]]
    sizes = {}
    for quant in ("none", "fp8"):
        out = ctx.workdir / "scratch" / f"fp8-bench-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        options = {"tp": 1, "dtype": "float16", "quant": quant, "max_seq_len": 256, "max_batch": 1}
        if quantization_named(quant).quantized:
            options["fp8_recipe"] = "all"  # every linear of the 2- or 4-layer model (Meta's would keep half 16-bit)
        try:
            ctx.measure("fp8", f"export {quant}", "export", {"checkpoint": str(small), "out": str(out),
                                                            "options": options,
                                                            "calibrate": quantization_named(quant).needs_activation_scales})
            sizes[quant] = dir_bytes(out, ".data")
            if quantization_named(quant).quantized:
                m = ctx.measure("fp8", "fidelity", "fidelity", {"checkpoint": str(small), "artifact": str(out),
                                                                "vocab": width["vocab_size"], "tokens": 96,
                                                                "max_seq_len": 256})
                ref16 = ctx.workdir / "scratch" / "fp8-bench-none"
                m16 = ctx.measure("fp8", "fidelity fp16", "fidelity", {"checkpoint": str(small), "artifact": str(ref16),
                                                                     "vocab": width["vocab_size"], "tokens": 96,
                                                                     "max_seq_len": 256})
                for tag, res in (("fp8", m["result"]), ("fp16", m16["result"])):
                    ctx.add("fp8", f"fidelity vs fp32 checkpoint, {tag} artifact: top-1 agreement",
                            round(res.get("top1_agreement", float("nan")), 4), "",
                            f"{layer_counts[0]} layers, hidden 512, random weights, 96 random tokens")
                    ctx.add("fp8", f"fidelity vs fp32 checkpoint, {tag} artifact: perplexity delta",
                            round(res.get("perplexity_delta_rel", float("nan")) * 100, 3), "%",
                            f"perplexity {res.get('perplexity', float('nan')):.3f} vs "
                            f"{res.get('reference_perplexity', float('nan')):.3f}")
        except MeasurementError as err:
            ctx.fail("fp8", f"export/fidelity {quant}", err)
    if len(sizes) == 2:
        ctx.add("fp8", "artifact weights, fp8 / fp16", round(sizes["fp8"] / sizes["none"], 3), "x",
                f"{sizes['fp8'] / 1e9:.3f} GB vs {sizes['none'] / 1e9:.3f} GB; embedding and lm_head stay fp16 "
                "and dominate this small model; quantized linears themselves shrink 2x")
    for layers, path in ckpts.items():
        try:
            m = ctx.measure("fp8", f"calibrate {layers}", "calibrate", {"checkpoint": str(path), "vocab": width["vocab_size"],
                                                                         "samples": 4, "seq_len": 128})
            ctx.add("fp8", f"calibration, {layers} layers: wall", round(m["result"]["seconds"], 2), "s",
                    "4 x 128 tokens, one layer in memory at a time")
            ctx.add("fp8", f"calibration, {layers} layers: peak RSS - baseline", gb(m["rss"]["peak_delta"]),
                    "GB", f"checkpoint {checkpoint_bytes(path) / 1e9:.3f} GB")
        except (MeasurementError, KeyError) as err:
            ctx.fail("fp8", f"calibrate {layers}", err)
    shutil.rmtree(ctx.workdir / "scratch" / "fp8-bench-none", ignore_errors=True)
    shutil.rmtree(ctx.workdir / "scratch" / "fp8-bench-fp8", ignore_errors=True)

