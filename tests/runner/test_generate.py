"""Generation loop: greedy against transformers' generate, batching, sampling determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.checkpoint import Checkpoint
from export.errors import InputError
from export.model import ModelOptions
from runner.backends.torch import TorchBackend
from runner.generate import SamplingOptions, generate

PROMPTS = [[1, 17, 42, 99, 5, 200, 31], [1, 8, 250]]


def backend(path, kv_cache="static", tp=1, max_seq_len=64):
    return TorchBackend(Checkpoint(path), tp=tp, options=ModelOptions(kv_cache=kv_cache, max_seq_len=max_seq_len))


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv_cache,tp", [("static", 1), ("concat", 2)])
def test_greedy_20_tokens_match_transformers_generate(hf_checkpoint, kv_cache, tp):
    path, model = hf_checkpoint
    result = generate(backend(path, kv_cache, tp), PROMPTS, SamplingOptions(max_new_tokens=20))
    for prompt, tokens in zip(PROMPTS, result.tokens):
        assert tokens == hf_greedy(model, prompt, 20)


def test_stop_token_ends_a_sequence_early(hf_checkpoint):
    path, model = hf_checkpoint
    expected = hf_greedy(model, PROMPTS[0], 10)
    stop = expected[4]
    result = generate(backend(path), PROMPTS, SamplingOptions(max_new_tokens=10), stop_ids=[stop])
    first = result.tokens[0]
    assert first == expected[:expected.index(stop) + 1] and result.stop_reasons[0] == "stop_token"


def test_sampling_is_seeded(hf_checkpoint):
    path, _ = hf_checkpoint
    options = SamplingOptions(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = generate(backend(path), PROMPTS, options).tokens
    b = generate(backend(path), PROMPTS, options).tokens
    c = generate(backend(path), PROMPTS, SamplingOptions(12, 1.0, 0.9, seed=8)).tokens
    assert a == b and a != c


def test_prompt_too_long_for_cache(hf_checkpoint):
    path, _ = hf_checkpoint
    with pytest.raises(InputError, match="max_seq_len=16"):
        generate(backend(path, max_seq_len=16), [list(range(1, 10))], SamplingOptions(max_new_tokens=10))


def test_top_p_keeps_only_the_nucleus():
    from runner.generate import choose_tokens
    logits = np.log(np.array([[0.6, 0.3, 0.05, 0.05]]))
    rng = np.random.default_rng(0)
    picks = {int(choose_tokens(logits, SamplingOptions(temperature=1.0, top_p=0.8), rng)[0]) for _ in range(200)}
    assert picks == {0, 1}


def test_every_backend_shares_one_lifecycle(hf_checkpoint):
    """runner/backends/base.py: infer before start, a feed of another batch, a feed missing a
    tensor and a position past the RoPE tables are refused by the base, for every backend."""
    from runner.backends.base import make_feed
    path, _ = hf_checkpoint
    with backend(path) as b:
        ids, positions = np.array([[1, 2, 3]]), np.arange(3)[None]
        with pytest.raises(InputError, match="call start"):
            b.infer(make_feed(ids, positions, np.ones((1, 3))))
        b.start(2)
        with pytest.raises(InputError, match="a batch of 1 but start"):
            b.infer(make_feed(ids, positions, np.ones((1, 3))))
        with pytest.raises(InputError, match="lacks attention_mask"):
            b.infer({"input_ids": ids, "position_ids": positions})
        far = np.full((2, 1), b.config.max_position_embeddings)
        with pytest.raises(InputError, match="max_position_embeddings"):
            b.infer(make_feed(np.ones((2, 1)), far, np.ones((2, 1))))
