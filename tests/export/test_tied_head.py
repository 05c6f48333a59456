"""A tied lm_head at TP1 is the embedding's initializer: one [vocab, hidden] matrix in the graph and
the data file, read by the Gather and by the head; the planner counts it once. Logits still equal
HF transformers' (onnxruntime and the torch backend over the artifact), TP2 keeps two slices."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engines.plan import weights_bytes
from export.onnx_export import ExportOptions, export_artifact
from export.sharding import RankSpec
from runner.backends.base import make_feed
from runner.backends.ort import OrtBackend
from runner.backends.torch_artifact import torch_backend_from_artifact
from tests.conftest import hf_model, save_hf, tiny_config


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=True, vocab_size=512)
    model = hf_model(cfg, seed=5)
    return cfg, model, save_hf(model, tmp_path_factory.mktemp("tied") / "ckpt", max_shard_size="10MB")


def _logits(backend, ids):
    backend.start(1)
    return backend.infer(make_feed(ids, np.arange(ids.shape[1])[None], np.ones_like(ids)))["logits"]


def test_tp1_shares_one_matrix_and_still_matches_transformers(tied, tmp_path):
    cfg, model, checkpoint = tied
    artifact = export_artifact(checkpoint, tmp_path / "art", ExportOptions(tp=1, dtype="float32", max_seq_len=32))
    graph = onnx.load(str(artifact / "rank0" / "model.onnx"), load_external_data=False).graph
    names = {i.name: list(i.dims) for i in graph.initializer}
    assert "lm_head.weight" not in names and names["model.embed_tokens.weight"] == [512, 64]
    readers = sorted(n.op_type for n in graph.node if "model.embed_tokens.weight" in n.input)
    assert readers == ["Gather", "Transpose"]
    data = sum(int(e.value) for i in graph.initializer for e in i.external_data if e.key == "length")
    rope = sum(len(i.raw_data) for i in graph.initializer if i.name.startswith("rope_"))
    assert weights_bytes(cfg, RankSpec(0, 1), dtype="float32") == data + rope  # counted once
    ids = np.array([[1, 17, 42, 99, 5, 200, 31, 500]])
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(_logits(OrtBackend(artifact), ids) - reference).max() <= 1e-4
    assert np.abs(_logits(torch_backend_from_artifact(artifact), ids) - reference).max() <= 1e-4


def test_tp2_keeps_two_slices(tied, tmp_path):
    cfg, _, checkpoint = tied
    artifact = export_artifact(checkpoint, tmp_path / "art", ExportOptions(tp=2, dtype="float32", max_seq_len=32))
    graph = onnx.load(str(artifact / "rank0" / "model.onnx"), load_external_data=False).graph
    names = {i.name: list(i.dims) for i in graph.initializer}
    assert names["model.embed_tokens.weight"] == [256, 64] and names["lm_head.weight"] == [512, 32]
    tp1, tp2 = weights_bytes(cfg, RankSpec(0, 1)), weights_bytes(cfg, RankSpec(0, 2))
    assert tp2 > tp1 / 2  # each TP2 rank holds half of both matrices: the TP1 rank holds one
