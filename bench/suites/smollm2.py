"""smollm2: the demo's trained model (SmolLM2-135M-Instruct, export/demo_model.py) — export wall and
peak RSS of its FP8 (calibrated on the shipped text with its own tokenizer) and fp16 TP1 artifacts,
and onnxruntime's greedy decode tokens/s on each.
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
