"""The serving loop (runner/serve.py): continuous batching against each request run alone and
against Hugging Face, lockstep batching, and request files through the real command line.

The workload: 24 requests with prompts of 4-200 tokens and 1-64 new tokens (greedy, fp32), served
with 4 and 8 cache rows. Rows join and leave between steps, so one decode step carries rows at
different lengths and newcomers are prefilled on rows whose old keys are still in the buffer.
Oracles: the same request run alone through the same backend (batch 1, teacher-forced with the
served tokens: its logits at every step within 1e-4, and its argmax is the served token), and
transformers' LlamaForCausalLM on prompt + served tokens, unpadded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import Checkpoint
from export.model import ModelOptions
from export.onnx_export import ExportOptions, export_artifact
from runner.backends.base import make_feed
from runner.backends.ort import OrtBackend
from runner.backends.torch import TorchBackend
from runner.cli import main
from runner.generate import SamplingOptions
from runner.serve import Request, serve
from tests.conftest import hf_model, save_hf, tiny_config
from tests.export.test_export_artifact import shared_artifact

pytestmark = pytest.mark.slow

FP32_MAX_ABS = 1e-4
MAX_SEQ_LEN = 272  # the longest prompt (200) + the most new tokens (64), and room to spare
_rng = np.random.default_rng(18)
_SHAPES = [(4, 64), (200, 1), (200, 64), (5, 1)] + [(int(_rng.integers(4, 201)), int(_rng.integers(1, 65)))
                                                   for _ in range(20)]
WORKLOAD = [Request(tuple(int(t) for t in _rng.integers(3, 256, size=p)), SamplingOptions(max_new_tokens=n))
            for p, n in _SHAPES]


def alone_logits(backend, prompt: tuple[int, ...], tokens: list[int]) -> np.ndarray:
    """[len(tokens), vocab]: the request alone (batch 1): its prompt, then the served tokens in
    one step after it (through the cache; a step per token would give the same logits, slower)."""
    backend.start(1)
    length = len(prompt)
    feed = make_feed(np.array([prompt]), np.arange(length)[None], np.ones((1, length)))
    out = [backend.infer(feed)["logits"][0, -1:]]
    if len(tokens) > 1:
        total = length + len(tokens) - 1
        feed = make_feed(np.array([tokens[:-1]]), np.arange(length, total)[None], np.ones((1, total)))
        out.append(backend.infer(feed)["logits"][0])
    return np.concatenate(out)


def hf_logits(model, prompt: tuple[int, ...], tokens: list[int]) -> np.ndarray:
    """[len(tokens), vocab]: transformers on prompt + served tokens, the positions that chose them."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + tokens[:-1]])).logits[0].float().numpy()
    return logits[len(prompt) - 1:]


@pytest.fixture(scope="module")
def tiny(hf_checkpoint, tmp_path_factory):
    checkpoint, model = hf_checkpoint

    def backend(kind: str, tp: int = 1, pp: int = 1, kv_cache: str = "static"):
        if kind == "ort":
            return OrtBackend(shared_artifact(tmp_path_factory, checkpoint, tp=tp, pp=pp, kv_cache=kv_cache,
                                              max_seq_len=MAX_SEQ_LEN))
        return TorchBackend(Checkpoint(checkpoint), tp=tp, pp=pp, dtype="float32",
                            options=ModelOptions(kv_cache=kv_cache, max_seq_len=MAX_SEQ_LEN))
    return backend, model


@pytest.mark.parametrize("kind,tp,pp,batches", [
    pytest.param("ort", 1, 1, (4, 8), id="ort-tp1"),
    pytest.param("ort", 2, 2, (4,), id="ort-tp2xpp2"),
    pytest.param("torch", 1, 1, (8,), id="torch-tp1"),
])
def test_continuous_batching_gives_each_request_its_logits_alone_and_transformers(tiny, kind, tp, pp, batches):
    open_backend, model = tiny
    backend = open_backend(kind, tp, pp)
    for max_batch in batches:
        served = serve(backend, WORKLOAD, max_batch, keep_logits=True)
        assert served.prefills == len(WORKLOAD)
        errors = {"alone": 0.0, "transformers": 0.0}
        for request, done in zip(WORKLOAD, served.completions):
            got = np.stack(done.logits)
            assert len(done.tokens) == request.options.max_new_tokens and done.stop_reason == "max_new_tokens"
            alone = alone_logits(backend, request.prompt, done.tokens)
            assert alone.argmax(axis=-1).tolist() == done.tokens  # greedy: the tokens it picks alone
            errors["alone"] = max(errors["alone"], float(np.abs(got - alone).max()))
            errors["transformers"] = max(errors["transformers"],
                                         float(np.abs(got - hf_logits(model, request.prompt, done.tokens)).max()))
        print(kind, tp, pp, max_batch, served.decode_steps, {k: f"{v:.2g}" for k, v in errors.items()})
        assert all(e <= FP32_MAX_ABS for e in errors.values()), errors
        # Rows were refilled: fewer decode steps than lockstep batches of the same size would take.
        lockstep_steps = sum(max(r.options.max_new_tokens for r in WORKLOAD[i:i + max_batch]) - 1
                             for i in range(0, len(WORKLOAD), max_batch))
        assert served.decode_steps < lockstep_steps


