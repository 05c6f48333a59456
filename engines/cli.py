"""`build-engine` (= `llama405 build`) and `llama405 plan`: the command-line face of engines/.

`runner/cli.py` wires the two subcommands with `add_parsers(sub)` and dispatches `build` to
`run_build`, `plan` to `run_plan`. `main()` is the `build-engine` console script.

Exit codes (export/cli_run.py): 0 ok (also `--stage onnx`, which stops after the ONNX artifact
on purpose), 2 bad input (one line on stderr), 3 TensorRT or a suitable GPU is missing: the ONNX
artifact is finished and one line on stderr says what is missing and how to continue; 70 a
llama405 bug (traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engines.profiles import parse_size
from engines.plan import DTYPE_BYTES
from export.cli_flags import (FP8_ONLY, NOT_FROM_ARTIFACT, ArgumentParser, FlagScope, add_export_flags,
                              add_option_flags, add_verify_flag, calibration_file, export_options_from, flag_type,
                              positive_int)
from export.config import PRESETS
from export.cli_run import run_command
from export.errors import InputError
from export.io_guard import refuse_outputs_over_inputs
from export.trt_flavours import FLAVOURS

size = flag_type(parse_size)  # argparse type: "16GiB", "512MiB", a byte count
# The export options a plan asks about (its flags are the export's: export/cli_flags.py).
PLANNED = ("tp", "pp", "dtype", "quant", "fp8_recipe", "fp8_exclude", "kv_cache", "max_batch", "max_seq_len", "logits")


def positive_size(text: str) -> int:
    """argparse type: a size of at least one byte."""
    value = size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return value


ENGINE_STAGE = FlagScope(lambda a: a.stage == "engine", "shapes the engines, which --stage onnx does not build")


def add_build_flags(p: ArgumentParser) -> None:
    """The export flags (same names and defaults as `llama405 export`) plus the engine flags."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="Hugging Face checkpoint directory (exported to --out first)")
    src.add_argument("--artifact", type=Path, help="an exported artifact directory to build engines for")
    p.add_argument("--out", type=Path, help="artifact directory to create, or to reuse when its manifest matches")
    add_export_flags(p)
    p.add_scoped("--force", action="store_true", default=False, scopes=(NOT_FROM_ARTIFACT,),
                 help="re-export even when --out holds a matching artifact")
    eng = p.add_argument_group("engine")
    eng.add_argument("--stage", choices=("onnx", "engine"), default="engine",
                     help="stop after the ONNX artifact (onnx) or build engines too (engine, default)")
    engine = (ENGINE_STAGE,)

    def engine_flag(*names: str, **kwargs) -> None:
        p.add_scoped(*names, scopes=engine, group=eng, **kwargs)

    engine_flag("--trt", choices=sorted(FLAVOURS), default="tensorrt",
                help="tensorrt (default): TensorRT >= 10.16 on the NVIDIA GPU the engine is for (H100 FP8); "
                     "rtx: TensorRT-RTX, ahead of time for --target GPUs, on any machine (no GPU needed)")
    engine_flag("--target", help="rtx: compute capabilities, e.g. sm89,sm120 (default sm80,sm86,sm89,sm120; "
                                 "FP8 artifacts: sm89,sm120,sm121)")
    engine_flag("--max-input-len", type=positive_int,
                help="largest tokens per step, i.e. the prefill chunk (default min(2048, max-seq-len))")
    engine_flag("--opt-batch", type=positive_int, help="batch TensorRT tunes kernels for (default max-batch)")
    engine_flag("--opt-input-len", type=positive_int, default=1,
                help="tokens per step TensorRT tunes for (default 1: decode)")
    engine_flag("--builder-opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                help="TensorRT builder optimization level (default 3)")
    engine_flag("--workspace", type=positive_size, help="builder workspace limit, e.g. 16GiB (default: TensorRT's)")
    engine_flag("--weight-streaming", action="store_true", default=False,
                help="build for weight streaming (weights in host memory)")
    engine_flag("--strip-plan", action="store_true", default=False,
                help="strip weights from the plan (STRIP_PLAN + REFIT_IDENTICAL); refitted from the ONNX at load")
    engine_flag("--workers", type=positive_int, default=1, help="ranks built in parallel, one GPU each")
    engine_flag("--timing-cache", type=Path, help="timing cache file (default ART/timing.cache)")
    add_verify_flag(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout; log lines go to stderr")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a Llama 3.1 geometry (no checkpoint needed)")
    src.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint directory (its config.json)")
    src.add_argument("--config", type=Path, help="a config.json file")
    src.add_argument("--artifact", type=Path, help="an exported artifact (its manifest's geometry and options)")
    add_option_flags(p, PLANNED, None)  # the export's flags; unset = the export's default or the artifact's
    p.add_argument("--kv-cache-dtype", choices=tuple(DTYPE_BYTES), help="KV-cache element type (default: the compute dtype)")
    p.add_argument("--max-input-len", type=positive_int, help="tokens per step (default min(2048, max-seq-len))")
    p.add_argument("--attention", choices=("unfused", "fused"), default="unfused",
                   help="unfused (default, conservative): count the [batch, heads, tokens, context] scores; "
                        "fused: assume TensorRT's fused attention never materialises them")
    p.add_argument("--gpu-mem", type=positive_size, default="80GiB", help="memory of one GPU (default 80GiB: H100)")
    p.add_argument("--reserve", type=size, default="2GiB",
                   help="per-GPU reserve for CUDA context, NCCL, workspaces (default 2GiB)")
    p.add_argument("--json", action="store_true")


def add_parsers(subparsers) -> None:
    """`llama405 build` and `llama405 plan`."""
    p = subparsers.add_parser("build", help="checkpoint -> ONNX artifact -> TensorRT engine per rank",
                              description=__doc__.splitlines()[0])
    add_build_flags(p)
    p = subparsers.add_parser("plan", help="per-GPU memory: weights, KV cache, activations; does it fit?")
    add_plan_flags(p)
    p = subparsers.add_parser("inspect", help="what TensorRT's ONNX parser makes of each rank graph, and its engines")
    p.add_argument("artifact", type=Path, help="an exported artifact directory")
    p.add_argument("--ranks", help="only these ranks, e.g. 0-3")
    p.add_argument("--json", action="store_true")


# -- build -----------------------------------------------------------------------------------

def _calibration(args, options):
    """What --calib-text/--calib-samples/--calib-seq-len ask for (None: no calibration)."""
    wanted, text = calibration_file(args, options)
    if not wanted:
        return None
    from engines.flow import CalibrationRequest
    from export.calibrate import read_calibration_text
    _, source = read_calibration_text(text)
    return CalibrationRequest(source=source, samples=args.calib_samples, seq_len=args.calib_seq_len, text=text)


def _build_overrides(args) -> dict:
    overrides = {"max_batch": args.max_batch, "max_seq_len": args.max_seq_len, "max_input_len": args.max_input_len,
                 "opt_batch": args.opt_batch, "opt_input_len": args.opt_input_len,
                 "optimization_level": args.builder_opt_level,
                 "workspace_bytes": args.workspace,
                 "weight_streaming": args.weight_streaming, "strip_plan": args.strip_plan, "workers": args.workers,
                 "timing_cache": args.timing_cache, "flavour": args.trt, "target": args.target}
    if args.ranks and args.artifact is not None:
        from export.manifest import load_manifest
        from export.sharding import parse_rank_list
        manifest = load_manifest(args.artifact, only=[])
        overrides["ranks"] = tuple(parse_rank_list(args.ranks, manifest.tp * manifest.pp))
    return overrides


def run_build(args) -> int:
    """Exit 0 done; EnginesNotBuilt (the TensorRT flavour or its GPU missing after the ONNX stage,
    exit 3) and every Llama405Error (2) propagate to run_command."""
    from engines.build import EnginesNotBuilt
    from engines.flow import build, describe
    if args.checkpoint is not None and args.out is None:
        raise InputError("--checkpoint needs --out ART: the artifact directory to create (or reuse)")
    if args.artifact is not None and args.out is not None:
        raise InputError("--out goes with --checkpoint; with --artifact the engines are written into it")
    stream = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        print(line, file=stream, flush=True)

    export_options = export_options_from(args) if args.checkpoint is not None else None
    try:
        result = build(checkpoint=args.checkpoint, artifact=args.artifact, out=args.out,
                       export_options=export_options,
                       build_overrides=_build_overrides(args), stage=args.stage, force=args.force,
                       progress=sys.stderr.isatty() and not args.json, log=log,
                       calibration=_calibration(args, export_options) if export_options is not None else None,
                       verify=args.verify)
    except EnginesNotBuilt as missing:
        if args.json:
            print(json.dumps({"artifact": str(missing.artifact), "stage": "onnx", "missing": missing.missing}))
        raise
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(describe(result))
    return 0


# -- plan ------------------------------------------------------------------------------------

def plan_request(args):
    import dataclasses
    from engines.plan import PlanRequest
    from export.config import LlamaConfig, preset
    from export.options import ExportOptions
    exported = ExportOptions()  # what an export would use by default, or (--artifact) what it used
    checkpoint_exclude: tuple[str, ...] = ()
    if args.preset:
        config = preset(args.preset)
    elif args.config:
        config = LlamaConfig.from_hf(args.config)
    elif args.checkpoint:
        from export.checkpoint import Checkpoint
        source = Checkpoint(args.checkpoint)  # reads headers only; undoes duplicated KV heads
        config = source.config
        # A pre-quantized checkpoint's unquantized modules stay so, as the export honours them.
        checkpoint_exclude = source.quantization.fp8_exclude_patterns()
    else:
        from export.manifest import load_manifest
        manifest = load_manifest(args.artifact, only=[])
        config, exported = manifest.config, manifest.options
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else getattr(exported, k) for k in PLANNED}
    if not dataclasses.replace(exported, quant=chosen["quant"]).quantization.quantized:
        # FP8_ONLY, decided once the artifact's quant is known
        given = next((f for f in ("fp8_recipe", "fp8_exclude") if getattr(args, f) is not None), None)
        if given is not None:
            raise InputError(f"--{given.replace('_', '-')}: {FP8_ONLY.why}; drop it or plan --quant fp8")
    chosen["fp8_exclude"] = tuple(chosen["fp8_exclude"]) + checkpoint_exclude
    return PlanRequest(config=config, options=dataclasses.replace(exported, **chosen), max_input_len=args.max_input_len,
                       kv_cache_dtype=args.kv_cache_dtype, attention=args.attention, gpu_bytes=args.gpu_mem,
                       reserve_bytes=args.reserve)


def run_plan(args) -> int:
    from engines.plan import format_table, plan, plan_json
    result = plan(plan_request(args))
    if args.json:
        print(json.dumps(plan_json(result)))
    else:
        print(format_table(result))
    return 0


def run_inspect(args) -> int:
    from engines.inspect import format_summary, inspect_artifact
    ranks = None
    if args.ranks:
        from export.manifest import load_manifest
        from export.sharding import parse_rank_list
        manifest = load_manifest(args.artifact, only=[])
        ranks = parse_rank_list(args.ranks, manifest.tp * manifest.pp)
    summary = inspect_artifact(args.artifact, ranks)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="build-engine", description=__doc__.splitlines()[0])
    add_build_flags(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0), or a flag argparse refused: one line, exit 2
        return done.code
    def command() -> int:
        refuse_outputs_over_inputs("build", args)  # export/io_guard.py: before anything is written
        return run_build(args)
    return run_command("build-engine", command)


if __name__ == "__main__":
    sys.exit(main())
