"""The quantization strategy (export/quantization.py) is the one place a scheme is defined: a toy
weight-only int8 scheme, written here and registered in QUANTIZATIONS (nothing else changes),
is accepted by the options, exported, planned and run — the ONNX graph holds its int8 weights
and onnxruntime computes what the eager module built from the same scheme computes."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from engines.plan import PlanRequest, plan
from export.checkpoint import Checkpoint
from export.manifest import load_manifest
from export.onnx_export import ExportOptions, export_artifact
from export.quantization import QUANTIZATIONS, Fp8, Quantization, Unquantized, quantization_named
from runner.backends.base import make_feed
from runner.backends.ort import OrtBackend
from runner.backends.torch import TorchBackend

MAX_SEQ = 32
# A decoder layer's linears in Hugging Face's naming (transformers' LlamaDecoderLayer).
HF_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (W_int8 * scale[:, None]).T; weight int8 [out, in], weight_scale [out]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight.to(self.weight_scale.dtype) * self.weight_scale[:, None]).t()


@dataclasses.dataclass(frozen=True)
class Int8WeightOnly(Quantization):
    name: ClassVar[str] = "int8-toy"

    def linear(self, in_features, out_features):
        return Int8WeightOnlyLinear(in_features, out_features)

    def rank_tensors(self, checkpoint, spec, weight_name, dtype, input_scales):
        w = checkpoint.read_rank_tensor(weight_name, spec).float()  # [out, in]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
        yield weight_name, iter([(w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)])
        yield weight_name.rsplit(".", 1)[0] + ".weight_scale", iter([scale.to(dtype)])

    def weight_bytes(self, elements, out_rows, compute_bytes):
        return elements + out_rows * compute_bytes


@pytest.fixture
def toy_scheme(monkeypatch):
    monkeypatch.setitem(QUANTIZATIONS, Int8WeightOnly.name, Int8WeightOnly)  # the one registration


def teacher_forced(backend, ids, prefill: int) -> np.ndarray:
    backend.start(1)
    out = [backend.infer(make_feed(ids[None, :prefill], np.arange(prefill)[None], np.ones((1, prefill))))["logits"][0]]
    for pos in range(prefill, len(ids)):
        out.append(backend.infer(make_feed(ids[None, pos:pos + 1], np.array([[pos]]), np.ones((1, pos + 1))))["logits"][0])
    return np.concatenate(out)


def test_a_registered_scheme_exports_a_rank_that_runs_its_math(toy_scheme, hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    options = ExportOptions(dtype="float32", quant=Int8WeightOnly.name, fp8_recipe="all", fp8_exclude=("model.layers.1.*",),
                            max_batch=1, max_seq_len=MAX_SEQ)
    assert options.quantization == Int8WeightOnly("all", ("model.layers.1.*",))
    art = export_artifact(path, tmp_path / "toy", options)
    manifest = load_manifest(art)
    assert manifest.options == options and manifest.quantization == options.quantization

    model = onnx.load(str(art / "rank0" / "model.onnx"), load_external_data=False)
    int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    layers = manifest.config.num_hidden_layers
    expected = {f"model.layers.{i}.{leaf}.weight" for i in range(layers) if i != 1 for leaf in HF_LAYER_LINEARS}
    assert int8 == expected  # every selected linear, and only those (layer 1 excluded)

    ids = np.random.default_rng(0).integers(0, manifest.config.vocab_size, 12)
    got = teacher_forced(OrtBackend(art), ids, prefill=8)
    eager = TorchBackend(Checkpoint(path), dtype="float32", options=options.model_options)  # the same scheme, eager
    want = teacher_forced(eager, ids, prefill=8)
    plain = teacher_forced(TorchBackend(Checkpoint(path), dtype="float32",
                                        options=dataclasses.replace(options, quant="none").model_options), ids, 8)
    assert float(np.abs(got - want).max()) <= 1e-4
    assert float(np.abs(got - plain).max()) > 1e-4  # the int8 rounding reached the graph


def test_the_planner_counts_a_registered_scheme_by_its_own_bytes(toy_scheme, hf_checkpoint):
    cfg = Checkpoint(hf_checkpoint[0]).config
    bytes_of = {q: plan(PlanRequest.of(cfg, quant=q, dtype="float32", fp8_recipe="all")).ranks[0].weights_bytes
                for q in ("none", Int8WeightOnly.name)}
    per_layer = 0
    h, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for out_rows, in_cols in ((q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)):
        per_layer += out_rows * in_cols * 4 - (out_rows * in_cols + out_rows * 4)  # fp32 -> int8 + fp32 scales
    assert bytes_of["none"] - bytes_of[Int8WeightOnly.name] == cfg.num_hidden_layers * per_layer


def test_unknown_scheme_is_refused_naming_the_choices():
    from export.errors import ConfigError
    with pytest.raises(ConfigError, match="--quant 'int4'.*none or fp8"):
        ExportOptions(quant="int4").validate()
    with pytest.raises(ConfigError, match="--quant 'int4'"):
        quantization_named("int4")


def test_each_scheme_answers_for_its_facts():
    fp8, none = Fp8("meta"), Unquantized()
    assert fp8.quantizes("model.layers.2.mlp.up_proj", 4) and not fp8.quantizes("model.layers.2.self_attn.q_proj", 4)
    assert not none.quantizes("model.layers.2.mlp.up_proj", 4)
    assert (fp8.needs_activation_scales, none.needs_activation_scales) == (True, False)
    assert (fp8.fp8_tensor_cores, none.fp8_tensor_cores) == (True, False)
    assert (fp8.tolerance_key("float16", False), fp8.tolerance_key("float16", True)) == ("fp8-float16", "fp8")
    assert none.tolerance_key("bfloat16", True) == "bfloat16"
    assert fp8.weight_bytes(12, 3, 2) == 12 + 3 * 2 + 2 and fp8.activation_bytes(2, 5, 7, 11) == 2 * (10 + 7 + 11)
    # A one-layer template quantizes exactly the pattern of the layer it stands for.
    pattern = fp8.layer_pattern(HF_LAYER_LINEARS, 2, 4)
    assert fp8.for_template(HF_LAYER_LINEARS, pattern, 0).layer_pattern(HF_LAYER_LINEARS, 0, 1) == pattern
    assert fp8.for_template(HF_LAYER_LINEARS, (False,) * len(HF_LAYER_LINEARS), 0) == Unquantized()
    assert ExportOptions(quant="none", fp8_recipe="meta").quantization == Unquantized()
