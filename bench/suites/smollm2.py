"""smollm2: the demo's trained model (SmolLM2-135M-Instruct, export/demo_model.py) — export wall and
peak RSS of its FP8 (calibrated on the shipped text with its own tokenizer) and fp16 TP1 artifacts,
onnxruntime's greedy decode tokens/s on each, and the FP8 recipes' fidelity on real text: perplexity
and top-1 agreement on the shipped held-out text against the unquantized checkpoint, as
`llama405 parity --reference CKPT --fidelity-text heldout` measures it (docs/fp8-real-activations.md).
"""

from __future__ import annotations

import shutil

from bench.harness import Context, MeasurementError, log
from bench.report import gb
from export.quantization import quantization_named

PROMPT = "Once upon a time"
MAX_SEQ_LEN = 256
CALIB = (4, 256)  # samples x tokens, as `make demo`
ARTIFACTS = {"fp8": {"dtype": "float16", "quant": "fp8"}, "fp16": {"dtype": "float16", "quant": "none"}}
# FP8 recipes measured on held-out text (docs/fp8-real-activations.md): name -> export options.
# --quick keeps the first two.
FP8_RECIPES = {
    "meta (default)": {},
    "all": {"fp8_recipe": "all"},
    "all, smoothing 0.5": {"fp8_recipe": "all", "fp8_smoothing": 0.5},
    "meta + layers 0-3 16-bit": {"fp8_exclude": ["model.layers.[0-3].*"]},
}
HELDOUT_SEQ_LEN = 1024  # the held-out text is 865 tokens with SmolLM2's tokenizer
LINEARS = 7 * 30  # SmolLM2's quantizable linears


def run(ctx: Context) -> None:
    checkpoint = ctx.workdir / "checkpoints" / "smollm2-135m-instruct"
    new_tokens = 8 if ctx.quick else 32
    try:
        log("smollm2: convert-gguf --smollm2 (cached)")
        prompt = ctx.measure("smollm2", "convert", "convert_smollm2", {"out": str(checkpoint), "prompt": PROMPT})
        prompt = prompt["result"]["prompt"]
    except MeasurementError as err:
        ctx.fail("smollm2", "convert-gguf --smollm2", err)
        return
    for name, options in ARTIFACTS.items():
        artifact = ctx.workdir / "scratch" / f"smollm2-{name}"
        shutil.rmtree(artifact, ignore_errors=True)
        calibrates = quantization_named(options["quant"]).needs_activation_scales
        label = f"SmolLM2-135M TP1 {name}" + (" (calibrated on the shipped text)" if calibrates else "")
        try:
            log(f"smollm2: export {name}")
            args = {"checkpoint": str(checkpoint), "out": str(artifact),
                    "options": {"tp": 1, "max_seq_len": MAX_SEQ_LEN, **options}}
            if calibrates:
                args["calib_text"] = list(CALIB)
            done = ctx.measure("smollm2", f"export {name}", "export", args)
            ctx.add("smollm2", f"{label}: export wall", done["result"]["wall_s"], "s",
                    f"trace {done['result']['trace_s']:.1f} s, weights {done['result']['weights_s']:.1f} s, "
                    f"{gb(done['result']['bytes']):.2f} GB written")
            ctx.add("smollm2", f"{label}: export peak RSS", gb(done["rss"]["peak"]), "GB",
                    f"+{gb(done['rss']['peak_delta']):.2f} GB over the interpreter baseline")
            log(f"smollm2: decode {name}")
            decoded = ctx.measure("smollm2", f"decode {name}", "decode_ort",
                                  {"artifact": str(artifact), "prompt": prompt, "new_tokens": new_tokens})
            ctx.add("smollm2", f"{label}: onnxruntime decode", decoded["result"]["tokens_per_s"], "tokens/s",
                    f"batch 1, {len(prompt)}-token prompt {PROMPT!r}, {new_tokens} greedy steps")
        except MeasurementError as err:
            ctx.fail("smollm2", f"{label}", err)
        finally:
            shutil.rmtree(artifact, ignore_errors=True)
    recipes = list(FP8_RECIPES.items())[:2] if ctx.quick else FP8_RECIPES.items()
    for name, extra in recipes:
        fp8_fidelity(ctx, checkpoint, name, extra)


def fp8_fidelity(ctx: Context, checkpoint, name: str, extra: dict) -> None:
    """One FP8 recipe's TP1 artifact against the checkpoint on the held-out text."""
    artifact = ctx.workdir / "scratch" / "smollm2-fp8-recipe"
    shutil.rmtree(artifact, ignore_errors=True)
    label = f"SmolLM2-135M FP8 {name}"
    try:
        log(f"smollm2: export + fidelity, FP8 {name}")
        options = {"tp": 1, "dtype": "float16", "quant": "fp8", "max_seq_len": HELDOUT_SEQ_LEN, **extra}
        ctx.measure("smollm2", f"export fp8 {name}", "export",
                    {"checkpoint": str(checkpoint), "out": str(artifact), "options": options,
                     "calib_text": list(CALIB)})
        done = ctx.measure("smollm2", f"fidelity fp8 {name}", "fidelity_heldout",
                           {"checkpoint": str(checkpoint), "artifact": str(artifact)})["result"]
        ctx.add("smollm2", f"{label}: held-out perplexity vs fp16 checkpoint", round(
            100 * done["perplexity_delta_rel"], 2), "%",
            f"{done['perplexity']:.3f} vs {done['reference_perplexity']:.3f} over {done['predictions']} tokens; "
            f"top-1 agreement {done['top1_agreement']:.3f}; mean KL {done['mean_kl']:.4f}; "
            f"{LINEARS - done['quantized_linears']} of {LINEARS} "
            f"linears 16-bit; calibration {CALIB[0]} x {CALIB[1]} tokens; target +1 %")
    except MeasurementError as err:
        ctx.fail("smollm2", label, err)
    finally:
        shutil.rmtree(artifact, ignore_errors=True)
