"""The genai suite's timing child (bench/suites/genai.py starts it): onnxruntime-genai and our
runner, each variant loaded in this one process, measured in alternated rounds.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path

from bench.harness import IdleGate, log, one_line
from runner.backends.ort_threads import OrtThreads


class _GenaiRun:
    """onnxruntime-genai: og.Model on a directory holding genai_config.json."""

    def __init__(self, path: str):
        import onnxruntime_genai as og
        self.og, self.model = og, og.Model(path)

    def _generator(self, prompt: list[int], new_tokens: int, max_len: int):
        import numpy as np
        params = self.og.GeneratorParams(self.model)
        # min_length: no early stop on an end-of-text id (ours runs without stop ids).
        params.set_search_options(max_length=max_len, min_length=len(prompt) + new_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        started = time.perf_counter()
        generator.append_tokens(np.array([prompt], dtype=np.int32))  # the prefill: runs the model
        return generator, time.perf_counter() - started

    def decode(self, prompt: list[int], new_tokens: int, max_len: int) -> tuple[float, list[int]]:
        """tokens/s over new_tokens - 1 forward steps (the first token comes from the prefill), as
        our Generation.decode_tokens_per_second counts them."""
        generator, _ = self._generator(prompt, new_tokens, max_len)
        generator.generate_next_token()  # picks from the prefill's logits, no forward
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        seconds = time.perf_counter() - started
        return (new_tokens - 1) / seconds, [int(t) for t in generator.get_sequence(0)][len(prompt):]

    def prefill(self, prompt: list[int], max_len: int) -> float:
        return self._generator(prompt, 1, max_len)[1]


class _OursRun:
    """Our runner: OrtBackend with OrtThreads(threads) where this checkout has it."""

    def __init__(self, path: str, threads: int):
        from runner.backends import ort as ours
        threads_api = getattr(ours, "OrtThreads", None)
        self.threads_api = threads_api is not None
        kwargs = {"threads": threads_api(threads=threads)} if threads_api is not None else {}
        self.backend = ours.OrtBackend(path, **kwargs)

    def decode(self, prompt: list[int], new_tokens: int, max_len: int) -> tuple[float, list[int]]:
        from runner.generate import SamplingOptions, generate
        result = generate(self.backend, [prompt], SamplingOptions(max_new_tokens=new_tokens))
        return result.decode_tokens_per_second, result.tokens[0]

    def prefill(self, prompt: list[int], max_len: int) -> float:
        from runner.generate import SamplingOptions, generate
        return generate(self.backend, [prompt], SamplingOptions(max_new_tokens=1)).prefill_seconds


def prep_genai_speed():
    try:  # genai first (as tests/runner/test_genai.py): it finds onnxruntime's library itself
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        pass  # its variants fail one by one, with the reason
    import onnxruntime  # noqa: F401

    import runner.backends.ort
    import runner.generate  # noqa: F401


def task_genai_speed(args: dict) -> dict:
    """Every variant loaded in this one process and warmed up once; then rounds in which each
    variant runs a decode (prompt + new_tokens greedy) and, where asked, a long-prompt prefill.
    Rounds alternate the order (ours and genai interleaved, reversed every other round) so all
    share the machine's noise; every measurement is idle-gated and tagged with the CPU others
    used meanwhile. A variant leaves the rounds once it has `repeats` clean measurements of
    each kind; the rounds end there, or after `max_rounds`, or past `budget_s`."""
    gate = IdleGate(args["idle_cores"], args["idle_wait_s"])
    prompt, long_prompt, new_tokens = args["prompt"], args["long_prompt"], args["new_tokens"]
    repeats, started_all = args["repeats"], time.perf_counter()
    runs, out = {}, {}
    for v in args["variants"]:
        key = v["key"]
        out[key] = {"decode_tps": [], "prefill_s": [], "decode_others": [], "prefill_others": []}
        started = time.perf_counter()
        try:
            runs[key] = _GenaiRun(v["path"]) if v["kind"] == "genai" else _OursRun(v["path"], args["threads"])
            out[key]["load_s"] = time.perf_counter() - started
            if v["kind"] == "ours":
                out[key]["threads_api"] = runs[key].threads_api
            runs[key].decode(prompt, min(4, new_tokens), v["max_len"])  # warm-up
            if v["prefill"]:
                runs[key].prefill(long_prompt, v["max_len"])
        except Exception as err:  # noqa: BLE001 — one variant failing leaves the others measured
            runs.pop(key, None)
            out[key]["error"] = one_line(err)
            log(f"  genai_speed: {key} failed: {out[key]['error']}")

    def complete(v: dict) -> bool:
        r = out[v["key"]]
        return (gate.clean(r["decode_others"]) >= repeats
                and (not v["prefill"] or gate.clean(r["prefill_others"]) >= repeats))

    order = [v for v in args["variants"] if v["key"] in runs]
    rounds = 0
    while rounds < args["max_rounds"] and (rounds < repeats or time.perf_counter() - started_all < args["budget_s"]):
        todo = [v for v in order if v["key"] in runs and not complete(v)]
        if not todo:
            break
        for v in todo if rounds % 2 == 0 else todo[::-1]:
            key, run, r = v["key"], runs[v["key"]], out[v["key"]]
            try:
                if gate.clean(r["decode_others"]) < repeats:
                    (tps, tokens), others = gate.measure(lambda: run.decode(prompt, new_tokens, v["max_len"]))  # noqa: B023
                    r["decode_tps"].append(tps)
                    r["decode_others"].append(others)
                    r.setdefault("tokens", tokens)
                if v["prefill"] and gate.clean(r["prefill_others"]) < repeats:
                    seconds, others = gate.measure(lambda: run.prefill(long_prompt, v["max_len"]))  # noqa: B023
                    r["prefill_s"].append(seconds)
                    r["prefill_others"].append(others)
            except Exception as err:  # noqa: BLE001
                r["error"] = one_line(err)
                log(f"  genai_speed: {key} failed in round {rounds + 1}: {r['error']}")
                runs.pop(key)
        rounds += 1
        log(f"  genai_speed: round {rounds}: " + ", ".join(
            f"{v['key']} {out[v['key']]['decode_tps'][-1]:.1f}@{out[v['key']]['decode_others'][-1]:.2f}"
            for v in todo if out[v["key"]]["decode_tps"]) + " tokens/s@others' cores")
    return {"variants": out, "gate": {"cores": gate.cores, "waited_s": gate.waited, "wait_budget_s": gate.budget,
                                      "rounds": rounds, "seconds": time.perf_counter() - started_all}}




@dataclasses.dataclass(frozen=True)
class _ProfiledThreads(OrtThreads):
    """OrtThreads whose sessions also run onnxruntime's profiler (its files start with prefix)."""

    prefix: str = ""

    def session_options(self, segments: int):
        options = super().session_options(segments)
        options.enable_profiling = True
        options.profile_file_prefix = self.prefix
        return options


