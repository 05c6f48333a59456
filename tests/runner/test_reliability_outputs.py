"""Nothing lost, nothing silently wrong (second hostile pass, issue 20): outputs that are inputs,
`--force` and cleanup that delete only what llama405 wrote, tampering an artifact cannot hide,
signals TensorRT's callbacks cannot swallow.

Every case runs the real entry point, asserts the exit code and the one line, and that every
file the user had is byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runner.cli import main as llama405
from tests.conftest import hf_model, save_hf, tiny_config

MAX_SEQ = 32
REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = llama405([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_hf(hf_model(tiny_config()), tmp_path_factory.mktemp("out-ck") / "ckpt")


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:
    """TP2: two rank graphs, so a swap of them is a case."""
    out = tmp_path_factory.mktemp("out-art") / "art"
    assert llama405(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--tp", "2",
                     "--dtype", "float32", "--max-seq-len", str(MAX_SEQ)]) == 0
    return out


def export_argv(checkpoint: Path, out: Path, *extra) -> list:
    return ["export", "--checkpoint", checkpoint, "--out", out, "--tp", "2", "--dtype", "float32",
            "--max-seq-len", MAX_SEQ, *extra]


# -- outputs that are inputs -----------------------------------------------------------------

def test_an_output_that_is_an_input_is_refused_before_anything_is_written(checkpoint, artifact, tmp_path, capsys):
    ck, art = tmp_path / "ck", tmp_path / "art"
    shutil.copytree(checkpoint, ck)
    shutil.copytree(artifact, art)
    (tmp_path / "calib.txt").write_text("some calibration text")
    (tmp_path / "link.npy").symlink_to(ck / "config.json")
    os.link(art / "tokenizer.json", tmp_path / "hard.json")
    before = tree(tmp_path)
    cases = [
        (["logits", "--checkpoint", ck, "--tokens", "1,2", "--out", ck / "config.json"], "--out"),
        (["logits", "--artifact", art, "--backend", "ort", "--tokens", "1,2", "--out", art / "rank1" / "model.onnx"],
         "--out"),
        (["logits", "--checkpoint", ck, "--tokens", "1,2", "--out", tmp_path / "link.npy"], "--out"),
        (["logits", "--artifact", art, "--backend", "ort", "--tokens", "1,2", "--out", tmp_path / "hard.json"],
         "same file as"),
        (["parity", "--artifact", art, "--report", art / "manifest.json"], "--report"),
        (["parity", "--artifact", art, "--reference", ck, "--report", ck / "sub" / "r.json"], "--report"),
        (["build", "--artifact", art, "--trt", "rtx", "--timing-cache", art / "rank0" / "model.onnx.data"],
         "--timing-cache"),
        (["build", "--checkpoint", ck, "--out", ck / "art", "--stage", "onnx"], "--out"),
        ([*export_argv(ck, tmp_path / "new", "--quant", "fp8", "--calib-text", tmp_path / "new" / "calib.txt")],
         "--out"),
        (["synth", "--config", ck / "config.json", "--out", ck, "--force"], "--out"),
    ]
    for argv, flag in cases:
        code, _, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and flag in line and "this command reads" in line, (argv, err)
    assert tree(tmp_path) == before
