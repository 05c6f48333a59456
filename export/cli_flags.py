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

from export.bounds import CALIB_SAMPLES, CALIB_SEQ_LEN, MAX_BATCH, MAX_SEQ_LEN
from export.options import DTYPE_CHOICES, ExportOptions, choices
from export.errors import InputError, Llama405Error

T = TypeVar("T")

DEFAULTS = ExportOptions()  # flag defaults are the options' defaults


CALIB_SHIPPED, CALIB_OFF = "default", "none"  # the --calib-text words that are not a file


@dataclasses.dataclass(frozen=True)
class FlagScope:
    """Where a flag can take effect: `applies(args)` says whether it does for this invocation
    (args holds every flag, defaults filled in); `why` ends "--flag: <why>; drop it" when the
    user gave it anyway. One rule per situation, shared by every flag it covers, so a flag that
    cannot take effect is refused (exit 2) instead of silently ignored."""

    applies: Callable[[argparse.Namespace], bool]
    why: str


def _quantization(args: argparse.Namespace):
    from export.quantization import quantization_named
    return quantization_named(args.quant)


def _quantizing_names() -> str:
    from export.quantization import QUANTIZATIONS
    return " or ".join(name for name, scheme in QUANTIZATIONS.items() if scheme.quantized)


# The situations where a flag is fixed elsewhere or has nothing to act on (the quantization
# strategy answers for --quant: no scheme name is compared here).
FP8_ONLY = FlagScope(lambda a: _quantization(a).quantized,
                     f"applies only with --quant {_quantizing_names()} (the weights are not quantized)")
CALIBRATED = FlagScope(lambda a: _quantization(a).needs_activation_scales and a.calib_text != CALIB_OFF,
                       f"applies only when FP8 scales are calibrated (--calib-text is {CALIB_OFF})")
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


# The export options' flags, each defined once (field -> argparse keywords; choices read when a
# parser is built, so a registered quantization scheme is a choice). Every command that takes one
# of these options adds it through add_option_flags.
def _option_flag_specs() -> dict[str, dict]:
    return {
        "tp": dict(type=int, help="tensor-parallel ranks"),
        "pp": dict(type=int, help="pipeline stages"),
        "dtype": dict(choices=DTYPE_CHOICES, help="compute dtype (float16 runs on ORT CPU, ORT GPU and TensorRT alike)"),
        "quant": dict(choices=choices()["quant"],
                      help="fp8: E4M3 weights (per-channel) and activations (per-tensor static scales)"),
        "fp8_recipe": dict(choices=choices()["fp8_recipe"],
                           help="meta (default): keep attention and the first/last layer in the compute dtype, Meta's FP8 405B "
                                "recipe; all: quantize every linear (docs/fp8-real-activations.md)"),
        "fp8_exclude": dict(action="append", metavar="PATTERN",
                            help="keep matching linears unquantized: an fnmatch pattern such as 'model.layers.0.*', "
                                 "or re:REGEX (repeatable); a pattern that matches no linear is refused"),
        "fp8_checkpoint_exclusions": dict(
            choices=choices()["fp8_checkpoint_exclusions"],
            help="a pre-quantized checkpoint's own list of unquantized modules (quantization_config "
                 "modules_to_not_convert / ignore / exclude_modules): honour it (default) or quantize those linears too"),
        "kv_cache": dict(choices=choices()["kv_cache"],
                         help="static: max-seq-len buffers written in place; concat: the past grows each step"),
        # sizes are bounded by ExportOptions.validate (export/bounds.py), one line naming the flag
        "max_batch": dict(type=int, help=f"largest batch ({MAX_BATCH.describe()})"),
        "max_seq_len": dict(type=int, help=f"KV-cache length ({MAX_SEQ_LEN.describe()})"),
        "logits": dict(choices=choices()["logits"], help="return logits for every position or only the last one"),
    }


# Flags that act only on quantized linears: refused where --quant leaves every linear unquantized.
QUANTIZED_FIELDS = ("fp8_recipe", "fp8_exclude", "fp8_checkpoint_exclusions")


