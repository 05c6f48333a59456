"""Command-line flags shared by the `llama405` subcommands and `build-engine`.

Lives in export/ because both faces (runner/cli.py and engines/cli.py) may import it, and the
flags describe export options.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=("none", "fp8"), default="none",
                   help="fp8: E4M3 weights (per-channel) and activations (per-tensor static scales)")
    p.add_argument("--fp8-recipe", choices=("default", "meta"), default="default",
                   help="meta: also keep attention and the first/last layer in the compute dtype")
    p.add_argument("--fp8-exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching linears unquantized, e.g. 'model.layers.0.*' (repeatable)")
    p.add_argument("--calib-text", default="default",
                   help="UTF-8 text for FP8 activation calibration; 'default' = the shipped text, "
                        "'none' = only use input_scale tensors from the checkpoint")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=256)


def add_verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", action="store_true",
                   help="check every artifact file's sha256 against the manifest first (reads every byte)")


def verify_artifact(artifact: Path):
    """The artifact's manifest after checking every listed file's size and sha256 (engines too);
    ArtifactError naming the first file that differs."""
    from export.manifest import load_manifest
    return load_manifest(artifact, verify_hashes=True)
