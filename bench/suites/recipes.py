"""recipes: FP8 export wall time, Meta's recipe (the default) against every-linear FP8 (`all`), at two depths.

Meta's recipe (attention and the first and last layer stay in the compute dtype) makes a stage's
layers differ; the exporter traces one layer per distinct layer pattern and stamps it, so the
recipe should cost a trace or two more than `all`'s one, not a whole-stage trace, and
grow with depth like `all`. The `llama-3.1-tiny` preset at 16 and 32 layers (4 and 8
when --quick), TP1 fp16, calibrated on 2 x 16 seeded ids; each export in a fresh child.
"""

from __future__ import annotations

import shutil

from bench.harness import Context, MeasurementError, log
from bench.models import cached_checkpoint, tiny_preset
from bench.report import ratio

RECIPES = ("all", "meta")
CALIB_SHAPE = (2, 16)  # calibration windows of in-vocabulary ids: [samples, seq_len]


def recipe_depths(quick: bool) -> tuple[int, int]:
    return (4, 8) if quick else (16, 32)


def recipe_export_args(ckpt, out, recipe: str) -> dict:
    """The export task's arguments: FP8 with `recipe`, TP1 fp16, seeded calibration ids."""
    return {"checkpoint": str(ckpt), "out": str(out),
            "options": {"tp": 1, "dtype": "float16", "quant": "fp8", "fp8_recipe": recipe,
                        "max_seq_len": 256, "max_batch": 1},
            "calibrate": list(CALIB_SHAPE), "calib_source": "bench ids"}


def run(ctx: Context) -> None:
    """Each depth, every-linear then Meta recipe, one fresh child per export."""
    results: dict[tuple[int, str], dict] = {}
    for layers in recipe_depths(ctx.quick):
        ckpt = cached_checkpoint(ctx.workdir, f"llama-3.1-tiny-{layers}L", tiny_preset(layers), "bfloat16",
                                 created=ctx.created)
        for recipe in RECIPES:
            what = f"fp8 {recipe} recipe, {layers} layers"
            out = ctx.scratch(f"recipes-{recipe}-{layers}L")
            log(f"recipes: export llama-3.1-tiny {what}")
            try:
                results[(layers, recipe)] = ctx.measure("recipes", what, "export",
                                                        recipe_export_args(ckpt, out, recipe))["result"]
            except MeasurementError as err:
                ctx.fail("recipes", what, err)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    recipe_rows(ctx, recipe_depths(ctx.quick), results)


def _traces(n: int | None) -> str:
    return "? one-layer traces" if n is None else f"{n} one-layer trace{'s' if n != 1 else ''}"


def recipe_rows(ctx: Context, depths: tuple[int, int], results: dict[tuple[int, str], dict]) -> None:
    """Wall per export, meta / all per depth, deep / shallow per recipe, traces per stage."""
    samples, seq = CALIB_SHAPE
    for (layers, recipe), r in results.items():
        rest = r["wall_s"] - r["trace_s"] - r["weights_s"]
        ctx.add("recipes", f"fp8 {recipe} recipe, {layers} layers: export wall", r["wall_s"], "s",
                f"stage graph {r['trace_s']:.1f} s ({_traces(r.get('traces'))} {r.get('traces_s', 0.0):.1f} s, "
                f"then stamping and passes), weights {r['weights_s']:.1f} s, rest {rest:.1f} s "
                f"(calibration on {samples} x {seq} ids, save, check); llama-3.1-tiny, TP1 fp16")
    for layers in depths:
        d, m = results.get((layers, "all")), results.get((layers, "meta"))
        if d is None or m is None:
            continue
        extra = m.get("traces_s", 0.0) - d.get("traces_s", 0.0)
        ctx.add("recipes", f"export wall, meta / all, {layers} layers", ratio(m["wall_s"], d["wall_s"]), "x",
                f"{m['wall_s']:.1f} vs {d['wall_s']:.1f} s (+{m['wall_s'] - d['wall_s']:.1f} s); one-layer traces "
                f"{m.get('traces', '?')} vs {d.get('traces', '?')}, one per distinct layer pattern: tracing "
                f"+{extra:.1f} s, the same at every depth (no whole-stage trace)")
    shallow, deep = depths
    for recipe in RECIPES:
        a, b = results.get((shallow, recipe)), results.get((deep, recipe))
        if a is None or b is None:
            continue
        ctx.add("recipes", f"export wall, {deep} / {shallow} layers, {recipe} recipe", ratio(b["wall_s"], a["wall_s"]),
                "x", f"{a['wall_s']:.1f} -> {b['wall_s']:.1f} s; stage graph {a['trace_s']:.1f} -> {b['trace_s']:.1f} s, "
                f"one-layer traces {a.get('traces', '?')} -> {b.get('traces', '?')}; the two recipes should "
                "grow alike (a whole-stage trace would grow with the layers)")
    m = results.get((deep, "meta"))
    if m is not None and m.get("traces") is not None:
        d = results.get((deep, "all"), {})
        ctx.add("recipes", f"fp8 meta recipe, {deep} layers: one-layer traces per stage", m["traces"], "traces",
                f"all recipe: {d.get('traces', '?')}; Meta's layer patterns: first and last layer "
                f"unquantized, the {deep - 2} between with FP8 MLP only")
