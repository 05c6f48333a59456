"""`llama405` command line: one entry point, one subcommand per job.

Bad input ends with one line on stderr and exit code 2, a missing requirement with exit code 3,
a llama405 bug with its traceback and exit code 70 (export/cli_run.py has the whole contract);
everything else a subcommand prints goes to stdout (JSON with --json, so scripts can read it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from export.config import PRESETS
from export.cli_run import run_command
from export.bounds import MAX_SEQ_LEN, SEED
from export.cli_flags import (DTYPE_CHOICES, NOT_FROM_ARTIFACT, ArgumentParser, FlagScope, add_export_flags,
                              add_verify_flag, export_options_from, verify_artifact)
from export import convert_cli
from export.errors import InputError, naming
from export.kv_cache import KV_CACHE_LAYOUTS
from engines import cli as engines_cli
from runner import parity_cli
from runner.backends.registry import BACKEND_KINDS, add_backend_flags, backend_options, open_backend
from runner.generate import sampling_problem


def _add_model_source(p: ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", type=Path, help="exported artifact directory (ONNX per rank)")
    src.add_argument("--checkpoint", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--backend", choices=BACKEND_KINDS, default="torch")
    # The layout of a --checkpoint run; an --artifact's manifest fixes all of them.
    layout = (NOT_FROM_ARTIFACT,)
    p.add_scoped("--tp", type=int, default=1, scopes=layout, help="tensor-parallel ranks (--checkpoint)")
    p.add_scoped("--pp", type=int, default=1, scopes=layout, help="pipeline stages (--checkpoint)")
    p.add_scoped("--dtype", choices=DTYPE_CHOICES, default="float32", scopes=layout,
                 help="compute dtype (--checkpoint)")
    p.add_scoped("--kv-cache", choices=tuple(KV_CACHE_LAYOUTS), default="static", scopes=layout,
                 help="KV-cache layout (--checkpoint)")
    p.add_scoped("--max-seq-len", type=MAX_SEQ_LEN.flag_type, default=2048, scopes=layout,
                 help=f"KV-cache length (--checkpoint; {MAX_SEQ_LEN.describe()})")
    add_backend_flags(p)  # --device, --tf32 and each backend's own flags (runner/backends/registry.py)
    add_verify_flag(p)


def _add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    add_export_flags(p)
    p.add_argument("--force", action="store_true", help="replace a finished artifact (or an empty folder) at --out")
    p.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")


def _sampling_flag(field: str, convert):
    """argparse type for a SamplingOptions field, by runner/generate.py's rule for it."""
    def parse(text: str):
        value = convert(text)
        why = sampling_problem(field, value)
        if why is not None:
            raise argparse.ArgumentTypeError(f"{value} {why}")
        return value
    parse.__name__ = convert.__name__  # argparse: "invalid int value: 'x'"
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="llama405", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a random-weight HF checkpoint of any Llama 3.1 geometry")
    geo = p.add_mutually_exclusive_group(required=True)
    geo.add_argument("--preset", choices=sorted(PRESETS))
    geo.add_argument("--config", type=Path, help="a config.json to copy the geometry from")
    p.add_argument("--layers", type=int, help="override num_hidden_layers")
    p.add_argument("--vocab", type=int, help="override vocab_size")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16")
    p.add_argument("--seed", type=SEED.flag_type, default=0, help=f"{SEED.describe()}")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = sub.add_parser("export", help="checkpoint -> artifact directory with one ONNX graph per rank")
    _add_export_flags(p)

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_source(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat format")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer.json / tokenizer.model or their directory (default: the model's own)")
    p.add_argument("--max-new-tokens", type=_sampling_flag("max_new_tokens", int), default=32)
    p.add_argument("--temperature", type=_sampling_flag("temperature", float), default=0.0, help="0 = greedy")
    sampled = (FlagScope(lambda a: a.temperature > 0, "greedy decoding (--temperature 0) does not sample; "
                                                     "pass --temperature > 0 to use it"),)
    p.add_scoped("--top-p", type=_sampling_flag("top_p", float), default=1.0, scopes=sampled)
    p.add_scoped("--seed", type=_sampling_flag("seed", int), default=0, scopes=sampled)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("logits", help="write float32 logits [batch, seq, vocab] for given token ids")
    _add_model_source(p)
    p.add_argument("--tokens", required=True, help="comma-separated ids, e.g. 128000,9906,1917")
    p.add_argument("--out", type=Path, required=True, help="a .npy file")

    parity_cli.add_parser(sub)
    convert_cli.add_parser(sub)

    p = sub.add_parser("verify", help="check every file of an artifact (engines too) against the manifest's sha256")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true")
    engines_cli.add_parsers(sub)  # build, plan, inspect

    p = sub.add_parser("tokenize", help="print the token ids of a text as JSON")
    p.add_argument("--tokenizer", type=Path, help="a checkpoint or artifact directory, its tokenizer.json, or Llama 3's "
                                                  "tokenizer.model (default: the bundled Llama 3 tokenizer)")
    p.add_argument("--text", required=True)
    p.add_argument("--chat", action="store_true")
    return parser


