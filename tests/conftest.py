"""Shared fixtures: tiny Llama checkpoints written by Hugging Face transformers (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export.config import LlamaConfig, RopeScaling

# Small original context so test positions (hundreds) cross all three llama3 frequency bands.
TINY_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64)


def tiny_config(**changes) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=256, rope_scaling=TINY_ROPE, bos_token_id=1,
                eos_token_id=(2,))
    base.update(changes)
    return LlamaConfig(**base)


def hf_model(cfg: LlamaConfig, seed: int = 0):
    """transformers' LlamaForCausalLM with weights large enough that errors would show."""
    import transformers
    hf_cfg = transformers.LlamaConfig.from_dict(cfg.to_hf_dict())
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(1.0, 0.1)
    return model


def save_hf(model, directory: Path, max_shard_size: str = "200KB") -> Path:
    """A real HF checkpoint (sharded, with index) via save_pretrained."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(checkpoint dir, HF model) for a GQA config with untied embeddings, 3 layers."""
    cfg = tiny_config(num_hidden_layers=3)
    model = hf_model(cfg)
    path = save_hf(model, tmp_path_factory.mktemp("hf") / "ckpt")
    return path, model


def read_json(path: Path):
    return json.loads(Path(path).read_text())
