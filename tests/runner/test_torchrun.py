"""A real multi-process run: `torchrun --nproc-per-node 2 -m runner.cli generate --backend ort`.

Each process serves one rank of a TP2 artifact and the all-reduces go over gloo; the tokens
must be exactly those of the single-process run of the same command, which simulates both
ranks in turn. The checkpoint has the real Llama 3 vocabulary (128256) so the artifact's
tokenizer (copied in by the export) encodes and decodes the prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.onnx_export import ExportOptions, export_artifact
from runner.cli import main
from tests.conftest import hf_model, save_hf, tiny_config

PROMPTS = ["The capital of France is", "Hello"]  # a batch of two, of different lengths
MAX_NEW_TOKENS = 8
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torchrun")
    cfg = tiny_config(vocab_size=128256, num_hidden_layers=2)
    checkpoint = save_hf(hf_model(cfg), root / "ckpt", max_shard_size="20MB")
    return export_artifact(checkpoint, root / "art", ExportOptions(tp=2, dtype="float32", max_seq_len=64))


def generate_argv(artifact: Path) -> list[str]:
    argv = ["generate", "--artifact", str(artifact), "--backend", "ort"]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    return argv + ["--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]


def test_artifact_carries_the_tokenizer(artifact):
    assert (artifact / "tokenizer.model").is_file()


def test_two_processes_give_the_single_process_tokens(artifact, capsys):
    assert main(generate_argv(artifact)) == 0
    single = json.loads(capsys.readouterr().out)

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "runner.cli", *generate_argv(artifact)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Only rank 0 reports; everything else on stdout would be a stray print.
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    multi = json.loads(lines[0])

    assert multi["backend"] == single["backend"] == "ort"
    assert len(multi["outputs"]) == len(PROMPTS)
    for a, b in zip(multi["outputs"], single["outputs"]):
        assert a["prompt_tokens"] == b["prompt_tokens"]
        assert len(a["tokens"]) == MAX_NEW_TOKENS or a["stop_reason"] == "stop_token"
        assert (a["tokens"], a["text"], a["stop_reason"]) == (b["tokens"], b["text"], b["stop_reason"])
    # Different prompt lengths really were batched.
    assert len({len(o["prompt_tokens"]) for o in single["outputs"]}) == 2
