"""Command-line flags shared by the `llama405` subcommands and `build-engine`.

Lives in export/ because both faces (runner/cli.py and engines/cli.py) may import it, and the
flags describe export options.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from export.options import CHOICES, DTYPE_CHOICES, ExportOptions
from export.errors import InputError, Llama405Error

T = TypeVar("T")

DEFAULTS = ExportOptions()  # flag defaults are the options' defaults


@dataclasses.dataclass(frozen=True)
class FlagScope:
    """Where a flag can take effect: `applies(args)` says whether it does for this invocation
    (args holds every flag, defaults filled in); `why` ends "--flag: <why>; drop it" when the
    user gave it anyway. One rule per situation, shared by every flag it covers, so a flag that
    cannot take effect is refused (exit 2) instead of silently ignored."""

    applies: Callable[[argparse.Namespace], bool]
    why: str


# The situations where a flag is fixed elsewhere or has nothing to act on.
FP8_ONLY = FlagScope(lambda a: a.quant == "fp8", "applies only with --quant fp8 (the weights are not quantized)")
CALIBRATED = FlagScope(lambda a: a.calib_text != "none",
                       "applies only when FP8 scales are calibrated (--calib-text is none)")
NOT_FROM_ARTIFACT = FlagScope(lambda a: getattr(a, "artifact", None) is None,
                              "the --artifact fixes it (its manifest holds the value it was exported with)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the user-error form of export/cli_run.py: a refused flag is one line,
    `prog: error: argument --flag: ...`, and exit code 2 (no usage block; --help shows it).
    Subparsers inherit the class.

    `add_scoped` adds a flag that takes effect only within its FlagScopes: its argparse default
    is None, so a flag the user gave is told apart from one left at its default (filled in after
    the check), and a given flag outside a scope is refused here, where the flags are parsed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._scoped: list[tuple[argparse.Action, Any, tuple[FlagScope, ...]]] = []

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_scoped(self, *names: str, scopes: tuple[FlagScope, ...], default: Any = None,
                   group: Any = None, **kwargs: Any) -> argparse.Action:
        """add_argument (into `group`, an argument group of this parser, if given) for a flag that
        takes effect only within `scopes`."""
        action = (group or self).add_argument(*names, default=None, **kwargs)
        self._scoped.append((action, default, scopes))
        return action

    def parse_known_args(self, args=None, namespace=None):  # subparsers run through it too
        parsed, rest = super().parse_known_args(args, namespace)
        given = []
        for action, default, scopes in self._scoped:
            if getattr(parsed, action.dest, None) is not None:
                given.append((action, scopes))
            else:
                setattr(parsed, action.dest, list(default) if isinstance(default, list) else default)
        for action, scopes in given:
            for scope in scopes:
                if not scope.applies(parsed):
                    self.error(f"argument {'/'.join(action.option_strings)}: {scope.why}; drop it")
        return parsed, rest


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


def add_export_flags(p: ArgumentParser) -> None:
    """The flags of `llama405 export` and of `build` / `build-engine` with --checkpoint: one set of
    names, types and defaults. --max-batch / --max-seq-len default to None, which means the
    export's defaults (ExportOptions) or, for `build --artifact`, the artifact's. Sizes are
    checked by ExportOptions.validate (one line naming the flag), not by argparse. The options an
    artifact fixes are refused with `build --artifact` (NOT_FROM_ARTIFACT)."""
    fixed = (NOT_FROM_ARTIFACT,)
    p.add_scoped("--tp", type=int, default=DEFAULTS.tp, scopes=fixed, help="tensor-parallel ranks")
    p.add_scoped("--pp", type=int, default=DEFAULTS.pp, scopes=fixed, help="pipeline stages")
    p.add_scoped("--dtype", choices=DTYPE_CHOICES, default=DEFAULTS.dtype, scopes=fixed,
                 help="compute dtype (float16 runs on ORT CPU, ORT GPU and TensorRT alike)")
    add_quant_flags(p, fixed)
    p.add_scoped("--kv-cache", choices=CHOICES["kv_cache"], default=DEFAULTS.kv_cache, scopes=fixed,
                 help="static: max-seq-len buffers written in place; concat: the past grows each step")
    p.add_argument("--max-batch", type=int, help=f"largest batch (default {DEFAULTS.max_batch})")
    p.add_argument("--max-seq-len", type=int, help=f"KV-cache length (default {DEFAULTS.max_seq_len})")
    p.add_scoped("--logits", choices=CHOICES["logits"], default=DEFAULTS.logits, scopes=fixed,
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
    options = ExportOptions(tp=args.tp, pp=args.pp, dtype=args.dtype, quant=args.quant, kv_cache=args.kv_cache,
                            logits=args.logits, ranks=ranks, fp8_recipe=args.fp8_recipe,
                            fp8_exclude=tuple(args.fp8_exclude),
                            fp8_checkpoint_exclusions=args.fp8_checkpoint_exclusions, **sizes)
    options.validate()  # sizes within their bounds before a checkpoint is opened or text tokenized
    return options


def add_quant_flags(p: ArgumentParser, scopes: tuple[FlagScope, ...] = ()) -> None:
    """--quant and the FP8 flags, which take effect only with --quant fp8 (FP8_ONLY); the
    calibration sizes only when calibrating (CALIBRATED). Sizes are bounded by their types."""
    from export.bounds import CALIB_SAMPLES, CALIB_SEQ_LEN
    fp8 = (*scopes, FP8_ONLY)
    p.add_scoped("--quant", choices=CHOICES["quant"], default=DEFAULTS.quant, scopes=scopes,
                 help="fp8: E4M3 weights (per-channel) and activations (per-tensor static scales)")
    p.add_scoped("--fp8-recipe", choices=CHOICES["fp8_recipe"], default=DEFAULTS.fp8_recipe, scopes=fp8,
                 help="meta: also keep attention and the first/last layer in the compute dtype")
    p.add_scoped("--fp8-exclude", action="append", default=[], metavar="PATTERN", scopes=fp8,
                 help="keep matching linears unquantized: an fnmatch pattern such as 'model.layers.0.*', "
                      "or re:REGEX (repeatable); a pattern that matches no linear is refused")
    p.add_scoped("--fp8-checkpoint-exclusions", choices=CHOICES["fp8_checkpoint_exclusions"],
                 default=DEFAULTS.fp8_checkpoint_exclusions, scopes=fp8,
                 help="a pre-quantized checkpoint's own list of unquantized modules (quantization_config "
                      "modules_to_not_convert / ignore / exclude_modules): honour it (default) or quantize "
                      "those linears too")
    p.add_scoped("--calib-text", default="default", scopes=fp8,
                 help="UTF-8 text for FP8 activation calibration; 'default' = the shipped text, "
                      "'none' = only use input_scale tensors from the checkpoint")
    p.add_scoped("--calib-samples", type=CALIB_SAMPLES.flag_type, default=8, scopes=(*fp8, CALIBRATED),
                 help=f"calibration sequences (default 8; {CALIB_SAMPLES.describe()})")
    p.add_scoped("--calib-seq-len", type=CALIB_SEQ_LEN.flag_type, default=256, scopes=(*fp8, CALIBRATED),
                 help=f"tokens per calibration sequence (default 256; {CALIB_SEQ_LEN.describe()})")


def add_verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", action="store_true",
                   help="check every artifact file's sha256 against the manifest first (reads every byte)")


def verify_artifact(artifact: Path):
    """The artifact's manifest after checking every listed file's size and sha256 (engines too);
    ArtifactError naming the first file that differs."""
    from export.manifest import load_manifest
    return load_manifest(artifact, verify_hashes=True)
