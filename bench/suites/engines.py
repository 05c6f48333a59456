"""engines: `llama405 export` and `llama405 build --trt rtx` (TensorRT-RTX, ahead of time, no GPU)
on a 405B-width rank, measured as CLI processes: parse and build seconds, builder peak RSS and
engine bytes against the rank's weight bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (Context, MeasurementError, ProcResult, available_memory, describe_exit,
                           evict_from_page_cache, log, run_watched, whole_peak)
from bench.models import TP_WIDE, cached_checkpoint, checkpoint_bytes, wide_config
from bench.report import GB, Row, gb, ratio
from export.quantization import quantization_named


ENGINES_VOCAB = 16384  # a cut vocabulary: the layer, not the embedding, dominates the rank's bytes
# Calibration text for the cut vocabulary: the shipped text tokenizes to ids up to ~97k, past
# 16384; every token of this one is below 16384 (the largest is 16181).
ENGINES_CALIB_TEXT = ("The model reads the text and writes the next word, one word at a time, until it is done. "
                      "Then it ends, and the people who asked for it read what it wrote. ")
ENGINES_TIMEOUT = 3600


def engines_config(quick: bool):
    """405B width (hidden 1024 when quick), 1 layer, vocab ENGINES_VOCAB."""
    return wide_config(1, quick).replace(vocab_size=ENGINES_VOCAB)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner.cli", *args]


def engines_export_cmd(ckpt: Path, art: Path, quant: str, calib_text: Path | None) -> list[str]:
    cmd = _cli("export", "--checkpoint", str(ckpt), "--out", str(art), "--tp", str(TP_WIDE), "--ranks", "0",
               "--dtype", "float16", "--max-seq-len", "4096", "--max-batch", "1", "--force", "--json")
    if quantization_named(quant).quantized:
        # every linear: the one-layer rank is the 405B layer the FP8 GEMMs are measured on (Meta's
        # default recipe would keep a model's only layer 16-bit)
        cmd += ["--quant", quant, "--fp8-recipe", "all", "--calib-text", str(calib_text), "--calib-samples", "1",
                "--calib-seq-len", "16"]
    return cmd


def engines_build_cmd(art: Path) -> list[str]:
    return _cli("build", "--artifact", str(art), "--trt", "rtx")


def build_cli_has_trt_flag() -> bool:
    done = subprocess.run(_cli("build", "--help"), capture_output=True, text=True, timeout=300, check=False)
    return "--trt" in done.stdout


def run_cli_measured(ctx: Context, label: str, cmd: list[str], timeout: float = ENGINES_TIMEOUT) -> ProcResult:
    """One CLI command with its process tree's peak RSS polled; stopped at 85 % of the memory
    available (the machine is shared). Kept in bench.json's measurements."""
    limit = int(0.85 * available_memory())
    before = os.getloadavg()[0]
    log(f"engines: {label}: {' '.join(cmd[1:])}")
    proc = run_watched(cmd, timeout, rss_limit=limit)
    after = os.getloadavg()[0]
    ctx.loads += [before, after]
    ctx.measurements.append({"bench": "engines", "label": label, "cmd": cmd[1:], "loadavg_1min": [before, after],
                             "proc": {"returncode": proc.returncode, "wall_s": proc.wall_s, "maxrss": proc.maxrss,
                                      "tree_peak": proc.tree_peak, "rss_limit": limit,
                                      "timed_out": proc.timed_out, "over_limit": proc.over_limit},
                             "output_tail": proc.output_tail[-1000:]})
    log(f"  {label}: {proc.wall_s:.1f} s, exit {proc.returncode}, process-tree peak RSS "
        f"{gb(whole_peak(dataclasses.asdict(proc))):.2f} GB")
    if proc.timed_out:
        raise MeasurementError(f"timed out after {timeout:.0f} s")
    if proc.over_limit:
        raise MeasurementError(f"stopped at {gb(limit):.1f} GB process-tree RSS (85% of the memory available)")
    return proc


def _engine_section(art: Path) -> tuple[dict, dict, int]:
    """(manifest["engines"], its rank-0 entry, rank 0's weight bytes from the manifest's files:
    model.onnx.data plus model.onnx, whose inline rank constants — the RoPE tables, 32 MiB in
    fp16 — the engine carries too)."""
    manifest = json.loads((art / "manifest.json").read_text())
    files = manifest.get("files", {})
    data, graph = (files.get(f"rank0/{name}", {}).get("size") for name in ("model.onnx.data", "model.onnx"))
    if not data or not graph:
        raise MeasurementError(f"{art}/manifest.json: no rank0/model.onnx and model.onnx.data in its files")
    weights = data + graph
    engines = manifest.get("engines")
    if not isinstance(engines, dict):
        return {}, {}, weights
    ranks = engines.get("ranks", {})
    return engines, ranks.get("0") or ranks.get(0) or {}, weights


