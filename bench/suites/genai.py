"""genai: onnxruntime-genai on its own graph and on ours, against our runner on the same graphs.

Decode tokens/s and long-prompt prefill seconds, not memory; each variant in fresh children of
the timing task (bench/suites/genai_speed.py), idle-gated, passes alternated; medians of the
clean measurements (bench/__main__.py's docstring tells the whole procedure).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from bench.harness import Context, MeasurementError, log, one_line
from bench.models import cached_checkpoint, decode_config, random_prompt
from bench.peers import run_genai_builder
from bench.report import GB, gb, ratio, same_prefix


GENAI_THREADS = 2  # intra-op threads for every session of the suite (genai's own default is 1)
GENAI_IDLE_CORES = 0.25  # clean: other processes used fewer CPUs than this during the measurement
GENAI_IDLE_WAIT_S = 30  # at most this long, per child, waiting for the machine to go idle...
GENAI_IDLE_WAIT_TOTAL_S = 240  # ...and this long over the whole suite
GENAI_REPEATS = 3  # clean measurements wanted per variant and kind (decode, prefill)
GENAI_TIMEOUT = 1800
OVERHEAD_REPEATS = 4  # profiled decodes per variant in the overhead child (after one warm-up)


@dataclasses.dataclass(frozen=True)
class GenaiPlan:
    prompt_len: int
    new_tokens: int
    prefill_len: int
    max_seq_len: int  # the static / concat artifacts every runtime shares
    ratio_lens: tuple[int, int]  # static decode at these two max_seq_len, ours
    repeats: int = GENAI_REPEATS
    passes: int = 2  # each variant in a fresh child once per pass, the order reversed every other pass
    per_pass: int = 2  # measurements of each kind per child; one extra child where clean ones are short
    idle_wait_s: float = GENAI_IDLE_WAIT_S  # per child, at most, waiting for the machine to go idle


def genai_plan(quick: bool) -> GenaiPlan:
    if quick:
        # One pass, two measurements per variant, no waiting for idle and no extra child for a
        # noisy variant: the quick plan checks the rows, not the figures (make test runs it).
        return GenaiPlan(prompt_len=8, new_tokens=8, prefill_len=64, max_seq_len=96, ratio_lens=(128, 4096),
                         repeats=0, passes=1, idle_wait_s=0.0)
    return GenaiPlan(prompt_len=32, new_tokens=64, prefill_len=512, max_seq_len=640, ratio_lens=(128, 4096))


def genai_models(quick: bool) -> dict[str, tuple[str, Any]]:
    """name -> (checkpoint cache label, config): the decode suite's ~125M model (vocab 32000,
    same cache entry) and the same with Llama 3's vocabulary (~272M). The quick plan (make test:
    it checks the rows, not the figures) runs A alone: B is the same code on a wider vocabulary."""
    a = decode_config(quick)
    if quick:
        return {"A": ("decode-quick", a)}
    return {"A": ("decode-100m", a), "B": ("genai-272m-v128256", a.replace(vocab_size=128256))}


def genai_config_copy(src: Path, dst: Path, threads: int, max_length: int,
                      profile_prefix: str | None = None) -> dict[str, Any]:
    """dst/: src's genai_config.json with session_options.intra_op_num_threads = threads and
    search.max_length = max_length (and onnxruntime's profiler on, its files named
    profile_prefix*, where given), every other entry of src symlinked (the graph and its data
    stay where they are); end-of-text ids outside the vocabulary are dropped (the model builder
    adds Llama 3's tokenizer's 128001 to a 32000-token model, which genai refuses). Returns what
    was changed."""
    cfg = json.loads((src / "genai_config.json").read_text())
    model = cfg["model"]
    session_options = model["decoder"].setdefault("session_options", {})
    session_options["intra_op_num_threads"] = threads
    if profile_prefix is not None:
        session_options["enable_profiling"] = profile_prefix
    cfg.setdefault("search", {})["max_length"] = max_length
    vocab = model["vocab_size"]
    eos = model.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    kept = [i for i in ids if isinstance(i, int) and 0 <= i < vocab]
    dropped = [i for i in ids if i not in kept]
    if dropped and kept:
        model["eos_token_id"] = kept if len(kept) > 1 else kept[0]
    pad = model.get("pad_token_id")
    pad_fixed = isinstance(pad, int) and not 0 <= pad < vocab and bool(kept)
    if pad_fixed:
        model["pad_token_id"] = kept[0]
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name != "genai_config.json":
            (dst / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    (dst / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"threads": threads, "max_length": max_length, "eos_dropped": dropped,
            "pad_token_id": model.get("pad_token_id") if pad_fixed else None}


def _median(values: list[float]) -> float | None:
    import statistics
    return statistics.median(values) if values else None


def clean_values(values: list[float], others: list[float], cores: float) -> tuple[list[float], str]:
    """The measurements during which other processes used under `cores` CPUs, and a note; all
    of them, flagged, when none was clean."""
    kept = [x for x, o in zip(values, others, strict=True) if o < cores]
    if kept:
        return kept, f"{len(kept)} clean of {len(values)}"
    return list(values), f"none of {len(values)} clean (others used >= {cores} cores): inflated"


def _spread(values: list[float], note: str, digits: int = 1) -> str:
    if not values:
        return "no measurement"
    return f"median, {note} ({min(values):.{digits}f}-{max(values):.{digits}f})"


GENAI_TITLES = {
    "genai_own": "onnxruntime-genai, its own graph (model builder -p fp32 -e cpu)",
    "genai_static": "onnxruntime-genai, our static graph",
    "genai_concat": "onnxruntime-genai, our concat graph",
    "ours_static": "ours (OrtBackend), static graph",
    "ours_concat": "ours (OrtBackend), concat graph",
}


def measure_genai_variants(ctx: Context, name: str, variants: list[dict], common: dict,
                           plan: GenaiPlan, waited: list[float]) -> dict:
    """Each variant in its own fresh child (one runtime per process, as it would be deployed:
    onnxruntime-genai's sessions in the same process slowed our 128K-vocabulary prefill 1.5x),
    `plan.passes` times, alternating: ours and genai interleaved, the order reversed every other
    pass, so they share the machine's drift. A variant still short of `plan.repeats` clean
    measurements gets one more child. waited[0]: idle-gate seconds spent so far in the suite
    (added to). Returns task_genai_speed's shape, merged."""
    lists = ("decode_tps", "prefill_s", "decode_others", "prefill_others")
    merged: dict[str, dict] = {v["key"]: {k: [] for k in lists} for v in variants}
    gate = {"cores": common["idle_cores"], "waited_s": 0.0, "children": 0}

    def run(v: dict, label: str) -> None:
        r = merged[v["key"]]
        if "error" in r:
            return
        wait = max(0.0, min(plan.idle_wait_s, GENAI_IDLE_WAIT_TOTAL_S - waited[0]))
        try:
            m = ctx.measure("genai", f"{name} {v['key']} {label}", "genai_speed", {
                **common, "variants": [v], "repeats": plan.per_pass, "max_rounds": plan.per_pass + 1,
                "budget_s": 30, "idle_wait_s": wait}, timeout=GENAI_TIMEOUT)
        except MeasurementError as err:
            r["error"] = str(err)
            return
        got = m["result"]["variants"][v["key"]]
        for k in lists:
            r[k] += got[k]
        for k in ("load_s", "threads_api", "tokens", "error"):
            if k in got:
                r.setdefault(k, got[k])
        gate["waited_s"] += m["result"]["gate"]["waited_s"]
        waited[0] += m["result"]["gate"]["waited_s"]
        gate["children"] += 1

    for p in range(plan.passes):
        for v in variants if p % 2 == 0 else variants[::-1]:
            run(v, f"pass {p + 1}")

    def clean(r: dict, key: str) -> int:
        return sum(o < gate["cores"] for o in r[key])

    for v in variants:
        r = merged[v["key"]]
        if clean(r, "decode_others") < plan.repeats or (v["prefill"] and clean(r, "prefill_others") < plan.repeats):
            run(v, "extra")
    return {"variants": merged, "gate": gate}


def genai_rows(ctx: Context, name: str, cfg, plan: GenaiPlan, result: dict, notes: dict[str, str]) -> None:
    """Rows of one model's genai_speed result: decode and prefill per variant, ours / genai."""
    v, cores = result["variants"], result["gate"]["cores"]
    model = f"model {name} ({cfg.num_parameters() / 1e6:.0f} M, vocab {cfg.vocab_size})"
    per_token = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * 4  # bytes a step reads

    def pick(key: str, what: str) -> tuple[list[float], str]:
        r = v.get(key, {})
        return clean_values(r.get(what, []), r.get(what.split("_")[0] + "_others", []), cores)

    def med(key: str, what: str) -> float | None:
        return _median(pick(key, what)[0])

    for key, title in GENAI_TITLES.items():
        if key not in v and key not in notes:
            continue
        r = v.get(key, {})
        if not r.get("decode_tps"):
            why = r.get("error") or notes.get(key) or "not measured"
            ctx.add("genai", f"{model}, {title}: decode", f"not measured: {why}")
            continue
        tps = med(key, "decode_tps")
        against = [_spread(*pick(key, "decode_tps")), f"{GENAI_THREADS} intra-op threads",
                   f"{per_token * tps / GB:.1f} GB/s of weights"]
        if key in notes:
            against.append(notes[key])
        ctx.add("genai", f"{model}, {title}: decode", tps, "tokens/s", "; ".join(against))
        if r.get("prefill_s"):
            ctx.add("genai", f"{model}, {title}: {plan.prefill_len}-token prefill", med(key, "prefill_s"), "s",
                    _spread(*pick(key, "prefill_s"), digits=2))
    for mode in ("static", "concat"):
        ours, theirs = f"ours_{mode}", f"genai_{mode}"
        ctx.add("genai", f"{model}: decode, ours / genai on our {mode} graph",
                ratio(med(ours, "decode_tps"), med(theirs, "decode_tps")), "x",
                "target >= 1 (ours at least as fast as genai on the same graph); medians")
        ctx.add("genai", f"{model}: {plan.prefill_len}-token prefill seconds, ours / genai on our {mode} graph",
                ratio(med(ours, "prefill_s"), med(theirs, "prefill_s")), "x", "target <= 1; medians")
    ctx.add("genai", f"{model}: decode, ours static / genai on its own graph",
            ratio(med("ours_static", "decode_tps"), med("genai_own", "decode_tps")), "x",
            "its graph: GroupQueryAttention over a shared KV buffer" if "genai_own" in v
            else f"genai's own graph not measured: {notes.get('genai_own', 'no export')}")
    ctx.add("genai", f"{model}: {plan.prefill_len}-token prefill seconds, ours static / genai on its own graph",
            ratio(med("ours_static", "prefill_s"), med("genai_own", "prefill_s")), "x", "")
    a, b = plan.ratio_lens
    short, long = f"ours_static_{a}", f"ours_static_{b}"
    if short in v or long in v:
        for key, n in ((short, a), (long, b)):
            r = v.get(key, {})
            ctx.add("genai", f"{model}, ours static graph, max_seq_len {n}: decode",
                    med(key, "decode_tps") if r.get("decode_tps") else f"failed: {r.get('error', 'not measured')}",
                    "tokens/s", _spread(*pick(key, "decode_tps")))
        ctx.add("genai", f"{model}: static decode, max_seq_len {b} / {a} (ours)",
                ratio(med(long, "decode_tps"), med(short, "decode_tps")), "x",
                "target >= 0.90 (within 10%): the static graph's attention spans the whole buffer")
    reference = v.get("ours_static", {}).get("tokens")
    if reference:
        same = [f"{k.replace('_', ' ')} {same_prefix(reference, v[k]['tokens'])}/{len(reference)}"
                for k in ("genai_own", "genai_static", "genai_concat", "ours_concat") if v.get(k, {}).get("tokens")]
        if same:
            ctx.add("genai", f"{model}: greedy tokens equal to ours static (prefix)", ", ".join(same), "tokens",
                    "a sanity check that every runtime ran the same weights")


def overhead_rows(ctx: Context, model: str, root: Path, variants: list[dict], common: dict) -> None:
    """Per decode step, the time each runtime spends outside onnxruntime's Run on our graphs
    (bench/suites/genai_speed.py task_genai_overhead): the part of a step that is the runtime's
    own, not the kernels both share. Rows per variant, then ours less genai per cache mode."""
    outside: dict[str, float] = {}
    for v in variants:
        key = v["key"]
        if key not in ("ours_static", "genai_static", "ours_concat", "genai_concat"):
            continue
        profile_dir = root / f"profile-{key}"
        profile_dir.mkdir()
        path = Path(v["path"])
        if v["kind"] == "genai":
            path = root / f"{key}-profiled"
            genai_config_copy(Path(v["path"]), path, GENAI_THREADS, v["max_len"], str(profile_dir / "genai"))
        try:
            m = ctx.measure("genai", f"{model} {key} overhead", "genai_overhead", {
                **common, "variant": {**v, "path": str(path)}, "repeats": OVERHEAD_REPEATS,
                "profile_dir": str(profile_dir)}, timeout=GENAI_TIMEOUT)
        except MeasurementError as err:
            ctx.fail("genai", f"{model}, {GENAI_TITLES[key]}: decode step outside onnxruntime's Run", err)
            continue
        r = m["result"]
        outside[key] = r["outside_s"]
        ctx.add("genai", f"{model}, {GENAI_TITLES[key]}: decode step outside onnxruntime's Run",
                r["outside_s"] * 1e6, "us", f"median of {r['steps']} steps (step {r['step_s'] * 1e3:.1f} ms, Run "
                f"{r['run_s'] * 1e3:.1f} ms); onnxruntime's profiler on in both runtimes (it slows both)")
    for mode in ("static", "concat"):
        ours, theirs = outside.get(f"ours_{mode}"), outside.get(f"genai_{mode}")
        if ours is not None and theirs is not None:
            ctx.add("genai", f"{model}: decode step outside Run, ours - genai on our {mode} graph",
                    (ours - theirs) * 1e6, "us", "what our Python adds per step that genai's C++ does not "
                    "(feed checks, input binding, output allocation, sampling)")


def run(ctx: Context) -> None:
    """Decode tokens/s and long-prompt prefill seconds, batch 1, greedy, fp32, for
    onnxruntime-genai on its own model-builder graph and on our TP1 artifacts (genai_config.json
    copies with the same thread count), and our runner on the same artifacts, static and concat;
    plus our static decode at two max_seq_len. Each variant runs in fresh children, alternated
    (measure_genai_variants); medians of the clean measurements are reported."""
    plan = genai_plan(ctx.quick)
    gate_rows: list[dict] = []
    waited = [0.0]
    for name, (label, cfg) in genai_models(ctx.quick).items():
        ckpt = cached_checkpoint(ctx.workdir, label, cfg, "float32", created=ctx.created)
        model = f"model {name} ({cfg.num_parameters() / 1e6:.0f} M, vocab {cfg.vocab_size})"
        ctx.add("genai", model, cfg.num_parameters() / 1e6, "M params",
                f"fp32, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
                f"{cfg.num_key_value_heads} heads; batch 1, {plan.prompt_len}-token prompt, {plan.new_tokens} "
                f"greedy tokens ({plan.new_tokens - 1} timed steps), {plan.prefill_len}-token prefill, "
                f"max_seq_len {plan.max_seq_len}")
        root = ctx.scratch(f"genai-{name}")
        root.mkdir(parents=True)
        notes: dict[str, str] = {}
        variants: list[dict] = []
        try:
            arts: dict[str, Path] = {}
            exports = [("static", plan.max_seq_len), ("concat", plan.max_seq_len)]
            if name == "A":
                exports += [("static", n) for n in plan.ratio_lens]
            for mode, n in exports:
                art = root / f"ours-{mode}-{n}"
                log(f"genai: {model}: export TP1 fp32 {mode} cache, max_seq_len {n}")
                try:
                    ctx.measure("genai", f"{name} export {mode} {n}", "export", {
                        "checkpoint": str(ckpt), "out": str(art),
                        "options": {"tp": 1, "dtype": "float32", "kv_cache": mode, "max_seq_len": n}})
                    arts[f"{mode}-{n}"] = art
                except MeasurementError as err:
                    ctx.fail("genai", f"{model}: export {mode} max_seq_len {n}", err)
            own = root / "genai-own"
            try:
                built = run_genai_builder(ctx, ckpt, own)
            except Exception as err:  # noqa: BLE001 — the peer never takes the suite down
                built = one_line(err)
            if isinstance(built, str):
                notes["genai_own"] = built
                log(f"genai: {model}: genai's own graph not measured: {built}")
            else:
                ctx.add("genai", f"{model}: genai model builder export", built["wall_s"], "s",
                        f"process wall (run with {built['python']}); process-tree peak RSS {gb(built['peak']):.2f} GB")
                changed = genai_config_copy(own, root / "genai-own-run", GENAI_THREADS, plan.max_seq_len)
                notes["genai_own"] = (f"config copy: intra_op_num_threads {GENAI_THREADS}, max_length "
                                      f"{plan.max_seq_len}" + (f", out-of-vocab eos {changed['eos_dropped']} dropped"
                                                              if changed["eos_dropped"] else ""))
                variants.append({"key": "genai_own", "kind": "genai", "path": str(root / "genai-own-run"),
                                 "max_len": plan.max_seq_len, "prefill": True})
            for mode in ("static", "concat"):
                art = arts.get(f"{mode}-{plan.max_seq_len}")
                if art is None:
                    continue
                variants.append({"key": f"ours_{mode}", "kind": "ours", "path": str(art),
                                 "max_len": plan.max_seq_len, "prefill": True})
                run_dir = root / f"genai-ours-{mode}"
                genai_config_copy(art, run_dir, GENAI_THREADS, plan.max_seq_len)
                notes[f"genai_{mode}"] = (f"copy of our genai_config.json with session_options.intra_op_num_threads "
                                          f"{GENAI_THREADS} (genai runs 1 thread without it)")
                variants.append({"key": f"genai_{mode}", "kind": "genai", "path": str(run_dir),
                                 "max_len": plan.max_seq_len, "prefill": True})
            for n in plan.ratio_lens if name == "A" else ():
                if f"static-{n}" in arts:
                    variants.append({"key": f"ours_static_{n}", "kind": "ours", "path": str(arts[f"static-{n}"]),
                                     "max_len": n, "prefill": False})
            os.sync()  # the exports' writeback must not run under the measurements
            log(f"genai: {model}: {len(variants)} variants, each in a fresh child {plan.passes} times "
                f"(order alternating), {plan.per_pass} idle-gated measurements per child")
            result = measure_genai_variants(ctx, name, variants, {
                "prompt": random_prompt(cfg.vocab_size, plan.prompt_len),
                "long_prompt": random_prompt(cfg.vocab_size, plan.prefill_len), "new_tokens": plan.new_tokens,
                "threads": GENAI_THREADS, "idle_cores": GENAI_IDLE_CORES}, plan, waited)
            for key, r in result["variants"].items():
                if key.startswith("ours") and r.get("threads_api") is False:
                    notes[key] = "this checkout's OrtBackend has no OrtThreads: its default threads"
            genai_rows(ctx, name, cfg, plan, result, notes)
            overhead_rows(ctx, model, root, variants, {
                "prompt": random_prompt(cfg.vocab_size, plan.prompt_len), "new_tokens": plan.new_tokens,
                "threads": GENAI_THREADS})
            gate_rows.append({**result["gate"], "others": [o for r in result["variants"].values()
                                                           for o in r["decode_others"] + r["prefill_others"]]})
            for key, r in result["variants"].items():
                if r.get("error"):
                    ctx.failures.append(f"genai: {model}: {key}: {r['error']}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    others = [o for g in gate_rows for o in g["others"]]
    if others:
        clean = [o for o in others if o < GENAI_IDLE_CORES]
        ctx.add("genai", "idle gate: clean measurements / all", f"{len(clean)}/{len(others)}", "",
                f"clean: other processes used < {GENAI_IDLE_CORES} cores meanwhile (/proc/stat less this "
                f"process; median {_median(others):.2f}, max {max(others):.2f} cores over all); "
                f"{sum(g['children'] for g in gate_rows)} children, {plan.per_pass} measurements each "
                f"(>= {plan.repeats} clean wanted per variant); "
                f"{sum(g['waited_s'] for g in gate_rows):.0f} s waited for idle (<= {plan.idle_wait_s:.0f} s per child, "
                f"{GENAI_IDLE_WAIT_TOTAL_S} s in all); "
                f"{os.cpu_count()} cores")

