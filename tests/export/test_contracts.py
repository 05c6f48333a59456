"""Pure contracts of small export modules, each on hand-made inputs (no export, no model):
the KV-cache layouts' TensorRT profile points, config.json's quantization exclusions, the two
TensorRT flavours' target rules, and the constant folder of graph_passes."""

from __future__ import annotations

import fnmatch
import json

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from export import trt_flavours
from export.checkpoint_quant import CheckpointQuantization, read_checkpoint_quantization
from export.engines_record import ENGINES_FORMAT, BuildGpu, EnginesSection
from export.quantization import quantization_named
from export.errors import ConfigError, InputError
from export.graph_passes import fold_constant_arithmetic
from export.kv_cache import KV_CACHE_LAYOUTS

STATIC, CONCAT = KV_CACHE_LAYOUTS["static"], KV_CACHE_LAYOUTS["concat"]
NONE, FP8 = quantization_named("none"), quantization_named("fp8")


# -- kv_cache: TensorRT optimization profile points ------------------------------------------

def _ordered(profile: tuple[dict, dict, dict]) -> bool:
    low, opt, high = profile
    return set(low) == set(opt) == set(high) and all(low[k] <= opt[k] <= high[k] for k in low)


@pytest.mark.parametrize("seq", [(1, 16, 64), (1, 1, 1)])
def test_static_profile_fixes_the_buffer_and_varies_the_mask_width(seq):
    (profile,) = STATIC.profile_points((1, 4, 8), seq, 128)
    assert _ordered(profile)
    assert [p["batch"] for p in profile] == [1, 4, 8] and [p["seq"] for p in profile] == list(seq)
    assert [p["total_seq"] for p in profile] == [1, 128, 128]  # a one-token prefill .. a full-width decode
    assert all(p["seq"] <= p["total_seq"] <= 128 for p in profile)


def test_concat_profiles_are_self_consistent_context_and_decode():
    context, decode = CONCAT.profile_points((1, 2, 4), (1, 32, 64), 256)
    for profile in (context, decode):
        assert _ordered(profile) and set(profile[0]) == {"batch", "seq", "past_seq"}
        # attention_mask = past + seq: every point is a step some generation takes
        assert all(p["past_seq"] + p["seq"] <= 256 for p in profile)
    assert [p["seq"] for p in context] == [1, 32, 64] and context[2]["past_seq"] == 256 - 64
    assert [p["seq"] for p in decode] == [1, 1, 1] and [p["past_seq"] for p in decode] == [0, 128, 255]


def test_concat_with_one_token_steps_has_only_the_decode_profile():
    (decode,) = CONCAT.profile_points((1, 1, 1), (1, 1, 1), 64)
    assert [p["past_seq"] for p in decode] == [0, 32, 63] and all(p["seq"] == 1 for p in decode)


# -- checkpoint_quant: the producers' exclusion lists ------------------------------------------

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.10.self_attn.o_proj",
           "model.layers.1.self_attn.k_proj", "lm_head", "model.layers.2.mlp[x].down_proj"]


def _read(tmp_path, section) -> CheckpointQuantization:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **({} if section is None else {"quantization_config": section})}))
    return read_checkpoint_quantization(path)


def _excluded(patterns: tuple[str, ...], module: str) -> bool:
    """QuantConfig's reading of a pattern (export/fp8.py): re: + re.match from the start, else fnmatch."""
    import re
    return any(re.match(p[3:], module) if p.startswith("re:") else fnmatch.fnmatchcase(module, p)
               for p in patterns)


def test_transformers_list_is_a_substring_rule(tmp_path):
    names = ["self_attn", "model.layers.1.", "mlp[x]"]
    quant = _read(tmp_path, {"quant_method": "fbgemm_fp8", "modules_to_not_convert": names})
    assert (quant.method, quant.key, quant.not_quantized) == ("fbgemm_fp8", "modules_to_not_convert", tuple(names))
    for module in MODULES:  # the producer's rule: `name in module_path`
        assert _excluded(quant.fp8_exclude_patterns(), module) == any(n in module for n in names), module


def test_compressed_tensors_list_is_exact_paths_or_regexes(tmp_path):
    names = ["lm_head", "re:.*layers\\.1\\..*", "model.layers.2.mlp[x].down_proj"]
    quant = _read(tmp_path, {"quant_method": "compressed-tensors", "ignore": names})
    got = [m for m in MODULES if _excluded(quant.fp8_exclude_patterns(), m)]
    assert got == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.k_proj", "lm_head",
                   "model.layers.2.mlp[x].down_proj"]


def test_modelopt_list_is_fnmatch_as_written(tmp_path):
    quant = _read(tmp_path, {"quant_method": "modelopt", "exclude_modules": ["*self_attn*"]})
    assert quant.fp8_exclude_patterns() == ("*self_attn*",)
    assert quant.manifest_record(honoured=False) == {"quant_method": "modelopt", "key": "exclude_modules",
                                                     "modules": ["*self_attn*"], "honoured": False}


def test_no_quantization_config_or_no_list(tmp_path):
    assert _read(tmp_path, None) == CheckpointQuantization()
    assert _read(tmp_path, {"quant_method": "fp8"}) == CheckpointQuantization(method="fp8")
    assert CheckpointQuantization().fp8_exclude_patterns() == ()