def _model_runs(profile_dir: Path) -> list[float]:
    """Seconds of every `model_run` event (one session Run) in the one profile under profile_dir."""
    files = sorted(profile_dir.glob("*.json"))
    if len(files) != 1:
        raise RuntimeError(f"{profile_dir}: expected one onnxruntime profile, found {len(files)}")
    return [e["dur"] / 1e6 for e in json.loads(files[0].read_text()) if e.get("name") == "model_run"]


def task_genai_overhead(args: dict) -> dict:
    """Per decode step, the wall time less onnxruntime's own time in Run (its profiler's
    `model_run` events; the profile is written when the session goes): what a runtime spends
    around the shared kernels -- feeding, binding, sampling. One variant (ours or genai) per
    child, `repeats` greedy decodes after one warm-up; the first step of each (it picks from the
    prefill's logits) runs no forward and is left out."""
    v, prompt, new_tokens = args["variant"], args["prompt"], args["new_tokens"]
    profile_dir = Path(args["profile_dir"])
    walls: list[list[float]] = []
    if v["kind"] == "genai":
        run = _GenaiRun(v["path"])
        for _ in range(args["repeats"] + 1):
            generator, _ = run._generator(prompt, new_tokens, v["max_len"])
            generator.generate_next_token()
            steps = []
            for _ in range(new_tokens - 1):
                started = time.perf_counter()
                generator.generate_next_token()
                steps.append(time.perf_counter() - started)
            walls.append(steps)
            del generator
        del run
    else:
        from runner.backends.ort import OrtBackend
        from runner.generate import SamplingOptions, generate
        backend = OrtBackend(v["path"], threads=_ProfiledThreads(threads=args["threads"], prefix=str(profile_dir / "ours")))
        if len(backend.runners[0].sessions) != 1:
            raise RuntimeError(f"{v['path']}: a rank cut into segments; the overhead task wants one session")
        for _ in range(args["repeats"] + 1):
            walls.append(generate(backend, [prompt], SamplingOptions(max_new_tokens=new_tokens)).step_seconds)
        del backend
    gc.collect()  # the sessions end here and write their profiles
    runs = _model_runs(profile_dir)
    per_call = 1 + (new_tokens - 1)  # a prefill, then one forward per decode step
    if len(runs) != per_call * len(walls):
        raise RuntimeError(f"{len(runs)} onnxruntime runs for {len(walls)} decodes of {new_tokens} tokens")
    outside, wall, inside = [], [], []
    for i, steps in enumerate(walls[1:], start=1):  # walls[0]: the warm-up
        forwards = runs[i * per_call + 1:(i + 1) * per_call]
        outside += [w - r for w, r in zip(steps, forwards, strict=True)]
        wall += steps
        inside += forwards
    return {"outside_s": statistics.median(outside), "step_s": statistics.median(wall),
            "run_s": statistics.median(inside), "steps": len(outside)}
