"""serving: continuous batching against lockstep batching on one mixed workload (runner/serve.py).

One child (task_serving) loads our TP1 fp32 static artifact of the decode suite's 125M model once
and serves the same requests twice, continuous then lockstep, at the same --max-batch: prompt
and output lengths drawn uniformly with a fixed seed, greedy, every request arriving at the
start. Per mode: generated tokens per second of wall time, the mean time to first token, and
the CPU time the process spent (onnxruntime's threads not spinning): on a machine others keep
busy the wall times stretch, the CPU time much less, so the ratio is given on both. Both modes
must produce the same tokens (each request's output is its output alone), which the child checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from bench.harness import Context, MeasurementError, log
from bench.models import cached_checkpoint, decode_config

SERVING_THREADS = 2  # intra-op threads (the batching and genai suites' figure)
SERVING_TIMEOUT = 3 * 3600


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    requests: int
    prompt_tokens: tuple[int, int]  # drawn uniformly from [low, high]
    new_tokens: tuple[int, int]
    max_batch: int
    max_seq_len: int  # holds a lockstep batch: the longest prompt + the most new tokens
    seed: int = 0


def serving_plan(quick: bool) -> ServingPlan:
    if quick:
        return ServingPlan(requests=8, prompt_tokens=(4, 32), new_tokens=(2, 16), max_batch=4, max_seq_len=64)
    return ServingPlan(requests=64, prompt_tokens=(16, 512), new_tokens=(16, 256), max_batch=8, max_seq_len=1024)


def workload(plan: ServingPlan, vocab: int) -> list[tuple[list[int], int]]:
    """(prompt ids, new tokens) of each request, from plan.seed."""
    import numpy as np
    rng = np.random.default_rng(plan.seed)
    out = []
    for _ in range(plan.requests):
        length = int(rng.integers(plan.prompt_tokens[0], plan.prompt_tokens[1] + 1))
        new = int(rng.integers(plan.new_tokens[0], plan.new_tokens[1] + 1))
        out.append(([int(t) for t in rng.integers(3, vocab, size=length)], new))
    return out


def prep_serving():
    import onnxruntime  # noqa: F401

    import runner.backends.ort  # noqa: F401
    import runner.serve  # noqa: F401


def task_serving(args: dict) -> dict:
    """{mode: totals + cpu_s} for continuous and lockstep over the plan's workload, and whether
    both gave every request the same tokens."""
    from runner.backends.ort import OrtBackend
    from runner.backends.ort_threads import OrtThreads
    from runner.generate import SamplingOptions
    from runner.serve import Request, serve
    plan = ServingPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["plan"].items()})
    backend = OrtBackend(args["artifact"], threads=OrtThreads(threads=args["threads"], spinning="off"))
    requests = [Request(tuple(prompt), SamplingOptions(max_new_tokens=new))
                for prompt, new in workload(plan, backend.config.vocab_size)]
    out, tokens = {}, {}
    for mode in ("continuous", "lockstep"):
        cpu = time.process_time()
        served = serve(backend, requests, plan.max_batch, mode)
        out[mode] = {**served.totals(), "cpu_s": time.process_time() - cpu}
        tokens[mode] = [c.tokens for c in served.completions]
        log(f"  serving: {mode}: {out[mode]['tokens_per_second']:.2f} tokens/s, mean TTFT "
            f"{out[mode]['mean_time_to_first_token_s']:.2f} s, {out[mode]['decode_steps']} decode steps, "
            f"CPU {out[mode]['cpu_s']:.0f} s")
    out["same_tokens"] = tokens["continuous"] == tokens["lockstep"]
    return out


def run(ctx: Context, plan: ServingPlan | None = None) -> None:
    """The suite of `make bench` (plan: serving_plan), or a smaller workload (main)."""
    cfg = decode_config(ctx.quick)
    plan = plan or serving_plan(ctx.quick)
    ckpt = cached_checkpoint(ctx.workdir, f"decode-{'quick' if ctx.quick else '100m'}", cfg, "float32",
                             created=ctx.created)
    artifact = ctx.workdir / "scratch" / "serving-artifact"
    shutil.rmtree(artifact, ignore_errors=True)
    ctx.add("serving", "model", cfg.num_parameters() / 1e6, "M params",
            f"fp32, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers; TP1 static cache, max_seq_len "
            f"{plan.max_seq_len}, onnxruntime CPU, {SERVING_THREADS} threads; {plan.requests} requests, prompts "
            f"{plan.prompt_tokens[0]}-{plan.prompt_tokens[1]}, outputs {plan.new_tokens[0]}-{plan.new_tokens[1]} "
            f"tokens (seed {plan.seed}), greedy, max batch {plan.max_batch}")
    try:
        log(f"serving: export TP1 fp32 static cache, max_seq_len {plan.max_seq_len}")
        ctx.measure("serving", "export", "export", {"checkpoint": str(ckpt), "out": str(artifact), "options": {
            "tp": 1, "dtype": "float32", "kv_cache": "static", "max_seq_len": plan.max_seq_len,
            "max_batch": plan.max_batch}})
        log("serving: continuous vs lockstep batching")
        m = ctx.measure("serving", "serve", "serving", {"artifact": str(artifact), "threads": SERVING_THREADS,
                                                        "plan": dataclasses.asdict(plan)}, timeout=SERVING_TIMEOUT)
    except MeasurementError as err:
        ctx.fail("serving", "continuous vs lockstep", err)
        return
    finally:
        shutil.rmtree(artifact, ignore_errors=True)
    r = m["result"]
    cont, lock = r["continuous"], r["lockstep"]
    same = "same tokens as lockstep" if r["same_tokens"] else "TOKENS DIFFER from lockstep"
    for mode, t in (("continuous", cont), ("lockstep", lock)):
        ctx.add("serving", f"{mode}: generated tokens/s", t["tokens_per_second"], "tokens/s",
                f"{t['generated_tokens']} tokens in {t['seconds']:.1f} s, {t['decode_steps']} decode steps, "
                f"CPU {t['cpu_s']:.1f} s" + (f"; {same}" if mode == "continuous" else ""))
        ctx.add("serving", f"{mode}: mean time to first token", t["mean_time_to_first_token_s"], "s")
    ctx.add("serving", "continuous / lockstep tokens/s", cont["tokens_per_second"] / lock["tokens_per_second"], "x",
            f"CPU time: {lock['cpu_s'] / cont['cpu_s']:.2f}x (lockstep CPU s / continuous CPU s)")
    ctx.add("serving", "lockstep / continuous mean time to first token",
            lock["mean_time_to_first_token_s"] / cont["mean_time_to_first_token_s"], "x")


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.suites.serving`: the suite on a workload of your size (the full one takes
    long on a busy CPU), the same model and table; the full suite is `python -m bench --only serving`."""
    from bench.report import write_report
    full = serving_plan(quick=False)
    p = argparse.ArgumentParser(prog="python -m bench.suites.serving", description=main.__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=full.requests)
    p.add_argument("--prompts", default="{}-{}".format(*full.prompt_tokens), help="LOW-HIGH prompt tokens")
    p.add_argument("--outputs", default="{}-{}".format(*full.new_tokens), help="LOW-HIGH new tokens")
    p.add_argument("--max-batch", type=int, default=full.max_batch)
    p.add_argument("--workdir", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    prompts, outputs = (tuple(int(n) for n in text.split("-")) for text in (args.prompts, args.outputs))
    plan = ServingPlan(args.requests, prompts, outputs, args.max_batch,
                       max_seq_len=max(full.max_seq_len, prompts[1] + outputs[1]))
    ctx = Context(workdir=args.workdir, quick=False, created=[])
    started = time.perf_counter()
    run(ctx, plan)
    write_report(ctx, ["serving"], False, time.perf_counter() - started)
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
