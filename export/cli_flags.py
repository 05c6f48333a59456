"""Command-line flags shared by the `llama405` subcommands and `build-engine`.

Lives in export/ because both faces (runner/cli.py and engines/cli.py) may import it, and the
flags describe export options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from export.options import CHOICES, DTYPE_CHOICES, ExportOptions
from export.errors import InputError, Llama405Error

T = TypeVar("T")

DEFAULTS = ExportOptions()  # flag defaults are the options' defaults


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the user-error form of export/cli_run.py: a refused flag is one line,
    `prog: error: argument --flag: ...`, and exit code 2 (no usage block; --help shows it).
    Subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """argparse type from a library parser: the Llama405Error it raises (naming the value)
    becomes argparse's error, which names the flag."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except Llama405Error as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = getattr(parse, "__name__", "value")  # argparse: "invalid <name> value"
    return convert


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (refused with one line naming the flag, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_export_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `llama405 export` and of `build` / `build-engine` with --checkpoint: one set of
    names, types and defaults. --max-batch / --max-seq-len default to None, which means the
    export's defaults (ExportOptions) or, for `build --artifact`, the artifact's. Sizes are
    checked by ExportOptions.validate (one line naming the flag), not by argparse."""
    p.add_argument("--tp", type=int, default=DEFAULTS.tp, help="tensor-parallel ranks")
    p.add_argument("--pp", type=int, default=DEFAULTS.pp, help="pipeline stages")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=DEFAULTS.dtype,
                   help="compute dtype (float16 runs on ORT CPU, ORT GPU and TensorRT alike)")
    add_quant_flags(p)
    p.add_argument("--kv-cache", choices=CHOICES["kv_cache"], default=DEFAULTS.kv_cache,
                   help="static: max-seq-len buffers written in place; concat: the past grows each step")
    p.add_argument("--max-batch", type=int, help=f"largest batch (default {DEFAULTS.max_batch})")
    p.add_argument("--max-seq-len", type=int, help=f"KV-cache length (default {DEFAULTS.max_seq_len})")
    p.add_argument("--logits", choices=CHOICES["logits"], default=DEFAULTS.logits,
                   help="return logits for every position or only the last one")
    p.add_argument("--ranks", help="only these ranks, e.g. 0-7 (one node of a multi-node run)")


def export_options_from(args: argparse.Namespace):
    """The ExportOptions the export flags ask for (its dataclass defaults where a flag is unset)."""
    from export.sharding import parse_rank_list
    for flag in ("tp", "pp"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)} must be >= 1")
    ranks = tuple(parse_rank_list(args.ranks, args.tp * args.pp)) if args.ranks else None
    sizes = {k: getattr(args, k) for k in ("max_batch", "max_seq_len") if getattr(args, k) is not None}
    return ExportOptions(tp=args.tp, pp=args.pp, dtype=args.dtype, quant=args.quant, kv_cache=args.kv_cache,
                         logits=args.logits, ranks=ranks, fp8_recipe=args.fp8_recipe,
                         fp8_exclude=tuple(args.fp8_exclude),
                         fp8_checkpoint_exclusions=args.fp8_checkpoint_exclusions,
                         fp8_smoothing=args.fp8_smoothing, **sizes)


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=CHOICES["quant"], default=DEFAULTS.quant,
                   help="fp8: E4M3 weights (per-channel) and activations (per-tensor static scales)")
    p.add_argument("--fp8-recipe", choices=CHOICES["fp8_recipe"], default=DEFAULTS.fp8_recipe,
                   help="meta: also keep attention and the first/last layer in the compute dtype")
    p.add_argument("--fp8-exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching linears unquantized: an fnmatch pattern such as 'model.layers.0.*', "
                        "or re:REGEX (repeatable)")
    p.add_argument("--fp8-checkpoint-exclusions", choices=CHOICES["fp8_checkpoint_exclusions"],
                   default=DEFAULTS.fp8_checkpoint_exclusions,
                   help="a pre-quantized checkpoint's own list of unquantized modules (quantization_config "
                        "modules_to_not_convert / ignore / exclude_modules): honour it (default) or quantize "
                        "those linears too")
    p.add_argument("--fp8-smoothing", type=_smoothing_alpha, default=DEFAULTS.fp8_smoothing, metavar="ALPHA|none",
                   help="divide each MLP's up_proj rows by s and multiply its down_proj columns by s "
                        "(exact; SmoothQuant's s = amax_x^alpha / amax_w^(1-alpha) from calibration) so the "
                        "down_proj input's massive activations fit one FP8 scale; docs/fp8-real-activations.md")
    p.add_argument("--calib-text", default="default",
                   help="UTF-8 text for FP8 activation calibration; 'default' = the shipped text, "
                        "'none' = only use input_scale tensors from the checkpoint")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=256)


def _smoothing_alpha(value: str) -> float | None:
    if value == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number in (0, 1] or none") from None


def add_verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", action="store_true",
                   help="check every artifact file's sha256 against the manifest first (reads every byte)")


def verify_artifact(artifact: Path):
    """The artifact's manifest after checking every listed file's size and sha256 (engines too);
    ArtifactError naming the first file that differs."""
    from export.manifest import load_manifest
    return load_manifest(artifact, verify_hashes=True)