def _engine_rows(ctx: Context, what: str, r: dict) -> None:
    """parse s, build s, builder RSS / weights, engine / weights."""
    e, engines, weights = r["entry"], r["engines"], r["weights"]
    targets = ", ".join(str(t) for t in engines.get("targets") or []) or "default"
    flavour = f"TensorRT-{str(engines.get('flavour', 'rtx')).upper()} {engines.get('version', '?')}"
    size = e.get("size")
    ctx.rows += [
        Row("engines", f"{what}: parse", e.get("parse_s"), "s", f"OnnxParser.parse_from_file, {flavour}"),
        Row("engines", f"{what}: build", e.get("build_s"), "s",
            f"build_serialized_network ahead of time for {targets}; rank total {e.get('seconds', float('nan')):.1f} s, "
            f"`llama405 build` process wall {r['wall_s']:.1f} s"),
        Row("engines", f"{what}: builder peak RSS / rank weight bytes", ratio(r["peak"], weights), "x",
            f"process-tree peak {gb(r['peak']):.2f} GB (largest process {gb(r['maxrss'] or 0):.2f} GB), "
            f"interpreter and TensorRT libraries included, vs weights {gb(weights):.3f} GB"),
        Row("engines", f"{what}: engine bytes / rank weight bytes", ratio(size, weights), "x",
            f"engine {gb(size) if size is not None else float('nan'):.3f} GB vs weights {gb(weights):.3f} GB"),
    ]


def run(ctx: Context) -> None:
    """TP8 rank 0 of a 405B-width 1-layer checkpoint (cut vocabulary), float16 and FP8: export,
    then `llama405 build --trt rtx` (TensorRT-RTX, ahead of time, no GPU needed): parse and
    build seconds, the builder's process-tree peak RSS and the engine's size, each against the
    rank's weight bytes (rank0/model.onnx + .data)."""
    cfg = engines_config(ctx.quick)
    width = "hidden 1024 (quick)" if ctx.quick else "405B width"
    label = f"405b-width-1L-v{ENGINES_VOCAB}{'-quick' if ctx.quick else ''}"
    fresh = len(ctx.created)
    started = time.perf_counter()
    ckpt = cached_checkpoint(ctx.workdir, label, cfg, "bfloat16", created=ctx.created)
    synth_s = time.perf_counter() - started
    made = len(ctx.created) > fresh
    ctx.add("engines", "checkpoint", gb(checkpoint_bytes(ckpt)), "GB",
            f"{width}, 1 layer, vocab {cfg.vocab_size}, bf16, {cfg.num_parameters() / 1e9:.2f} B params; "
            + (f"synthesized in {synth_s:.0f} s" if made else "cached from an earlier run"))
    layer_fp32 = (cfg.num_parameters() - 2 * cfg.vocab_size * cfg.hidden_size - cfg.hidden_size) * 4 / GB
    has_trt = build_cli_has_trt_flag()
    calib = ctx.scratch("engines-calib.txt")
    calib.write_text(ENGINES_CALIB_TEXT, encoding="utf-8")
    results: dict[str, dict] = {}
    for quant, tag in (("none", "fp16"), ("fp8", "fp8")):
        art = ctx.scratch(f"engines-{tag}")
        what = f"{tag}, rank 0/{TP_WIDE}"
        try:
            evict_from_page_cache(ckpt)
            try:
                exp = run_cli_measured(ctx, f"export {tag}", engines_export_cmd(ckpt, art, quant, calib))
            except MeasurementError as err:
                hint = (f"; FP8 calibration holds one unsharded layer in fp32 ({layer_fp32:.1f} GB)"
                        if quantization_named(quant).needs_activation_scales else "")
                raise MeasurementError(f"export: {err}{hint}") from None
            if exp.returncode != 0:
                raise MeasurementError(f"export: {describe_exit(exp.returncode)}: {exp.last_line()}")
            _, _, weights = _engine_section(art)
            ctx.add("engines", f"{what}: export wall", exp.wall_s, "s",
                    f"process wall, cold page cache; process-tree peak RSS {gb(whole_peak(dataclasses.asdict(exp))):.2f} GB"
                    + (f"; FP8 calibration (1 x 16 tokens) holds one unsharded layer in fp32 ({layer_fp32:.1f} GB)"
                       if quantization_named(quant).needs_activation_scales else ""))
            ctx.add("engines", f"{what}: rank weight bytes (rank0/model.onnx + .data)", gb(weights), "GB",
                    "float16, max_seq_len 4096, max_batch 1" if not quantization_named(quant).quantized
                    else "FP8 E4M3 linears, float16 embedding / lm_head / norms")
            if not has_trt:
                raise MeasurementError("build: `llama405 build` has no --trt flag (TensorRT-RTX build not available)")
            evict_from_page_cache(art)
            build = run_cli_measured(ctx, f"build {tag}", engines_build_cmd(art))
            if build.returncode == 3:  # MissingRequirement: TensorRT-RTX bindings absent
                reason = build.last_line()
                log(f"engines: {tag} build unavailable: {reason}")
                ctx.add("engines", f"{what}: build", f"unavailable: {reason}")
                continue
            if build.returncode != 0:
                raise MeasurementError(f"build: {describe_exit(build.returncode)}: {build.last_line()}")
            engines, entry, weights = _engine_section(art)
            if not entry:
                raise MeasurementError("build: exited 0 but manifest.json has no engines.ranks['0']")
            results[tag] = {"engines": engines, "entry": entry, "weights": weights,
                            "peak": whole_peak(dataclasses.asdict(build)), "maxrss": build.maxrss,
                            "wall_s": build.wall_s}
            _engine_rows(ctx, what, results[tag])
        except MeasurementError as err:
            ctx.fail("engines", what, err)
        finally:
            shutil.rmtree(art, ignore_errors=True)
    if "fp16" in results and "fp8" in results:
        a, b = results["fp8"]["entry"].get("size"), results["fp16"]["entry"].get("size")
        ctx.add("engines", "engine bytes, fp8 / fp16", ratio(a, b), "x",
                f"weights fp8 / fp16 {ratio(results['fp8']['weights'], results['fp16']['weights']):.3f}x")

