"""onnxruntime-genai runs our TP1 artifacts as they are: genai_config.json at the artifact root,
both cache modes (the static graph under genai's buffer-sharing mode), a batch of two prompts of
different lengths, 32 greedy tokens each equal to our runner's and to Hugging Face transformers'.

onnxruntime-genai is a test-only dependency (the `cpu` extra: it needs onnxruntime's CPU build,
so a GPU install, `make setup-gpu`, has none and these tests skip there); it is the independent
runtime here, transformers the independent model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# Before onnxruntime (runner.backends.ort): genai finds onnxruntime's library itself.
og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai comes with the `cpu` extra (make setup)")

from export.genai_config import GENAI_CONFIG, NOT_SUPPORTED  # noqa: E402
from export.manifest import load_manifest  # noqa: E402
from export.onnx_export import ExportOptions, export_artifact  # noqa: E402
from runner.backends.ort import OrtBackend  # noqa: E402
from runner.generate import SamplingOptions, generate  # noqa: E402
from tests.conftest import hf_model, save_hf, tiny_config  # noqa: E402

NEW_TOKENS = 32
PROMPTS = [[1, 17, 99, 43], [1, 200, 5, 61, 77, 12, 150]]
EOS = 255


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    cfg = tiny_config(num_hidden_layers=2, eos_token_id=(EOS,))
    model = hf_model(cfg, seed=3)
    return model, save_hf(model, tmp_path_factory.mktemp("genai") / "ckpt")


def hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    return out[0, len(prompt):].tolist()


def genai_greedy(artifact, prompts: list[list[int]]) -> list[list[int]]:
    """genai's own batching: right-padded with pad_token_id (what its tokenizer's encode_batch makes)."""
    model = og.Model(str(artifact))
    width = max(len(p) for p in prompts)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + NEW_TOKENS, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([p + [EOS] * (width - len(p)) for p in prompts], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)][width:] for i in range(len(prompts))]


@pytest.mark.parametrize("kv_cache", ["static", "concat"])
def test_genai_runs_our_artifact_and_agrees_with_our_runner_and_transformers(model_and_checkpoint, tmp_path, kv_cache):
    model, checkpoint = model_and_checkpoint
    artifact = export_artifact(checkpoint, tmp_path / kv_cache, ExportOptions(
        dtype="float32", kv_cache=kv_cache, max_seq_len=64))
    manifest = load_manifest(artifact, verify_hashes=True)  # genai_config.json is listed and hashed
    config = json.loads((artifact / GENAI_CONFIG).read_text())
    assert manifest.extra["genai"] == {"config": GENAI_CONFIG} and GENAI_CONFIG in manifest.files
    assert config["model"]["decoder"]["filename"] == "rank0/model.onnx"
    assert config["search"]["past_present_share_buffer"] is (kv_cache == "static")

    oracle = [hf_greedy(model, p) for p in PROMPTS]
    assert all(len(t) == NEW_TOKENS for t in oracle), "the oracle stopped early: pick another seed"
    ours = generate(OrtBackend(artifact), PROMPTS, SamplingOptions(max_new_tokens=NEW_TOKENS), stop_ids=[EOS]).tokens
    theirs = genai_greedy(artifact, PROMPTS)
    assert ours == oracle
    assert [t[:NEW_TOKENS] for t in theirs] == oracle


def test_tp2_artifacts_say_why_genai_cannot_run_them(model_and_checkpoint, tmp_path):
    _, checkpoint = model_and_checkpoint
    artifact = export_artifact(checkpoint, tmp_path / "tp2", ExportOptions(tp=2, dtype="float32", max_seq_len=32))
    manifest = load_manifest(artifact)
    assert manifest.extra["genai"] == {"config": None, "why": NOT_SUPPORTED}
    assert not (artifact / GENAI_CONFIG).exists()


def test_search_defaults_come_from_generation_config(model_and_checkpoint, tmp_path):
    import shutil
    _, checkpoint = model_and_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                             "bos_token_id": 1, "eos_token_id": EOS}))
    artifact = export_artifact(copy, tmp_path / "art", ExportOptions(dtype="float32", max_seq_len=32))
    search = json.loads((artifact / GENAI_CONFIG).read_text())["search"]
    assert (search["do_sample"], search["temperature"], search["top_p"]) == (True, 0.6, 0.9)