def test_lockstep_batches_give_the_continuous_tokens_on_both_cache_layouts(tiny):
    open_backend, _ = tiny
    continuous = serve(open_backend("ort"), WORKLOAD, 4, keep_logits=True)
    for kv_cache in ("static", "concat"):
        lockstep = serve(open_backend("ort", kv_cache=kv_cache), WORKLOAD, 4, "lockstep", keep_logits=True)
        assert [c.tokens for c in lockstep.completions] == [c.tokens for c in continuous.completions]
        error = max(float(np.abs(np.stack(a.logits) - np.stack(b.logits)).max())
                    for a, b in zip(lockstep.completions, continuous.completions))
        assert error <= FP32_MAX_ABS, (kv_cache, error)
        assert lockstep.decode_steps > continuous.decode_steps


def test_sampling_follows_each_requests_own_seed_not_its_neighbours(tiny):
    open_backend, _ = tiny
    backend = open_backend("ort")
    sampled = [Request(r.prompt, SamplingOptions(max_new_tokens=r.options.max_new_tokens, temperature=1.0,
                                                 top_p=0.9, seed=i)) for i, r in enumerate(WORKLOAD[:10])]
    together = serve(backend, sampled, 4)
    alone = [serve(backend, [r], 1).completions[0].tokens for r in sampled]
    assert [c.tokens for c in together.completions] == alone
    greedy = serve(backend, WORKLOAD[:10], 4)
    assert [c.tokens for c in together.completions] != [c.tokens for c in greedy.completions]  # it did sample


def test_a_stop_id_ends_the_request_and_frees_its_row(tiny):
    open_backend, _ = tiny
    backend = open_backend("ort")
    first = serve(backend, WORKLOAD[:6], 2)
    tokens = first.completions[0].tokens
    stop = Request(WORKLOAD[0].prompt, WORKLOAD[0].options, stop_ids=frozenset({tokens[2]}))
    again = serve(backend, [stop, *WORKLOAD[1:6]], 2)
    cut = tokens[:tokens.index(tokens[2]) + 1]
    assert again.completions[0].tokens == cut and again.completions[0].stop_reason == "stop_token"
    assert [c.tokens for c in again.completions[1:]] == [c.tokens for c in first.completions[1:]]


# -- the command line ------------------------------------------------------------------------------


