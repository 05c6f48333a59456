"""`llama405 parity`: the command-line face of runner/parity.py.

Wired into runner/cli.py with `add_parser(sub)` and `COMMANDS["parity"] = run`. Every check of
the user's request lives here and runs once, before either backend loads (minutes for a large
model): the flags, the prompt against the manifest's vocabulary and cache, and whether a trt
backend can run at all.
Exit codes: 0 within tolerance, 1 outside, 2 bad input (a Llama405Error, one line on stderr),
3 a trt backend on a machine that cannot run its engines (MissingRequirement).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from export.bounds import STEPS
from export.cli_flags import add_verify_flag, flag_type, verify_artifact
from export.cli_run import EXIT_OUTSIDE_TOLERANCE
from export.errors import ArtifactError, InputError, MissingRequirement, naming
from runner.backends.registry import BACKEND_KINDS, add_backend_flags, backend_options, open_backend
from runner.compare import DEFAULT_TOLERANCES, StepRow, default_preset
from runner.device import parse_device
from runner.parity import run_parity

DEFAULT_PROMPT = "The capital of France is"
SYNTHETIC_PROMPT_LEN = 16

DESCRIPTION = """\
Run two backends over the same artifact on the same tokens: a prefill, then --steps decode
steps in which both are fed the token backend B picked greedily (teacher forcing), comparing
logits and KV cache after every step against per-dtype tolerances.

What is compared:
  ort    the artifact's rank graphs in onnxruntime (the files TensorRT builds)
  torch  the eager PyTorch model loaded with the artifact's OWN weights, so
         `--a ort --b torch` checks the graph and the runtime, not the weights: an artifact
         whose weights were altered still passes. Add --reference CKPT to load backend B
         from the original checkpoint instead; that comparison catches altered weights.
  trt    TensorRT engines (rank{r}/engine.plan)

--verify checks every artifact file's sha256 first: the default comparison does not see
altered weights, the hashes do.

Exit status: 0 within tolerance, 1 outside (each failing step and output is named),
2 bad input, 3 --a/--b trt on a machine that cannot run the engines."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("parity", help="compare two backends step by step through the KV cache",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="exported artifact directory")
    p.add_argument("--a", choices=BACKEND_KINDS, default="ort", help="backend under test (default: ort)")
    p.add_argument("--b", choices=BACKEND_KINDS, default="torch",
                   help="reference backend; its greedy tokens drive the decode steps (default: torch)")
    p.add_argument("--reference", type=Path, metavar="CKPT",
                   help="with --b torch: load B from this checkpoint (the one the artifact was exported "
                        "from) instead of the artifact's weights, to catch altered or mis-exported weights")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help=f"text, tokenized with the artifact's tokenizer "
                                         f"(default: {DEFAULT_PROMPT!r}, or seeded random ids when "
                                         "the model's vocab is smaller than the tokenizer's)")
    source.add_argument("--tokens", nargs="+", metavar="ID", help="token ids: 128000,9906,1917 or 128000 9906 1917")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user turn of the chat format")
    p.add_argument("--fidelity-text", metavar="FILE",
                   help="with --reference on an FP8 artifact: measure perplexity and top-1 agreement on this UTF-8 "
                        "text (tokenized with the artifact's tokenizer) instead of the prompt; 'heldout' = the "
                        "shipped held-out English text (never used for calibration)")
    p.add_argument("--steps", type=int, default=8, help="decode steps after the prefill (default: 8)")
    p.add_argument("--report", type=Path, metavar="F.json", help="also write the JSON report here")
    add_backend_flags(p)  # --device (both sides), --tf32, each backend's own flags
    for side in ("a", "b"):
        p.add_argument(f"--{side}-device", type=flag_type(parse_device), metavar="cpu|cuda[:N]",
                       help=f"backend {side.upper()}'s device, where it differs from --device "
                            "(e.g. --a ort --b ort --a-device cuda --b-device cpu)")
    add_verify_flag(p)
    p.add_argument("--tolerance-preset", choices=sorted(DEFAULT_TOLERANCES),
                   help="tolerance set (default: the artifact's dtype)")
    p.add_argument("--max-abs", type=float, help="override: largest |a-b| of a step's logits")
    p.add_argument("--rel-l2", type=float, help="override: ||a-b||/||b|| of a step's logits")
    p.add_argument("--min-top1", type=float, help="override: argmax agreement over all positions, 0..1")
    p.add_argument("--min-cosine", type=float, help="override: worst per-position logit cosine")
    p.add_argument("--kv-max-abs", type=float, help="override: largest |a-b| of the filled KV cache")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    return p


