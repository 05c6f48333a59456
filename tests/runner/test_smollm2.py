"""A trained model end to end: SmolLM2-135M-Instruct converted by `convert-gguf`, exported, run in
onnxruntime, against Hugging Face transformers over transformers' own GGUF load of the same file
(conftest's `smollm2_hf`: an oracle that shares neither our conversion nor our tokenizer code).

- logits: fp32 artifacts (TP1 and TP3: 9/3 heads -> 3/1 per rank) of the first LAYERS layers,
  prefill + 8 teacher-forced decode steps, max |diff| <= 1e-4 at every position;
- greedy: the full 30-layer fp32 artifact, 64 new tokens for a plain and a chat prompt (one batch of
  two, right-padded), equal to transformers' `generate`;
- onnxruntime-genai's tokenizer over the TP1 artifact equals ours (the artifact carries its tokenizer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.onnx_export import ExportOptions, export_artifact
from export.tokenizer import model_tokenizer
from runner.backends.ort import OrtBackend
from runner.backends.base import make_feed
from runner.generate import SamplingOptions, generate
from tests.conftest import truncated_hf
from tests.export.test_export_artifact import layer_view

pytestmark = pytest.mark.slow

LAYERS = 3  # enough for attention, the MLP and the residual stream to mix; the full depth is the greedy check's
DECODE_STEPS = 8
PLAIN = "Once upon a time"
CHAT = "What is the capital of France?"
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def prompts(smollm2_checkpoint) -> list[list[int]]:
    tokenizer = model_tokenizer(smollm2_checkpoint)
    return [tokenizer.encode(PLAIN), tokenizer.encode_dialog([{"role": "user", "content": CHAT}])]


@pytest.fixture(scope="module")
def shallow(smollm2_checkpoint, tmp_path_factory):
    return layer_view(smollm2_checkpoint, tmp_path_factory.mktemp("smollm2-shallow") / "ckpt", LAYERS)


@pytest.mark.parametrize("tp", [1, 3])
def test_fp32_logits_match_transformers(shallow, smollm2_hf, prompts, tp, tmp_path):
    forced = np.random.default_rng(7).integers(17, 49152, size=(len(prompts), DECODE_STEPS))
    oracle_model = truncated_hf(smollm2_hf, LAYERS)
    with torch.no_grad():
        oracle = [oracle_model(torch.tensor([p + f.tolist()])).logits[0].numpy() for p, f in zip(prompts, forced)]
    artifact = export_artifact(shallow, tmp_path / "art", ExportOptions(tp=tp, dtype="float32", max_seq_len=128))
    backend = OrtBackend(artifact)
    lengths = np.array([len(p) for p in prompts])
    width = int(lengths.max())
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, :len(p)], mask[b, :len(p)] = p, 1
    backend.start(len(prompts))
    prefill = backend.infer(make_feed(ids, np.tile(np.arange(width), (len(prompts), 1)), mask))["logits"]
    steps = []
    for step in range(DECODE_STEPS):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        steps.append(backend.infer(make_feed(forced[:, step:step + 1], (lengths + step)[:, None], mask))["logits"][:, -1])
    err = _errors(prefill, steps, oracle, prompts)
    assert err["prefill"] <= 1e-4 and err["decode"] <= 1e-4, err
    assert max(np.abs(o).max() for o in oracle) > 10  # real logits, not noise around zero


def _errors(prefill, steps, oracle, prompts) -> dict[str, float]:
    """Max |ours - oracle| over every real prompt position, and over every decode step."""
    pre = max(float(np.abs(prefill[b, :len(p)] - oracle[b][:len(p)]).max()) for b, p in enumerate(prompts))
    dec = max(float(np.abs(logits[b] - oracle[b][len(p) + s]).max())
              for s, logits in enumerate(steps) for b, p in enumerate(prompts))
    return {"prefill": pre, "decode": dec}


@pytest.fixture(scope="module")
def full_fp32_artifact(smollm2_checkpoint, tmp_path_factory):
    return export_artifact(smollm2_checkpoint, tmp_path_factory.mktemp("smollm2-art") / "tp1",
                           ExportOptions(tp=1, dtype="float32", max_seq_len=128))


def test_64_greedy_tokens_equal_transformers(full_fp32_artifact, smollm2_hf, prompts):
    tokenizer = model_tokenizer(full_fp32_artifact)
    ours = generate(OrtBackend(full_fp32_artifact), prompts, SamplingOptions(NEW_TOKENS, 0.0, 1.0, 0),
                    stop_ids=(), pad_id=tokenizer.pad_id)
    for prompt, tokens in zip(prompts, ours.tokens):
        with torch.no_grad():
            reference = smollm2_hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                            eos_token_id=None, pad_token_id=tokenizer.pad_id)
        assert tokens == reference[0, len(prompt):].tolist()
        assert len(tokens) == NEW_TOKENS
    text = tokenizer.decode(ours.tokens[1])
    assert "Paris" in text, text  # a trained model answers


def test_genai_tokenizer_reads_the_artifacts_tokenizer(full_fp32_artifact, prompts):
    og = pytest.importorskip("onnxruntime_genai")
    genai_tokenizer = og.Tokenizer(og.Model(str(full_fp32_artifact)))
    assert genai_tokenizer.encode(PLAIN).tolist() == prompts[0]
    assert genai_tokenizer.encode(CHAT).tolist() == model_tokenizer(full_fp32_artifact).encode(CHAT)
    assert genai_tokenizer.decode(np.array(prompts[0], dtype=np.int32)) == PLAIN