def write_requests(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("line,message", [
    ({"prompt": "hi", "temprature": 0.5}, "unknown key 'temprature'"),
    ({"prompt": "hi", "temperature": "hot"}, "\"temperature\" must be a number, got \"hot\""),
    ({"prompt": ""}, "\"prompt\" must be non-empty text"),
    ({"tokens": [5, 6], "prompt": "hi"}, "exactly one of \"prompt\""),
    ({"tokens": [5, True]}, "\"tokens\" must be a non-empty list of integer token ids"),
    ({"tokens": [5, 300]}, "token id 300, outside the model's vocabulary 0..255"),
    ({"tokens": [5], "max_new_tokens": MAX_SEQ_LEN}, f"max_new_tokens {MAX_SEQ_LEN} leaves no room"),
    ({"tokens": [5] * 200, "max_new_tokens": 100}, "the prompt (200 tokens) + max_new_tokens 100 needs 300"),
    ({"tokens": [5], "max_new_tokens": 0}, "\"max_new_tokens\" must be an integer >= 1"),
    ({"tokens": [5], "stop": "\n"}, "\"stop\" must be a list"),
    ("{\"prompt\": \"hi\"", "not JSON"),
])
def test_a_bad_request_line_is_refused_naming_file_and_line(hf_checkpoint, tmp_path_factory, tmp_path, capsys,
                                                            line, message):
    artifact = shared_artifact(tmp_path_factory, hf_checkpoint[0], max_seq_len=MAX_SEQ_LEN)
    path = write_requests(tmp_path / "requests.jsonl", [{"tokens": [5, 6, 7]}, "", line])
    code, out, err = run_cli(["generate", "--artifact", str(artifact), "--backend", "ort", "--requests", str(path)],
                             capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"llama405 generate: {path}:3: ") or f" {path}:3: " in err, err
    assert message in err, err


def test_continuous_batching_refuses_a_concat_artifact_naming_kv_cache_writes(hf_checkpoint, tmp_path_factory,
                                                                              tmp_path, capsys):
    artifact = shared_artifact(tmp_path_factory, hf_checkpoint[0], kv_cache="concat", max_seq_len=MAX_SEQ_LEN)
    path = write_requests(tmp_path / "requests.jsonl", [{"tokens": [5, 6, 7]}])
    code, _, err = run_cli(["generate", "--artifact", str(artifact), "--backend", "ort", "--requests", str(path)],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "kv_cache_writes='lockstep'" in err and "--batching lockstep" in err and "--kv-cache static" in err


def test_serving_flags_need_a_request_file(hf_checkpoint, tmp_path_factory, capsys):
    artifact = shared_artifact(tmp_path_factory, hf_checkpoint[0], max_seq_len=MAX_SEQ_LEN)
    code, _, err = run_cli(["generate", "--artifact", str(artifact), "--backend", "ort", "--prompt", "hi",
                            "--max-batch", "4"], capsys)
    assert code == 2 and "--max-batch applies to --requests FILE" in err, err


# -- with a tokenizer: text prompts, stop texts, torchrun --------------------------------------------

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def llama3_vocab_artifact(tmp_path_factory) -> Path:
    """TP2, Llama 3's vocabulary, so the artifact's tokenizer reads and writes text."""
    root = tmp_path_factory.mktemp("serve-cli")
    checkpoint = save_hf(hf_model(tiny_config(vocab_size=128256, num_hidden_layers=2)), root / "ckpt",
                         max_shard_size="20MB")
    return export_artifact(checkpoint, root / "art", ExportOptions(tp=2, dtype="float32", max_seq_len=64))


def cli_requests(tmp_path: Path) -> Path:
    return write_requests(tmp_path / "requests.jsonl", [
        {"prompt": "The capital of France is", "max_new_tokens": 6},
        {"tokens": [128000, 9906], "max_new_tokens": 9, "id": "hello"},
        {"prompt": "Once upon a time", "max_new_tokens": 3, "temperature": 0.8, "seed": 3},
        {"prompt": "Hi", "max_new_tokens": 7},
    ])


def test_requests_through_the_cli_and_under_torchrun(llama3_vocab_artifact, tmp_path, capsys):
    path = cli_requests(tmp_path)
    argv = ["generate", "--artifact", str(llama3_vocab_artifact), "--backend", "ort", "--requests", str(path),
            "--max-batch", "2", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    *outputs, totals = [json.loads(line) for line in out.splitlines()]
    assert [o["id"] for o in outputs] == [1, "hello", 3, 4] and [o["line"] for o in outputs] == [1, 2, 3, 4]
    assert [len(o["tokens"]) for o in outputs] == [6, 9, 3, 7]  # random weights: no stop token
    assert totals["totals"]["generated_tokens"] == 25 and totals["totals"]["requests"] == 4
    assert all(o["time_to_first_token_s"] <= o["seconds"] for o in outputs)

    code, lockstep, err = run_cli(argv + ["--batching", "lockstep"], capsys)
    assert code == 0, err
    assert [json.loads(line)["tokens"] for line in lockstep.splitlines()[:-1]] == [o["tokens"] for o in outputs]

    # A stop text: the request ends at the token whose text completes it, its text cut before it.
    text = outputs[1]["text"]
    stop_at = text[len(text) // 2:len(text) // 2 + 2]
    write_requests(path, [{"tokens": [128000, 9906], "max_new_tokens": 9, "stop": [stop_at]}])
    code, out, err = run_cli(argv, capsys)
    stopped = json.loads(out.splitlines()[0])
    assert code == 0 and stopped["stop_reason"] == "stop_text", (err, stopped)
    assert stopped["tokens"] == outputs[1]["tokens"][:len(stopped["tokens"])] and stop_at not in stopped["text"]

    path = cli_requests(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "runner.cli", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == len(outputs) + 1, done.stdout  # rank 0 alone reports
    for got, want in zip(map(json.loads, lines), outputs):
        assert (got["id"], got["tokens"], got["text"]) == (want["id"], want["tokens"], want["text"])