def cmd_synth(args) -> int:
    from export.synth import synth_config, synthesize_checkpoint
    cfg = synth_config(args.preset, args.config, args.layers, args.vocab)
    out = synthesize_checkpoint(cfg, args.out, dtype=args.dtype, seed=args.seed, force=args.force,
                                progress=sys.stderr.isatty(), protected=(args.config,) if args.config else ())
    print(f"wrote {out} ({cfg.num_parameters() / 1e9:.3f} B parameters, {args.dtype})")
    return 0


def calibration_input(args, options):
    """(tokens [samples, seq] or None, source) for an FP8 export."""
    if args.quant != "fp8" or args.calib_text == "none":
        return None, ""
    from export.calibrate import checkpoint_calibration_tokens
    from export.checkpoint import Checkpoint
    # Its config, quantization_config and the options against it are refused before any text is tokenized.
    options.validate(Checkpoint(args.checkpoint).config)
    return checkpoint_calibration_tokens(args.checkpoint, None if args.calib_text == "default" else args.calib_text,
                                         args.calib_samples, args.calib_seq_len)


def cmd_export(args) -> int:
    import time
    from export.manifest import load_manifest
    from export.onnx_export import export_artifact
    options = export_options_from(args)
    started = time.perf_counter()
    tokens, source = calibration_input(args, options)
    out = export_artifact(args.checkpoint, args.out, options, force=args.force,
                          progress=sys.stderr.isatty() and not args.json,
                          calibration_tokens=tokens, calibration_source=source)
    manifest = load_manifest(out)
    size = sum(f["size"] for f in manifest.files.values())
    summary = {"artifact": str(out), "ranks": [r.rank for r in manifest.ranks], "tp": options.tp,
               "pp": options.pp, "dtype": options.dtype, "quant": options.quant,
               "kv_cache": options.kv_cache, "bytes": size,
               "seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        quant = f" + fp8 ({manifest.extra['fp8']['scales_from']})" if options.quant == "fp8" else ""
        print(f"wrote {out}: ranks {summary['ranks']} (tp {options.tp} x pp {options.pp}), {options.dtype}{quant}, "
              f"{options.kv_cache} KV cache, {size / 1e6:.1f} MB in {summary['seconds']:.1f} s")
    return 0


def _open_backend(args):
    """The model behind --checkpoint/--artifact as a Backend (runner/backends/registry.py)."""
    (options,) = backend_options(args, [(args.backend, args.device)])
    if args.artifact is not None:
        if args.verify:
            verify_artifact(args.artifact)
        return open_backend(args.backend, args.artifact, options=options)
    if args.backend != "torch":
        raise InputError(f"--backend {args.backend} runs an exported artifact; pass --artifact ART "
                         "(make one with `llama405 export`) or use --backend torch")
    for flag in ("tp", "pp", "max_seq_len"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    from export.model import ModelOptions
    run, options = options, ModelOptions(kv_cache=args.kv_cache, max_seq_len=args.max_seq_len)
    return open_backend("torch", checkpoint=args.checkpoint, options=run,
                        layout={"tp": args.tp, "pp": args.pp, "dtype": args.dtype, "options": options})


def _is_primary(backend) -> bool:
    world = getattr(backend, "world", None)
    return world is None or world.rank == 0


def _tokenizer_for(args):
    """The model's own tokenizer (an artifact carries the one it was exported with) or --tokenizer,
    checked against the model's vocab_size."""
    from export.tokenizer import model_tokenizer
    return model_tokenizer(args.checkpoint or args.artifact, override=args.tokenizer)


def cmd_generate(args) -> int:
    from runner.generate import SamplingOptions, check_room, generate
    options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    backend = _open_backend(args)  # first: --verify checks the artifact's hashes before its tokenizer is read
    check_room(backend, 1, options.max_new_tokens)  # a bound that no prompt can meet, before tokenizing
    tokenizer = _tokenizer_for(args)
    prompts = [tokenizer.encode_dialog([{"role": "user", "content": text}]) if args.chat
               else tokenizer.encode(text, bos=True) for text in args.prompt]
    result = generate(backend, prompts, options, stop_ids=tokenizer.stop_ids)
    texts = [tokenizer.decode([t for t in toks if t not in tokenizer.stop_ids]) for toks in result.tokens]
    if not _is_primary(backend):
        return 0  # every torchrun process computed the same tokens; rank 0 reports them
    if args.json:
        print(json.dumps({
            "backend": backend.name,
            "outputs": [{"prompt": p, "prompt_tokens": ids, "tokens": toks, "text": text, "stop_reason": why}
                        for p, ids, toks, text, why in zip(args.prompt, prompts, result.tokens, texts,
                                                            result.stop_reasons)],
            "prefill_seconds": result.prefill_seconds,
            "decode_tokens_per_second": result.decode_tokens_per_second,
        }))
        return 0
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt!r} -> {text!r}")
    print(f"[{backend.name}] prefill {result.prefill_seconds * 1000:.1f} ms, decode "
          f"{result.decode_tokens_per_second:.1f} tokens/s over {result.decode_steps} steps")
    return 0


def cmd_logits(args) -> int:
    ids = np.array([parity_cli.parse_token_ids([args.tokens])], dtype=np.int64)
    backend = _open_backend(args)
    from runner.backends.base import make_feed
    backend.start(1)
    positions = np.arange(ids.shape[1])[None]
    logits = backend.infer(make_feed(ids, positions, np.ones_like(ids)))["logits"]
    if not _is_primary(backend):
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f, naming(args.out):  # a file handle: np.save would append .npy otherwise
        np.save(f, logits.astype(np.float32))
    print(f"wrote {args.out} {list(logits.shape)} float32")
    return 0


def cmd_verify(args) -> int:
    manifest = verify_artifact(args.artifact)
    size = sum(f["size"] for f in manifest.files.values())
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), "files": len(manifest.files), "bytes": size, "ok": True}))
    else:
        print(f"{args.artifact}: {len(manifest.files)} files, {size / 1e9:.2f} GB — every size and sha256 matches "
              "the manifest")
    return 0


def cmd_tokenize(args) -> int:
    from export.tokenizer import token_ids_for_cli
    print(json.dumps(token_ids_for_cli(args.tokenizer, args.text, args.chat)))
    return 0


COMMANDS = {"synth": cmd_synth, "export": cmd_export, "generate": cmd_generate, "logits": cmd_logits, "parity": parity_cli.run,
            "tokenize": cmd_tokenize, "verify": cmd_verify, "plan": engines_cli.run_plan, "inspect": engines_cli.run_inspect,
            "build": engines_cli.run_build, "convert-gguf": convert_cli.run}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help (0), or a flag argparse refused: one line, exit 2
        return done.code
    return run_command(f"llama405 {args.command}", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
