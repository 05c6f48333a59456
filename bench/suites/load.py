"""load: what reading one TP8 rank of a 405B-width checkpoint costs (wall, peak RSS), cold page cache.
"""

from __future__ import annotations

from bench.harness import Context, MeasurementError, evict_from_page_cache, log
from bench.models import TP_WIDE, cached_checkpoint, checkpoint_bytes, wide_config
from bench.report import gb, ratio


def run(ctx: Context) -> None:
    cfg = wide_config(2, ctx.quick)
    ckpt = cached_checkpoint(ctx.workdir, f"405b-width-2L{'-quick' if ctx.quick else ''}", cfg,
                             "bfloat16", created=ctx.created)
    total = checkpoint_bytes(ckpt)
    rank = None
    width = "hidden 1024 (quick)" if ctx.quick else "405B width"
    for keep in (False, True):
        label = "keep all slices" if keep else "streaming (keep nothing)"
        evict_from_page_cache(ckpt)
        log(f"load: TP{TP_WIDE} rank 0 of {width}, 2 layers, {label}, cold page cache")
        what = f"rank 0/{TP_WIDE}, {label}"
        try:
            m = ctx.measure("load", what, "load", {"checkpoint": str(ckpt), "tp": TP_WIDE, "keep": keep})
        except MeasurementError as err:
            ctx.fail("load", what, err)
            continue
        r, rss = m["result"], m["rss"]
        rank = r["rank_bytes"]
        read = m.get("io", {}).get("read_bytes")
        ctx.add("load", f"{what}: wall", r["wall_s"], "s",
                f"{gb(rank) / r['wall_s']:.2f} GB/s of rank weights, cold page cache"
                + (f"; read {gb(read):.2f} GB from disk ({ratio(read, rank):.1f}x the rank's weights)"
                   if read is not None else ""))
        ctx.add("load", f"{what}: peak RSS - baseline", gb(rss["peak_delta"]), "GB",
                f"{ratio(rss['peak_delta'], rank):.2f}x the rank's weights ({gb(rank):.2f} GB)")
        ctx.add("load", f"{what}: peak RSS, absolute", gb(rss["peak"]), "GB",
                f"baseline after imports {gb(rss['baseline']):.2f} GB; peaks: heap (RssAnon) "
                f"{gb(rss['peak_anon']):.2f} GB, mapped checkpoint pages (RssFile) {gb(rss['peak_file']):.2f} GB")
    if rank is not None:
        ctx.add("load", f"rank 0/{TP_WIDE} weights", gb(rank), "GB",
                f"1/{total / rank:.1f} of the checkpoint")
    ctx.add("load", "checkpoint", gb(total), "GB",
            f"{width}, 2 layers, bf16, {cfg.num_parameters() / 1e9:.1f} B params")

