"""plan: paper numbers for 405B FP8 TP8 (memory per rank, the decode roofline) until a GPU
with TensorRT is here; no measurement, no child.
"""

from __future__ import annotations

from bench.harness import Context
from bench.report import gb

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3 peak; decode reads every weight once per token


def run(ctx: Context) -> None:
    """Paper numbers until a GPU with TensorRT is here: 405B FP8 TP8 memory per rank and the
    memory-bandwidth floor of one decode step that a measured engine will be held against."""
    from engines.plan import PlanRequest, plan
    from export.config import preset
    for seq_len, batch in ((131072, 1), (8192, 8)):
        result = plan(PlanRequest.of(config=preset("llama-3.1-405b"), tp=8, quant="fp8", dtype="float16",
                                  max_batch=batch, max_seq_len=seq_len, max_input_len=512))
        peak = result.peak
        label = f"405B fp8 (Meta's recipe, the default) TP8, batch {batch}, context {seq_len}, 512 tokens/step"
        ctx.add("plan", f"{label}: weights per GPU", gb(peak.weights_bytes), "GB", "rank 0 (all ranks equal)")
        ctx.add("plan", f"{label}: KV cache per GPU", gb(peak.kv_cache_bytes), "GB",
                f"{batch} x {seq_len} x 126 layers x 1 KV head x 128 x 2 x 2 B")
        ctx.add("plan", f"{label}: activations per GPU", gb(peak.activation_bytes), "GB", "unfused attention scores included")
        ctx.add("plan", f"{label}: total per GPU", gb(peak.total_bytes), "GB",
                f"{'fits' if result.fits else 'does NOT fit'} 80 GiB H100 with 2 GiB reserve")
        if batch == 1:
            floor_ms = peak.weights_bytes / H100_HBM_BYTES_PER_S * 1e3
            ctx.add("plan", "405B fp8 TP8: roofline decode latency per token", round(floor_ms, 2), "ms",
                    f"{peak.weights_bytes / 1e9:.1f} GB weights per rank / 3.35 TB/s HBM (+ 2 all-reduces per layer, "
                    "not counted); the engine's measured latency is held against this")