@pytest.mark.parametrize("section,message", [
    ({"ignore": ["a"], "exclude_modules": ["b"]}, "has both 'ignore' and 'exclude_modules'"),
    ({"ignore": "lm_head"}, "must be a list of module names"),
    ({"ignore": ["lm_head", ""]}, "must be a list of module names"),
    (["not", "an", "object"], "quantization_config is list, not an object"),
])
def test_malformed_lists_are_refused_naming_the_file(tmp_path, section, message):
    with pytest.raises(ConfigError, match="config.json") as err:
        _read(tmp_path, section)
    assert message in str(err.value)


def test_unreadable_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_checkpoint_quantization(tmp_path / "config.json")


# -- trt_flavours: targets -------------------------------------------------------------------

RTX, TENSORRT = trt_flavours.flavour("rtx"), trt_flavours.flavour("tensorrt")


def test_rtx_targets_default_lowercase_and_dedupe():
    assert RTX.resolve_targets(None, NONE) == RTX.default_targets
    assert RTX.resolve_targets("", FP8) == RTX.fp8_targets
    assert set(RTX.fp8_targets) <= set(RTX.targets) and set(RTX.default_targets) <= set(RTX.targets)
    assert RTX.resolve_targets(" SM89, sm120,sm89 ", NONE) == ("sm89", "sm120")
    assert "sm90" not in RTX.targets  # no H100 target: the docstring's promise


@pytest.mark.parametrize("requested,quant,message", [
    ("sm90", "none", "no sm90"),
    (",", "none", "no target given"),
    ("sm86,sm89", "fp8", "will not be able to run on sm86"),
])
def test_rtx_refuses_targets_it_cannot_build(requested, quant, message):
    with pytest.raises(InputError, match=message):
        RTX.resolve_targets(requested, quantization_named(quant))


def test_tensorrt_builds_for_its_own_gpu_only():
    assert TENSORRT.resolve_targets(None, FP8) == () and not TENSORRT.builds_without_gpu
    with pytest.raises(InputError, match="ahead-of-time targets need --trt rtx"):
        TENSORRT.resolve_targets("sm89", NONE)
    with pytest.raises(InputError, match="choose one of tensorrt, rtx"):
        trt_flavours.flavour("trt")


def test_version_tuple_reads_three_numbers():
    assert trt_flavours.version_tuple("10.16.0.72") == (10, 16, 0)
    assert trt_flavours.version_tuple("1.7.1.116") == (1, 7, 1) >= RTX.min_version


@pytest.mark.parametrize("devices,section,why", [
    ([], {"flavour": "rtx", "targets": ["sm89"]}, "need an NVIDIA GPU"),
    ([("RTX 4090", (8, 9))], {"flavour": "rtx", "targets": ["sm86", "sm89"]}, None),
    ([("RTX 3090", (8, 6))], {"flavour": "rtx", "targets": ["sm89"]}, "this machine's GPUs are sm86"),
    ([("H100", (9, 0))], {"flavour": "tensorrt", "gpu": {"name": "H100", "sm": "9.0"}}, None),
    ([("L40S", (8, 9))], {"flavour": "tensorrt", "gpu": {"name": "H100", "sm": "9.0"}}, "built on H100 (SM9.0)"),
])
def test_why_engines_cannot_run(monkeypatch, devices, section, why):
    monkeypatch.setattr(trt_flavours, "cuda_devices", lambda: devices)
    gpu = section.get("gpu")
    typed = EnginesSection(format=ENGINES_FORMAT, flavour=section["flavour"], version="0", targets=tuple(
        section.get("targets", ())), flags=(), builder_optimization_level=3, workspace_bytes=None, max_batch=1,
        max_input_len=1, max_seq_len=16, opt_batch=1, opt_input_len=1, gpu=(BuildGpu(**gpu),) if gpu else ())
    got = trt_flavours.why_engines_cannot_run(typed)
    assert got is None if why is None else why in got, got


# -- graph_passes: constant folding ----------------------------------------------------------

def _shape_arithmetic_graph() -> onnx.ModelProto:
    """ReduceMean whose axes come from Reshape(Constant, Constant) (what torch.onnx leaves with
    optimize=False), a dead Neg, and Y = mean(X, axis 1) + X."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Constant", [], ["axes_flat"], value=helper.make_tensor("a", i64, [1], [1])),
        helper.make_node("Constant", [], ["axes_shape"], value=helper.make_tensor("s", i64, [1], [1])),
        helper.make_node("Reshape", ["axes_flat", "axes_shape"], ["axes"]),
        helper.make_node("ReduceMean", ["X", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "X"], ["Y"]),
        helper.make_node("Neg", ["axes_flat"], ["unused"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def test_folding_leaves_build_time_constants_and_no_initializers():
    model = _shape_arithmetic_graph()
    folded = fold_constant_arithmetic(onnx.load_from_string(model.SerializeToString()))
    onnx.checker.check_model(folded)
    ops = [n.op_type for n in folded.graph.node]
    assert "Reshape" not in ops and "Neg" not in ops and ops.count("ReduceMean") == 1
    producers = {o: n for n in folded.graph.node for o in n.output}
    reduce = next(n for n in folded.graph.node if n.op_type == "ReduceMean")
    assert producers[reduce.input[1]].op_type == "Constant"  # TensorRT's build-time constant axes
    assert list(folded.graph.initializer) == []  # folded values went back to Constant nodes
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(folded, x), _run(model, x))
    np.testing.assert_allclose(_run(folded, x), x.mean(axis=1, keepdims=True) + x)
