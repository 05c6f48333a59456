"""batching: what the attention mask's width W costs a static-cache decode step (docs/batching.md).

With per-sequence write slots the live length is the runner's choice each step: W = the longest
live row (attention reads W slots: less bandwidth), W = max_seq_len (every decode step the same
shapes: CUDA graphs) or power-of-two buckets between (export/kv_cache.py:decode_width). One child
(task_decode_width) loads our TP1 fp32 static artifact of the decode suite's 125M model once and
times decode steps at several live lengths L with each width, alternated round by round so all
share the machine's drift, each measurement idle-gated and tagged with the CPU other processes used meanwhile (as the genai
suite does); the table gives medians of the clean measurements. Beside the wall time it
records the CPU time the process spent per step, with onnxruntime's threads not spinning (a
spinning pool burns CPU time while it waits): on a machine others keep busy the wall time
stretches, the work done per step much less.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time

from bench.harness import Context, IdleGate, MeasurementError, log
from bench.models import cached_checkpoint, decode_config

WIDTH_THREADS = 2  # intra-op threads of every session (the genai suite's figure too)
WIDTH_IDLE_CORES = 0.25  # clean: other processes used fewer CPUs than this meanwhile
WIDTH_TIMEOUT = 3600


@dataclasses.dataclass(frozen=True)
class WidthPlan:
    max_seq_len: int
    lengths: tuple[int, ...]  # live lengths L (slots in use after the step)
    batch: tuple[int, ...]  # rows decoded per step
    steps: int  # decode steps per measurement
    rounds: int  # measurements per (batch, L, W), alternating the W order
    idle_wait_s: float


def width_plan(quick: bool) -> WidthPlan:
    if quick:
        return WidthPlan(max_seq_len=256, lengths=(16, 200), batch=(1,), steps=4, rounds=2, idle_wait_s=5)
    return WidthPlan(max_seq_len=4096, lengths=(100, 600, 2100, 4000), batch=(1, 4), steps=12, rounds=4,
                     idle_wait_s=120)


def prep_decode_width():
    import onnxruntime  # noqa: F401

    import runner.backends.ort  # noqa: F401


def task_decode_width(args: dict) -> dict:
    """ms per decode step {batch: {L: {policy: [wall ms], policy_cpu: [CPU ms], policy_others:
    [cores others used]}}} for each of export/kv_cache.py's DECODE_WIDTHS (live: W = L, buckets:
    L rounded up to a power of two, max: W = max_seq_len). Each step feeds one token per row at
    slot L - 1 of that row (the cache's contents do not change the time), the mask's first L
    columns set."""
    import numpy as np

    from export.kv_cache import DECODE_WIDTHS, decode_width
    from runner.backends.base import make_feed
    from runner.backends.ort import OrtBackend
    from runner.backends.ort_threads import OrtThreads
    backend = OrtBackend(args["artifact"], threads=OrtThreads(threads=args["threads"], spinning="off"))
    gate = IdleGate(args["idle_cores"], args["idle_wait_s"])
    out: dict[str, dict] = {}

    def feed(batch: int, live: int, width: int):
        mask = np.zeros((batch, width), dtype=np.int64)
        mask[:, :live] = 1
        return make_feed(np.full((batch, 1), 5), np.full((batch, 1), live - 1), mask)

    def steps(batch: int, live: int, width: int) -> tuple[float, float]:
        """(wall ms, CPU ms) per step."""
        step = feed(batch, live, width)
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(args["steps"]):
            backend.infer(step)
        n = args["steps"]
        return (time.perf_counter() - started) / n * 1e3, (time.process_time() - cpu) / n * 1e3

    for batch in args["batch"]:
        backend.start(batch)
        per_len = out[str(batch)] = {}
        for live in args["lengths"]:
            widths = {kind: decode_width(kind, live, args["max_seq_len"]) for kind in DECODE_WIDTHS}
            r = per_len[str(live)] = {f"{kind}{part}": [] for kind in widths for part in ("", "_cpu", "_others")}
            r["widths"] = widths
            for width in widths.values():
                steps(batch, live, width)  # warm-up: onnxruntime plans each new shape once
            for round_ in range(args["rounds"]):
                for kind in DECODE_WIDTHS if round_ % 2 == 0 else DECODE_WIDTHS[::-1]:
                    (wall, cpu), others = gate.measure(lambda: steps(batch, live, widths[kind]))  # noqa: B023
                    r[kind].append(wall)
                    r[f"{kind}_cpu"].append(cpu)
                    r[f"{kind}_others"].append(others)
            log(f"  batching: batch {batch}, L {live}: " + ", ".join(
                f"W={w} {statistics.median(r[k]):.1f} ms (CPU {statistics.median(r[k + '_cpu']):.1f})"
                for k, w in widths.items()))
    return {"widths": out, "gate": {"cores": gate.cores, "waited_s": gate.waited}}


def _clean_median(values: list[float], others: list[float], cores: float) -> tuple[float, str]:
    kept = [v for v, o in zip(values, others, strict=True) if o < cores]
    if kept:
        return statistics.median(kept), f"{len(kept)} clean of {len(values)}"
    return statistics.median(values), f"none of {len(values)} clean (others used >= {cores} cores): inflated"


def run(ctx: Context) -> None:
    cfg = decode_config(ctx.quick)
    plan = width_plan(ctx.quick)
    ckpt = cached_checkpoint(ctx.workdir, f"decode-{'quick' if ctx.quick else '100m'}", cfg, "float32",
                             created=ctx.created)
    artifact = ctx.workdir / "scratch" / "batching-artifact"
    shutil.rmtree(artifact, ignore_errors=True)
    ctx.add("batching", "model", cfg.num_parameters() / 1e6, "M params",
            f"fp32, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
            f"{cfg.num_key_value_heads} heads; TP1 static cache, max_seq_len {plan.max_seq_len}, "
            f"onnxruntime CPU, {WIDTH_THREADS} threads, not spinning")
    try:
        log(f"batching: export TP1 fp32 static cache, max_seq_len {plan.max_seq_len}")
        ctx.measure("batching", "export", "export", {"checkpoint": str(ckpt), "out": str(artifact), "options": {
            "tp": 1, "dtype": "float32", "kv_cache": "static", "max_seq_len": plan.max_seq_len,
            "max_batch": max(plan.batch)}})
        log("batching: decode ms/step, W = live vs W = max_seq_len")
        m = ctx.measure("batching", "decode width", "decode_width", {
            "artifact": str(artifact), "threads": WIDTH_THREADS, "idle_cores": WIDTH_IDLE_CORES,
            **dataclasses.asdict(plan)}, timeout=WIDTH_TIMEOUT)
    except MeasurementError as err:
        ctx.fail("batching", "decode width", err)
        return
    finally:
        shutil.rmtree(artifact, ignore_errors=True)
    for batch, per_len in m["result"]["widths"].items():
        for live, r in per_len.items():
            live_ms, _ = _clean_median(r["live"], r["live_others"], WIDTH_IDLE_CORES)
            live_cpu = statistics.median(r["live_cpu"])
            for kind, width in r["widths"].items():
                ms, note = _clean_median(r[kind], r[f"{kind}_others"], WIDTH_IDLE_CORES)
                cpu = statistics.median(r[f"{kind}_cpu"])
                against = "" if kind == "live" else f"{ms / live_ms:.2f}x W = live; "
                against += f"CPU {cpu:.1f} ms/step" + ("" if kind == "live" else f" ({cpu / live_cpu:.2f}x)")
                ctx.add("batching", f"decode, batch {batch}, {live} live slots, W = {width} ({kind})", ms, "ms/step",
                        f"{against}; {note}")
