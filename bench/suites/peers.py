"""peers: our TP1 export against the peer exporters (onnxruntime-genai's model builder, Optimum) on a
~1B checkpoint: process-tree peak RSS and wall. The peers' venvs and commands are bench/peers.py.
"""

from __future__ import annotations

import shutil

from bench.harness import Context, MeasurementError, evict_from_page_cache, log, whole_peak
from bench.models import cached_checkpoint, checkpoint_bytes, peers_config
from bench.peers import run_peer
from bench.report import gb, ratio


def run(ctx: Context) -> None:
    layers = 2 if ctx.quick else 8
    cfg = peers_config(layers, ctx.quick)
    label = f"peers-1b-{layers}L{'-quick' if ctx.quick else ''}"
    ckpt = cached_checkpoint(ctx.workdir, label, cfg, "bfloat16", created=ctx.created)
    geometry = (f"{cfg.num_parameters() / 1e9:.2f} B params, hidden {cfg.hidden_size}, {layers} layers, "
                f"vocab {cfg.vocab_size}, bf16")
    ctx.add("peers", "checkpoint", gb(checkpoint_bytes(ckpt)), "GB", geometry)
    ours: dict[str, dict] = {}
    for dtype, n_layers in (("float32", layers), ("bfloat16", layers), ("float32", layers // 2)):
        c = ckpt if n_layers == layers else cached_checkpoint(
            ctx.workdir, f"peers-1b-{n_layers}L{'-quick' if ctx.quick else ''}",
            peers_config(n_layers, ctx.quick), "bfloat16", created=ctx.created)
        out = ctx.scratch("export-peers")
        key = f"{dtype}-{n_layers}L"
        evict_from_page_cache(c)  # every exporter, ours and the peers, starts from a cold cache
        log(f"peers: our export, TP1 {dtype}, {n_layers} layers")
        try:
            ours[key] = ctx.measure("peers", f"ours {key}", "export", {
                "checkpoint": str(c), "out": str(out), "options": {"tp": 1, "dtype": dtype}})
        except MeasurementError as err:
            ctx.fail("peers", f"our export TP1 {dtype} {n_layers} layers", err)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    for key, m in ours.items():
        rss = m["rss"]
        dtype, n = key.split("-")
        ctx.add("peers", f"ours, TP1 {dtype}, {n[:-1]} layers: peak RSS", gb(whole_peak(m["proc"])), "GB",
                f"whole process tree (target <= 1.5 GB); {gb(rss['peak_delta']):.2f} GB above the "
                f"baseline after imports; peaks: heap {gb(rss['peak_anon']):.2f} GB, mapped "
                f"checkpoint pages {gb(rss['peak_file']):.2f} GB")
    f32 = ours.get(f"float32-{layers}L")
    f32_half = ours.get(f"float32-{layers // 2}L")
    if f32 and f32_half:
        ctx.add("peers", f"ours, peak RSS {layers} layers / {layers // 2} layers (fp32)",
                ratio(whole_peak(f32["proc"]), whole_peak(f32_half["proc"])), "x", "flat in layers = 1.0")
    peers = {}
    titles = {"genai": "onnxruntime-genai model builder (-p fp32 -e cpu)",
              "optimum": "Optimum export onnx (fp32, text-generation-with-past)"}
    for name in ("genai", "optimum"):
        try:
            peers[name] = run_peer(ctx, name, ckpt)
        except Exception as err:  # noqa: BLE001 — a peer never takes the bench down
            peers[name] = f"{type(err).__name__}: {err}"
        result = peers[name]
        if isinstance(result, str):
            log(f"peers: {name} unavailable: {result}")
            ctx.add("peers", f"{titles[name]}: peak RSS", f"unavailable: {result}")
            continue
        ctx.add("peers", f"{titles[name]}: peak RSS", gb(whole_peak(result)), "GB",
                f"whole process tree (largest process {gb(result['maxrss']):.2f} GB); "
                f"wrote {gb(result['bytes']):.2f} GB")
    for name, title, target in (("genai", "genai", "target <= 0.5"), ("optimum", "Optimum", "")):
        result = peers.get(name)
        if not isinstance(result, dict):
            continue
        for key, m in ours.items():
            if not key.endswith(f"-{layers}L"):
                continue
            dtype = key.split("-")[0]
            # The peers leave writeback to the kernel; so does the comparison (the bench's own
            # fsync after our export is taken out of our process wall).
            r = m["result"]
            ours_wall = m["proc"]["wall_s"] - r["flush_s"]
            ctx.add("peers", f"wall, ours TP1 {dtype} / {title} fp32", ratio(ours_wall, result["wall_s"]), "x",
                    "; ".join(x for x in (target, f"process wall, interpreter start included: ours {ours_wall:.1f} s "
                                          f"(trace {r['trace_s']:.1f} s, weights {r['weights_s']:.1f} s), "
                                          f"{name} {result['wall_s']:.1f} s") if x))
            ctx.add("peers", f"peak RSS, ours TP1 {dtype} / {title} fp32",
                    ratio(whole_peak(m["proc"]), whole_peak(result)), "x", "process-tree peaks")

