"""`llama405 generate --requests FILE.jsonl`: serve a request file (runner/requests.py) through the
serving loop (runner/serve.py), continuously batched or in lockstep batches.

Checks in the order that costs least: the file (shape and types), the artifact's manifest (a
continuous run needs per-sequence cache writes), then, the model open, its vocabulary and cache
room, then the tokenizer and each prompt's own room. Prints one line (or with --json one JSON
object) per request in file order, then the run's totals; under torchrun only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from export.errors import InputError
from export.kv_cache import DECODE_WIDTHS
from runner.generate import SamplingOptions
from runner.requests import check_fits_model, check_room, read_requests
from runner.serve import BATCHING, serve

DEFAULT_MAX_BATCH = 8
SERVING_FLAGS = ("max_batch", "batching", "decode_width")


def add_flags(p: argparse.ArgumentParser) -> None:
    """The serving flags of `generate` (--requests itself sits with --prompt, one of the two)."""
    p.add_argument("--max-batch", type=_positive_int, default=None,
                   help=f"cache rows served at once (with --requests; default {DEFAULT_MAX_BATCH})")
    p.add_argument("--batching", choices=BATCHING, default=None,
                   help="continuous (default): a finished request's row takes the next one between steps; "
                        "lockstep: batches of --max-batch run to their longest member")
    p.add_argument("--decode-width", choices=DECODE_WIDTHS, default=None,
                   help="attention width of a continuous decode step: live (default, onnxruntime on CPUs), "
                        "buckets or max (fixed shapes); `llama405 plan` recommends one for GPUs")


def refuse_without_requests(args: argparse.Namespace) -> None:
    """--max-batch / --batching / --decode-width shape a request file's run: refused with --prompt."""
    for flag in SERVING_FLAGS:
        if getattr(args, flag) is not None:
            raise InputError(f"--{flag.replace('_', '-')} applies to --requests FILE; --prompt runs its prompts as "
                             "one batch: drop the flag or pass the prompts as a request file")


def run(args: argparse.Namespace, open_backend: Callable, tokenizer_for: Callable, is_primary: Callable) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: a served request produces at least one token")
    defaults = SamplingOptions(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    lines = read_requests(args.requests, defaults)
    batching = args.batching or "continuous"
    max_batch = args.max_batch or DEFAULT_MAX_BATCH
    if batching == "lockstep" and args.decode_width is not None:
        raise InputError("--decode-width applies to --batching continuous; lockstep batches grow their width "
                         "one slot a step: drop it")
    if batching == "continuous" and args.artifact is not None:
        from export.manifest import load_manifest
        load_manifest(args.artifact, only=[]).require_per_sequence_writes(
            args.artifact, "--batching continuous", otherwise="serve it with --batching lockstep")
    backend = open_backend()
    layout = backend.cache_layout
    check_fits_model(lines, backend.config.vocab_size, backend.max_seq_len, layout.bounded)
    tokenizer = tokenizer_for()
    stop_ids = frozenset(tokenizer.stop_ids)
    requests = []
    for line in lines:
        if line.tokens is not None:
            prompt = list(line.tokens)
        elif args.chat:
            prompt = tokenizer.encode_dialog([{"role": "user", "content": line.text}])
        else:
            prompt = tokenizer.encode(line.text, bos=True)
        if line.tokens is None:  # token prompts: checked with the model
            check_room(line, len(prompt), backend.max_seq_len, layout.bounded)
        requests.append(line.request(prompt, stop_ids))
    served = serve(backend, requests, max_batch, batching, width=args.decode_width or "live",
                   detokenize=tokenizer.decode)
    if not is_primary(backend):
        return 0  # every torchrun process served the same tokens; rank 0 reports them
    for line, request, done in zip(lines, requests, served.completions):
        text = _text(tokenizer, done.tokens, request)
        if args.json:
            print(json.dumps({"id": line.id, "line": line.line, "prompt_tokens": len(request.prompt),
                              "tokens": done.tokens, "text": text, "stop_reason": done.stop_reason,
                              "time_to_first_token_s": done.first_token_s, "tokens_per_second": done.tokens_per_second,
                              "seconds": done.finished_s}))
        else:
            print(f"{line.id}: {text!r} ({len(done.tokens)} tokens, {done.stop_reason}, first token at "
                  f"{done.first_token_s * 1000:.0f} ms)")
    totals = {"backend": backend.name, **served.totals()}
    if args.json:
        print(json.dumps({"totals": totals}))
    else:
        print(f"[{backend.name}] {batching} batching, max batch {max_batch}: {totals['requests']} requests, "
              f"{totals['generated_tokens']} tokens in {totals['seconds']:.2f} s = {totals['tokens_per_second']:.1f} "
              f"tokens/s, mean time to first token {totals['mean_time_to_first_token_s'] * 1000:.0f} ms")
    return 0


def _text(tokenizer, tokens: list[int], request) -> str:
    """The generated text: stop ids left out, cut before the first stop text it contains."""
    text = tokenizer.decode([t for t in tokens if t not in request.stop_ids])
    cuts = [text.find(s) for s in request.stop_texts if s in text]
    return text[:min(cuts)] if cuts else text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


_positive_int.__name__ = "int"  # argparse: "invalid int value: 'x'"
