"""runner/fidelity.py: perplexity through a backend's KV cache equals transformers' own, and an
FP8 artifact's fidelity report against its unquantized checkpoint is sane."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from export.checkpoint import Checkpoint
from export.errors import InputError
from export.model import ModelOptions
from export.onnx_export import ExportOptions, export_artifact
from runner.backends.base import make_feed
from runner.backends.ort import OrtBackend
from runner.backends.torch import TorchBackend
from runner.fidelity import fidelity_report, format_fidelity, perplexity
from tests.conftest import hf_model, save_hf, tiny_config

MAX_SEQ = 64


def sample_tokens(model, n: int, seed: int) -> np.ndarray:
    """Text drawn from `model` itself at temperature 1: for such text the expected perplexity
    gap of any other model q is exp-monotone in KL(model || q) >= 0, so a quantized model's
    perplexity is reliably higher than the reference's once the reference is confident."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1]
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n - 1):
            probs = torch.softmax(out.logits[0, -1].double(), -1)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
            key = "cache" if "cache" in out else "past_key_values"  # transformers 5.x / 4.x
            out = model(torch.tensor([ids[-1:]]), use_cache=True, **{key: out[key]})
    return np.array(ids, dtype=np.int64)


def hf_perplexity(model, ids: np.ndarray) -> float:
    with torch.no_grad():
        ids_t = torch.from_numpy(ids)[None]
        return math.exp(float(model(ids_t, labels=ids_t).loss))  # transformers' mean shifted CE


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    path, model = hf_checkpoint
    return TorchBackend(Checkpoint(path), dtype="float32", options=ModelOptions(max_seq_len=MAX_SEQ)), model


def test_perplexity_equals_transformers(reference):
    backend, model = reference
    ids = np.random.default_rng(3).integers(0, 256, 32)
    expected = hf_perplexity(model, ids)
    for window in (1, 5, 31):  # one token per step, ragged chunks, one prefill
        got = perplexity(backend, ids, window)
        print(f"\n[fidelity] window {window}: perplexity {got:.6f}, transformers {expected:.6f}, "
              f"rel diff {abs(got - expected) / expected:.2g}")
        assert abs(got - expected) <= 1e-4 * expected


def test_perplexity_rejects_bad_requests(reference):
    backend, _ = reference
    with pytest.raises(InputError, match="positive"):
        perplexity(backend, [1, 2, 3], 0)
    with pytest.raises(InputError, match="at least 2 tokens"):
        perplexity(backend, [1], 4)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        perplexity(backend, [1, 256], 4)
    with pytest.raises(InputError, match="max_seq_len"):
        perplexity(backend, list(range(MAX_SEQ + 2)), 16)  # needs 65 cache slots


def test_identical_backends_have_no_gap(reference, hf_checkpoint):
    backend, model = reference
    twin = TorchBackend(Checkpoint(hf_checkpoint[0]), dtype="float32", options=ModelOptions(max_seq_len=MAX_SEQ))
    report = fidelity_report(twin, backend, sample_tokens(model, 20, seed=1), window=6)
    assert report["perplexity_delta"] == 0 and report["top1_agreement"] == 1.0 and report["mean_kl"] == 0
    assert report["kv_cache"]["max_abs"] == 0 and report["kv_cache"]["per_layer_rel_l2"] == [0.0] * 3


@pytest.fixture(scope="module")
def confident_checkpoint(tmp_path_factory):
    """The tiny model with its lm_head scaled 6x: next-token distributions peaked (perplexity ~3
    on its own samples, not ~150 of the flat random model), so quantization's effect on
    perplexity stands out of the sampling noise."""
    model = hf_model(tiny_config(num_hidden_layers=3))
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return save_hf(model, tmp_path_factory.mktemp("confident") / "ckpt"), model


@pytest.mark.slow  # one rank export (shared with tests/export/test_fp8.py when both run)
def test_fp8_artifact_fidelity_against_checkpoint(confident_checkpoint, tmp_path):
    path, model = confident_checkpoint
    calibration = np.random.default_rng(0).integers(0, 256, (4, 32))
    art = export_artifact(path, tmp_path / "fp8", ExportOptions(dtype="float32", quant="fp8", max_seq_len=MAX_SEQ),
                          calibration_tokens=calibration, calibration_source="test tokens")
    fp8 = OrtBackend(art)
    ref = TorchBackend(Checkpoint(path), dtype="float32", options=ModelOptions(max_seq_len=MAX_SEQ))
    ids = sample_tokens(model, 64, seed=0)
    report = fidelity_report(fp8, ref, ids, window=16)
    print("\n" + format_fidelity(report))
    kv = report["kv_cache"]
    assert report["predictions"] == 63
    assert report["reference_perplexity"] == pytest.approx(hf_perplexity(model, ids), rel=1e-4)
    assert report["perplexity"] == pytest.approx(perplexity(fp8, ids, 63), rel=1e-6)
    assert math.isfinite(report["perplexity_delta"]) and report["perplexity_delta"] > 0
    assert 0.5 <= report["top1_agreement"] < 1.0  # E4M3 flips some argmaxes, not most
    # KL(reference || fp8) per position, as torch computes it from both backends' logits.
    logits = []
    for backend in (fp8, ref):
        backend.start(1)
        logits.append(torch.from_numpy(backend.infer(make_feed(ids[None, :-1], np.arange(63)[None],
                                                               np.ones((1, 63))))["logits"][0]).double())
    want = torch.nn.functional.kl_div(torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1),
                                      log_target=True, reduction="batchmean")
    assert report["mean_kl"] == pytest.approx(float(want), rel=1e-6) and report["mean_kl"] > 0
    assert len(kv["per_layer_rel_l2"]) == len(kv["per_layer_max_abs"]) == 3
    assert all(math.isfinite(x) and x > 0 for x in kv["per_layer_rel_l2"] + kv["per_layer_max_abs"])
    assert kv["worst_layer"] == int(np.argmax(kv["per_layer_rel_l2"]))
    # FP8 error is E4M3's 3-bit mantissa (~2^-4 relative per GEMM input), compounding by depth.
    assert kv["worst_layer_rel_l2"] < 0.5
    assert f"worst layer {kv['worst_layer']}" in format_fidelity(report)
