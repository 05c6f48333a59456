"""Our rank modules against Hugging Face transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.checkpoint import Checkpoint
from export.model import ModelOptions
from runner.backends.base import make_feed
from runner.backends.torch import TorchBackend
from export.config import RopeScaling
from tests.conftest import hf_model, save_hf, tiny_config


def run_ours(path, ids, positions, tp=1, pp=1, kv_cache="static", dtype="float32"):
    backend = TorchBackend(Checkpoint(path), tp=tp, pp=pp, dtype=dtype,
                           options=ModelOptions(kv_cache=kv_cache, max_seq_len=64))
    backend.start(ids.shape[0])
    feed = make_feed(ids, positions, np.ones_like(ids))
    return backend.infer(feed)["logits"]


def run_hf(model, ids, positions):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(positions)).logits.numpy()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 11))
    # Positions past 8192 (and past the tiny config's original context) exercise llama3 scaling.
    positions = np.stack([np.arange(9000, 9011), np.arange(100, 111)])
    return ids, positions


@pytest.mark.parametrize("tp,pp,kv_cache", [
    (1, 1, "static"), (2, 1, "static"), (4, 1, "concat"), (8, 1, "static"),  # tp 4, 8 > 2 KV heads
    (1, 2, "static"), (2, 2, "concat"),
])
def test_fp32_logits_match_transformers(hf_checkpoint, inputs, tp, pp, kv_cache):
    path, model = hf_checkpoint
    ids, positions = inputs
    ours = run_ours(path, ids, positions, tp, pp, kv_cache)
    reference = run_hf(model, ids, positions)
    assert np.abs(ours - reference).max() <= 1e-4
    assert np.abs(reference).max() > 1.0  # the weights produce non-trivial logits


def test_tied_embeddings_and_mha(tmp_path, inputs):
    cfg = tiny_config(tie_word_embeddings=True, num_key_value_heads=8)
    model = hf_model(cfg, seed=1)
    path = save_hf(model, tmp_path / "tied", max_shard_size="10MB")
    ids, positions = inputs
    for tp in (1, 2):
        assert np.abs(run_ours(path, ids, positions, tp=tp) - run_hf(model, ids, positions)).max() <= 1e-4


def test_no_rope_scaling_checkpoint(tmp_path, inputs):
    cfg = tiny_config(rope_scaling=None, rope_theta=10000.0)
    model = hf_model(cfg, seed=2)
    path = save_hf(model, tmp_path / "plain")
    ids, positions = inputs
    assert np.abs(run_ours(path, ids, positions) - run_hf(model, ids, positions)).max() <= 1e-4


def test_fp16_within_fp16_noise(hf_checkpoint, inputs):
    path, model = hf_checkpoint
    ids, positions = inputs
    reference = run_hf(model, ids, positions)
    ours = run_ours(path, ids, positions, tp=2, dtype="float16")
    # fp16 keeps ~3 significant digits; through 3 layers the logits drift by a few 1e-3
    # relative to their scale. 1% of the largest logit is far below any token-choice change.
    assert np.abs(ours - reference).max() <= 1e-2 * np.abs(reference).max()


def test_tp_and_pp_equal_tp1(hf_checkpoint, inputs):
    path, _ = hf_checkpoint
    ids, positions = inputs
    base = run_ours(path, ids, positions)
    for tp, pp in ((2, 1), (4, 1), (2, 2), (1, 3)):
        np.testing.assert_allclose(run_ours(path, ids, positions, tp, pp), base, atol=1e-5)


def test_duplicated_kv_heads_are_detected_and_removed(tmp_path, inputs):
    """A checkpoint that stores every KV head twice (as some 405B uploads do) computes the same
    function; the loader serves it with the real number of KV heads."""
    cfg = tiny_config()
    model = hf_model(cfg, seed=3)
    ids, positions = inputs
    reference = run_hf(model, ids, positions)
    dup_cfg = cfg.replace(num_key_value_heads=4)
    dup = hf_model(dup_cfg, seed=3)
    state = model.state_dict()
    d = cfg.head_dim
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = tensor.view(cfg.num_key_value_heads, d, -1)
            state[name] = heads.repeat_interleave(2, dim=0).reshape(-1, tensor.shape[1])
    dup.load_state_dict(state)
    path = save_hf(dup, tmp_path / "dup")
    assert np.abs(run_hf(dup, ids, positions) - reference).max() <= 1e-4  # same function
    checkpoint = Checkpoint(path)
    assert checkpoint.kv_dup_factor == 2 and checkpoint.config.num_key_value_heads == 2
    for tp in (1, 4):
        assert np.abs(run_ours(path, ids, positions, tp=tp) - reference).max() <= 1e-4


# Llama 3.2 1B / 3B geometry at toy width: tied embeddings, llama3 RoPE scaling (factor 32), 8 KV
# heads of 32 / 24 query heads; the 3B shape has head_dim != hidden / heads.
LLAMA32 = {
    "1b": dict(hidden_size=256, intermediate_size=512, num_attention_heads=32, num_key_value_heads=8, head_dim=8),
    "3b": dict(hidden_size=192, intermediate_size=384, num_attention_heads=24, num_key_value_heads=8, head_dim=16),
}
LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("size", sorted(LLAMA32))
def test_llama32_geometry_tied_with_llama3_rope(tmp_path, inputs, size):
    cfg = tiny_config(tie_word_embeddings=True, rope_scaling=LLAMA32_ROPE, rope_theta=500000.0, **LLAMA32[size])
    model = hf_model(cfg, seed=4)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    path = save_hf(model, tmp_path / size, max_shard_size="10MB")
    ids, positions = inputs
    reference = run_hf(model, ids, positions)
    for tp in (1, 2, 8):  # 8: one KV head per rank
        assert np.abs(run_ours(path, ids, positions, tp=tp) - reference).max() <= 1e-4, tp
