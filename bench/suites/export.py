"""export: our exporter on TP8 rank 0 (and all ranks) of 405B-width checkpoints: wall, bytes read,
peak RSS, and GB/s against this disk's sequential write and copy rates.
"""

from __future__ import annotations

import shutil

from bench.harness import Context, MeasurementError, evict_from_page_cache, log
from bench.models import TP_WIDE, cached_checkpoint, wide_config
from bench.report import GB, gb, ratio


def _export_rows(ctx: Context, bench: str, what: str, m: dict, disk: dict | None) -> None:
    r, rss = m["result"], m["rss"]
    written = r["bytes"]
    ctx.add(bench, f"{what}: wall", r["wall_s"], "s",
            f"weights {r['weights_s']:.1f} s + graph trace {r['trace_s']:.1f} s + save/check; "
            f"fsync afterwards {r['flush_s']:.1f} s")
    read = m.get("io", {}).get("read_bytes")
    if read is not None:
        ctx.add(bench, f"{what}: read from disk", gb(read), "GB",
                f"{ratio(read, written):.2f}x the bytes written ({gb(written):.2f} GB): column slices "
                "(o_proj, down_proj, lm_head) are read row by row, ~2 of each row's 8 pages at TP8")
    ctx.add(bench, f"{what}: peak RSS - baseline", gb(rss["peak_delta"]), "GB",
            f"absolute {gb(rss['peak']):.2f} GB (baseline after imports {gb(rss['baseline']):.2f} GB); "
            f"peaks: heap {gb(rss['peak_anon']):.2f} GB, mapped checkpoint pages "
            f"{gb(rss['peak_file']):.2f} GB; process tree {gb(m['proc']['tree_peak']):.2f} GB; "
            f"wrote {gb(written):.2f} GB")
    if disk is None:
        return
    write, copy = disk["write_gbps"], disk.get("copy_gbps")
    whole = written / GB / (r["wall_s"] + r["flush_s"])
    weights = r["data_bytes"] / GB / max(r["weights_s"] + r["flush_s"], 1e-9)
    ctx.add(bench, f"{what}: GB written / (wall + fsync)", whole, "GB/s",
            f"{100 * whole / write:.0f}% of the disk's sequential write (goal >= 70%)"
            + (f"; {100 * whole / copy:.0f}% of its copy rate" if copy else ""))
    ctx.add(bench, f"{what}: weight stream alone, (weights + fsync)", weights, "GB/s",
            f"{100 * weights / write:.0f}% of sequential write"
            + (f", {100 * weights / copy:.0f}% of the copy rate" if copy else "")
            + ": the part that grows with the model")


def _disk_rows(ctx: Context) -> dict | None:
    size = 256 * 1024**2 if ctx.quick else 2 * 1024**3
    log(f"export: disk sequential write/read/copy speed ({size / GB:.1f} GB file in {ctx.workdir})")
    try:
        disk = ctx.measure("export", "disk speed", "disk",
                           {"path": str(ctx.workdir / "disk-speed.tmp"), "bytes": size})["result"]
    except MeasurementError as err:
        ctx.fail("export", "disk sequential write", err)
        return None
    ctx.add("export", "disk sequential write (64 MB os.write + fsync)", disk["write_gbps"], "GB/s",
            f"{disk['bytes'] / GB:.1f} GB file in the workdir, measured after the exports: the yardstick")
    ctx.add("export", "disk sequential read (cold, 64 MB reads)", disk["read_gbps"], "GB/s",
            "the export reads the checkpoint from the same disk")
    ctx.add("export", "disk copy (cold read + write of the same file, fsync)", disk["copy_gbps"], "GB/s",
            "GB written per second when reads and writes share the disk: an I/O-bound export's ceiling")
    return disk


def run(ctx: Context) -> None:
    width = "hidden 1024 (quick)" if ctx.quick else "405B width"
    runs = [(1, "bfloat16"), (2, "bfloat16")] + ([] if ctx.quick else [(2, "float16")])
    measured: dict[tuple[int, str], tuple[str, dict]] = {}
    for layers, dtype in runs:
        cfg = wide_config(layers, ctx.quick)
        ckpt = cached_checkpoint(ctx.workdir, f"405b-width-{layers}L{'-quick' if ctx.quick else ''}",
                                 cfg, "bfloat16", created=ctx.created)
        out = ctx.scratch("export-wide")
        evict_from_page_cache(ckpt)
        cast = "no cast" if dtype == "bfloat16" else "cast from bf16"
        what = f"rank 0/{TP_WIDE}, {layers} layer{'s' if layers > 1 else ''}, {dtype} ({cast})"
        log(f"export: TP{TP_WIDE} rank 0 of {width}: {what}, cold page cache")
        try:
            m = ctx.measure("export", what, "export", {"checkpoint": str(ckpt), "out": str(out), "options": {
                "tp": TP_WIDE, "dtype": dtype, "ranks": [0]}})
        except MeasurementError as err:
            ctx.fail("export", what, err)
            continue
        finally:
            shutil.rmtree(out, ignore_errors=True)
        measured[(layers, dtype)] = (what, m)
    all_ranks_run = None if ctx.quick else _export_all_ranks(ctx)
    # The yardsticks last: the disk test's own writeback must not slow the first export.
    disk = _disk_rows(ctx)
    for what, m in measured.values():
        _export_rows(ctx, "export", what, m, disk)
    if all_ranks_run is not None:
        what, m = all_ranks_run
        ctx.add("export", f"{what}: graph traces", m["result"]["trace_s"], "s",
                f"one trace for the stage, copied to its {TP_WIDE} ranks (was one per rank)")
        _export_rows(ctx, "export", what, m, disk)
    if (1, "bfloat16") in measured and (2, "bfloat16") in measured:
        one, two = measured[(1, "bfloat16")][1]["rss"], measured[(2, "bfloat16")][1]["rss"]
        ctx.add("export", "peak RSS - baseline, 2 layers / 1 layer (bf16)",
                ratio(two["peak_delta"], one["peak_delta"]), "x",
                f"flat in layers = 1.0 ({width}, TP{TP_WIDE} rank 0, cold page cache)")
        ctx.add("export", "peak heap (RssAnon), 2 layers / 1 layer (bf16)",
                ratio(two["peak_anon"], one["peak_anon"]), "x",
                "the part of the peak that is not mapped checkpoint pages")


def _export_all_ranks(ctx: Context) -> tuple[str, dict] | None:
    """All TP8 ranks of the 1-layer 405B-width checkpoint in one export: one trace serves them."""
    ckpt = cached_checkpoint(ctx.workdir, "405b-width-1L", wide_config(1, False), "bfloat16", created=ctx.created)
    out = ctx.scratch("export-wide-all")
    evict_from_page_cache(ckpt)
    what = f"all {TP_WIDE} ranks, 1 layer, bfloat16"
    log(f"export: TP{TP_WIDE} {what} of 405B width, cold page cache")
    try:
        return what, ctx.measure("export", what, "export", {"checkpoint": str(ckpt), "out": str(out),
                                                           "options": {"tp": TP_WIDE, "dtype": "bfloat16"}})
    except MeasurementError as err:
        ctx.fail("export", what, err)
        return None
    finally:
        shutil.rmtree(out, ignore_errors=True)

