"""decode: greedy tokens/s of onnxruntime on our artifact, HF transformers and our torch backend,
against the memory-bandwidth bound.
"""

from __future__ import annotations

import shutil

from bench.harness import Context, MeasurementError, log
from bench.models import cached_checkpoint, decode_config, random_prompt
from bench.report import GB, gb, same_prefix


def run(ctx: Context) -> None:
    cfg = decode_config(ctx.quick)
    ckpt = cached_checkpoint(ctx.workdir, f"decode-{'quick' if ctx.quick else '100m'}", cfg, "float32",
                             created=ctx.created)
    prompt_len, new_tokens = (16, 16) if ctx.quick else (16, 64)
    max_seq_len = 128
    prompt = random_prompt(cfg.vocab_size, prompt_len)
    geometry = (f"fp32, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}; "
                f"batch 1, {prompt_len}-token prompt, {new_tokens} greedy steps, max_seq_len {max_seq_len}")
    ctx.add("decode", "model", cfg.num_parameters() / 1e6, "M params", geometry)
    artifact = ctx.workdir / "scratch" / "decode-artifact"
    shutil.rmtree(artifact, ignore_errors=True)
    log("decode: export TP1 fp32 static cache")
    results: dict[str, dict] = {}
    try:
        ctx.measure("decode", "export", "export", {"checkpoint": str(ckpt), "out": str(artifact), "options": {
            "tp": 1, "dtype": "float32", "kv_cache": "static", "max_seq_len": max_seq_len,
            "max_batch": 1}})
        log("decode: onnxruntime")
        results["ort"] = ctx.measure("decode", "ort", "decode_ort", {"artifact": str(artifact), "prompt": prompt,
                                                "new_tokens": new_tokens})
    except MeasurementError as err:
        ctx.fail("decode", "onnxruntime", err)
    finally:
        shutil.rmtree(artifact, ignore_errors=True)
    for key, task in (("hf", "decode_hf"), ("torch", "decode_torch")):
        log(f"decode: {key}")
        try:
            results[key] = ctx.measure("decode", key, task, {"checkpoint": str(ckpt), "prompt": prompt,
                                          "new_tokens": new_tokens, "max_seq_len": max_seq_len})
        except MeasurementError as err:
            ctx.fail("decode", key, err)
    bw = None
    try:
        log("decode: memory read bandwidth")
        bw = ctx.measure("decode", "membw", "membw", {"bytes": 256 * 1024**2 if ctx.quick else 1024**3})["result"]
    except MeasurementError as err:
        ctx.fail("decode", "memory bandwidth", err)
    # Bytes a decode step must read: every weight once, except the embedding (one row).
    per_token = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * 4
    bound = None
    if bw is not None:
        best = max(bw["gbps_1thread"], bw["gbps_all"])
        bound = best * GB / per_token
        ctx.add("decode", "memory read bandwidth (numpy sum of 1 GB, best of 3)", best, "GB/s",
                f"1 thread {bw['gbps_1thread']:.1f} GB/s, {bw['threads']} threads {bw['gbps_all']:.1f} GB/s")
        ctx.add("decode", "bandwidth bound", bound, "tokens/s",
                f"{per_token / GB:.2f} GB of weights read per token (all but the embedding)")
    hf = results.get("hf", {}).get("result", {}).get("tokens_per_s")
    titles = {"ort": "onnxruntime, our artifact (static cache)", "hf": "HF transformers generate (PyTorch eager)",
              "torch": "our torch backend (eager)"}
    for key in ("ort", "hf", "torch"):
        if key not in results:
            continue
        r = results[key]["result"]
        against = []
        if key != "hf" and hf:
            against.append(f"{r['tokens_per_s'] / hf:.2f}x HF")
        if bound:
            against.append(f"{100 * r['tokens_per_s'] / bound:.0f}% of the bandwidth bound")
        ctx.add("decode", f"{titles[key]}: decode", r["tokens_per_s"], "tokens/s", ", ".join(against))
        ctx.add("decode", f"{titles[key]}: peak RSS - baseline", gb(results[key]["rss"]["peak_delta"]),
                "GB", f"absolute {gb(results[key]['rss']['peak']):.2f} GB")
    if "ort" in results and "hf" in results:
        a, b = results["ort"]["result"]["tokens"], results["hf"]["result"]["tokens"]
        ctx.add("decode", "greedy tokens equal to HF's (prefix)", f"{same_prefix(a, b)}/{len(b)}", "tokens",
                "a sanity check that both ran the same model")