def parse_token_ids(values: list[str]) -> list[int]:
    """--tokens values ('128000,9906' or '128000 9906', repeatable) -> ids; the one parser of token lists."""
    try:
        ids = [int(t) for value in values for t in value.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"--tokens {' '.join(values)!r}: expected integers like 128000,9906,1917") from None
    if not ids:
        raise InputError("--tokens is empty; pass at least one token id")
    huge = [i for i in ids if abs(i) >= 1 << 31]  # would overflow int64 arrays; the vocabulary check names the rest
    if huge:
        raise InputError(f"--tokens: {huge[0]} is not a token id (ids are 0 .. vocab size - 1)")
    return ids


def prompt_tokens(args, manifest) -> tuple[list[int], str]:
    """The prefill ids and a word on where they came from, checked against the vocabulary."""
    vocab = manifest.config.vocab_size
    ids, source = _prompt_ids(args, vocab)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the model's vocabulary 0..{vocab - 1}; "
                         f"pass --tokens with ids below {vocab} (a synthetic model with a small "
                         "vocab cannot take tokenizer output)")
    return ids, source


def _prompt_ids(args, vocab: int) -> tuple[list[int], str]:
    if args.tokens is not None:
        return parse_token_ids(args.tokens), "--tokens"
    from export.tokenizer import check_vocab, find_tokenizer
    files = find_tokenizer(args.artifact)  # the tokenizer the artifact was exported with
    tokenizer = files.load()
    if args.prompt is None and vocab < tokenizer.vocab_size:
        # A synthetic model with a toy vocabulary cannot take real text; any ids exercise the
        # same arithmetic, and a fixed seed keeps reports comparable run to run.
        rng = np.random.default_rng(0)
        return [int(t) for t in rng.integers(0, vocab, SYNTHETIC_PROMPT_LEN)], "seeded random ids"
    check_vocab(files, tokenizer.vocab_size, vocab, str(args.artifact / "manifest.json"))
    text = DEFAULT_PROMPT if args.prompt is None else args.prompt
    ids = (tokenizer.encode_dialog([{"role": "user", "content": text}]) if args.chat
           else tokenizer.encode(text, bos=True))
    return ids, "--prompt" if args.prompt is not None else "default prompt"


def check_capacity(prompt_len: int, steps: int, manifest) -> None:
    """A static cache holds max_seq_len slots: the prompt and every decode step take one each."""
    if manifest.cache_layout.bounded and prompt_len + steps > manifest.max_seq_len:
        raise InputError(f"prompt ({prompt_len} tokens) + --steps {steps} needs {prompt_len + steps} cache "
                         f"slots but the artifact was exported with max_seq_len={manifest.max_seq_len}; shorten "
                         "the prompt, lower --steps or re-export with a larger --max-seq-len")


def check_backend_runs(kind: str, artifact: Path, manifest) -> None:
    """Fail fast (before minutes of loading the other side) on a backend that cannot run here."""
    if kind != "trt":
        return
    from export.engines_record import engines_section
    from export.manifest import MANIFEST
    from export.trt_flavours import why_engines_cannot_run
    missing = [e.engine_path for e in manifest.ranks if not (artifact / e.engine_path).is_file()]
    if missing:
        raise InputError(f"--a/--b trt needs TensorRT engines, but {artifact} lacks {', '.join(missing)}; "
                         "build them with `llama405 build` (or `build-engine`) on a GPU machine "
                         "with TensorRT >= 10.16, or compare --a ort --b torch")
    section = engines_section(manifest, str(artifact / MANIFEST))
    why = "its manifest records no engines" if section is None else why_engines_cannot_run(section)
    if why is not None:
        raise MissingRequirement(f"--a/--b trt: {why}; compare --a ort --b torch on this machine")


def _describe(kind: str, artifact: Path, reference: Path | None, device) -> str:
    where = f" on {device}" if device is not None else ""
    if kind == "torch":
        return (f"torch over checkpoint {reference}" if reference else f"torch over {artifact}'s weights") + where
    return f"{kind} over {artifact}{where}"


def _validate(args) -> None:
    STEPS.check(args.steps, "--steps")  # decode steps after the prefill
    if not args.artifact.is_dir():
        raise ArtifactError(f"--artifact {args.artifact}: no such directory; pass the folder "
                            "`llama405 export --out` wrote")
    if args.reference is not None and args.b != "torch":
        raise InputError(f"--reference loads a checkpoint into the torch backend, but --b is {args.b}; "
                         "use --b torch with --reference")
    if args.chat and args.prompt is None:
        raise InputError("--chat wraps --prompt TEXT in the chat format; pass --prompt too")
    if args.fidelity_text is not None and args.reference is None:
        raise InputError("--fidelity-text measures the artifact against its --reference CKPT; pass --reference too")