def add_option_flags(p: ArgumentParser, fields: tuple[str, ...], defaults: ExportOptions | None,
                     unset: tuple[str, ...] = (), note: str = "", scopes: tuple[FlagScope, ...] = ()) -> None:
    """Flags for ExportOptions `fields`, defaulting to `defaults`' values; None = no default
    (`plan`: the export's default or the artifact's; no scope is checked at parse time, the
    artifact's values are not known yet). `unset` fields parse to None where given (`build
    --artifact`: the artifact's); the help names the default either way. Where defaults are
    given, every field except the `unset` ones is scoped: refused where `scopes` (and, for
    QUANTIZED_FIELDS, FP8_ONLY) say it cannot take effect."""
    specs = _option_flag_specs()
    for field in fields:
        spec = dict(specs[field])
        shown = getattr(defaults if defaults is not None else DEFAULTS, field)
        shown = ", ".join(shown) or "none" if isinstance(shown, tuple) else shown
        if defaults is None:
            spec["help"] += f" (default {shown}, or the artifact's)"
        else:
            if field not in unset:
                spec["default"] = list(getattr(defaults, field)) if field == "fp8_exclude" else getattr(defaults, field)
            spec["help"] += f" (default {shown})"
        if note:
            spec["help"] += f"; {note}"
        flag = "--" + field.replace("_", "-")
        if defaults is None or field in unset:
            p.add_argument(flag, **spec)
        else:
            own = (FP8_ONLY,) if field in QUANTIZED_FIELDS else ()
            p.add_scoped(flag, scopes=(*scopes, *own), **spec)


# generate / parity --checkpoint (the torch backend, eagerly): float32, the dtype PyTorch computes
# every op in on a CPU, and a 2048-slot cache (the eager static cache is allocated whole).
CHECKPOINT_RUN_DEFAULTS = ExportOptions(dtype="float32", max_seq_len=2048)
CHECKPOINT_RUN_FIELDS = ("tp", "pp", "dtype", "kv_cache", "max_seq_len")


def checkpoint_run_options(args: argparse.Namespace) -> ExportOptions:
    """The layout a --checkpoint run (torch backend) takes from its flags."""
    options = dataclasses.replace(CHECKPOINT_RUN_DEFAULTS, **{f: getattr(args, f) for f in CHECKPOINT_RUN_FIELDS})
    options.validate_fields()  # bounded before a cache is allocated
    return options


def add_export_flags(p: ArgumentParser) -> None:
    """The flags of `llama405 export` and of `build` / `build-engine` with --checkpoint: one set of
    names, types and defaults. --max-batch / --max-seq-len default to None, which means the
    export's defaults (ExportOptions) or, for `build --artifact`, the artifact's. Sizes are
    bounded by their types (export/bounds.py). The options an artifact fixes are refused with
    `build --artifact` (NOT_FROM_ARTIFACT); the FP8 ones without a quantizing --quant (FP8_ONLY),
    the calibration sizes when nothing is calibrated (CALIBRATED)."""
    fixed = (NOT_FROM_ARTIFACT,)
    add_option_flags(p, ("tp", "pp", "dtype", "quant", "fp8_recipe", "fp8_exclude", "fp8_checkpoint_exclusions",
                         "kv_cache", "max_batch", "max_seq_len", "logits"), DEFAULTS, unset=("max_batch", "max_seq_len"),
                     scopes=fixed)
    p.add_argument("--ranks", help="only these ranks, e.g. 0-7 (one node of a multi-node run)")
    fp8 = (*fixed, FP8_ONLY)
    p.add_scoped("--calib-text", default=CALIB_SHIPPED, scopes=fp8,
                 help=f"UTF-8 text for FP8 activation calibration; '{CALIB_SHIPPED}' = the shipped text, "
                      f"'{CALIB_OFF}' = only use input_scale tensors from the checkpoint")
    p.add_scoped("--fp8-smoothing", type=_smoothing_alpha, default=DEFAULTS.fp8_smoothing, scopes=(*fp8, CALIBRATED),
                 metavar="ALPHA|none",
                 help="divide each MLP's up_proj rows by s and multiply its down_proj columns by s (exact; "
                      "SmoothQuant's s = amax_x^alpha / amax_w^(1-alpha) from calibration) so the down_proj input's "
                      "massive activations fit one FP8 scale (default none; docs/fp8-real-activations.md)")
    p.add_scoped("--calib-samples", type=CALIB_SAMPLES.flag_type, default=8, scopes=(*fp8, CALIBRATED),
                 help=f"calibration sequences (default 8; {CALIB_SAMPLES.describe()})")
    p.add_scoped("--calib-seq-len", type=CALIB_SEQ_LEN.flag_type, default=256, scopes=(*fp8, CALIBRATED),
                 help=f"tokens per calibration sequence (default 256; {CALIB_SEQ_LEN.describe()})")


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
                            fp8_checkpoint_exclusions=args.fp8_checkpoint_exclusions,
                            fp8_smoothing=args.fp8_smoothing, **sizes)
    options.validate()  # sizes within their bounds before a checkpoint is opened or text tokenized
    return options


def calibration_file(args: argparse.Namespace, options: ExportOptions) -> tuple[bool, str | None]:
    """(calibrate?, the --calib-text file or None for the shipped text): only for a quantization
    with static activation scales, and not under --calib-text none."""
    if not options.quantization.needs_activation_scales or args.calib_text == CALIB_OFF:
        return False, None
    return True, None if args.calib_text == CALIB_SHIPPED else args.calib_text


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