HELDOUT = "heldout"


def fidelity_tokens(args, manifest) -> list[int] | None:
    """The --fidelity-text ids (None: measure on the prompt), checked to fit the artifact's cache."""
    if args.fidelity_text is None:
        return None
    if not manifest.quantization.quantized:
        raise InputError(f"--fidelity-text measures what quantization lost, but {args.artifact} is not "
                         f"quantized (quant={manifest.quant}); drop it")
    from importlib import resources

    from export.tokenizer import model_tokenizer
    if args.fidelity_text == HELDOUT:
        text = resources.files("export").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    else:
        path = Path(args.fidelity_text)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--fidelity-text {path}: cannot read it as UTF-8 text ({err})") from None
    ids = model_tokenizer(args.artifact).encode(text, bos=True)
    if manifest.cache_layout.bounded and len(ids) > manifest.max_seq_len:
        raise InputError(f"--fidelity-text {args.fidelity_text}: {len(ids)} tokens do not fit the artifact's "
                         f"max_seq_len={manifest.max_seq_len}; pass a shorter text or re-export with a larger "
                         "--max-seq-len")
    return ids


def tolerance_for(args, manifest):
    """(preset name, Tolerance): the --tolerance-preset or the artifact's default, with the overrides."""
    preset = args.tolerance_preset or default_preset(manifest.dtype, manifest.quantization,
                                                     reference=args.reference is not None)
    if preset is None:
        raise InputError(f"no default parity tolerance for a {manifest.dtype} quant={manifest.quant} artifact; "
                         f"pass --tolerance-preset ({', '.join(DEFAULT_TOLERANCES)}) and/or "
                         "--max-abs/--rel-l2/--min-top1 explicitly")
    return preset, DEFAULT_TOLERANCES[preset].replace(
        max_abs=args.max_abs, rel_l2=args.rel_l2, min_top1=args.min_top1, min_cosine=args.min_cosine,
        kv_max_abs=args.kv_max_abs)


def run(args) -> int:
    from export.manifest import load_manifest
    _validate(args)
    manifest = verify_artifact(args.artifact) if args.verify else load_manifest(args.artifact)
    preset, tolerance = tolerance_for(args, manifest)
    tokens, source = prompt_tokens(args, manifest)
    check_capacity(len(tokens), args.steps, manifest)
    text_ids = fidelity_tokens(args, manifest)
    for kind in (args.a, args.b):
        check_backend_runs(kind, args.artifact, manifest)
    devices = {"a": args.a_device or args.device, "b": args.b_device or args.device}
    options_a, options_b = backend_options(args, [(args.a, devices["a"]), (args.b, devices["b"])])
    # B first: with --reference it checks the checkpoint before A's sessions are built.
    backend_b = open_backend(args.b, args.artifact, reference=args.reference, options=options_b)
    backend_a = open_backend(args.a, args.artifact, options=options_a)
    context = {"artifact": str(args.artifact), "reference": str(args.reference) if args.reference else None,
               "a": _describe(args.a, args.artifact, None, devices["a"]),
               "b": _describe(args.b, args.artifact, args.reference, devices["b"]),
               "dtype": manifest.dtype, "quant": manifest.quant, "kv_cache": manifest.kv_cache,
               "tp": manifest.tp, "pp": manifest.pp, "tolerance_preset": preset, "token_source": source}
    with _progress(args.steps + 1, enabled=not args.json and sys.stderr.isatty()) as tick:
        report = run_parity(backend_a, backend_b, tokens, args.steps, tolerance, context, on_step=tick)
    if args.reference is not None and manifest.quantization.quantized:
        from runner.fidelity import fidelity_report
        text = text_ids or report.prompt + [row.tokens[0] for row in report.rows[1:]]  # else what both were fed
        if len(text) >= 2:
            report.context["fidelity"] = fidelity_report(backend_a, backend_b, text, window=len(text))
            report.context["fidelity"]["text"] = args.fidelity_text or "the prompt and the decoded tokens"
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        with naming(args.report):
            args.report.write_text(report.to_json() + "\n")
    print(report.to_json() if args.json else report.format_text())
    return 0 if report.passed else EXIT_OUTSIDE_TOLERANCE


class _progress:
    """tqdm over the steps on a terminal; nothing otherwise (scripts, --json)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc="parity", unit="step", leave=False)
        return self.tick

    def tick(self, row: StepRow) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
