"""All-reduce placeholder -> DistCollective rewrite, its ONNX schema, and the TensorRT allowlist."""

from __future__ import annotations

import importlib

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import export.collectives as collectives
from export.collectives import (
    DIST_COLLECTIVE,
    PLACEHOLDER_DOMAIN,
    register_dist_collective_schema,
    rewrite_collectives,
)
from export.custom_ops import translation_table
from export.errors import ShardingError
from export.trt_support import silent_trt_problems
from tests.trt_parser import parsed_model_layers

TP_SIZE = 4


class TwoLinear(torch.nn.Module):
    """Column-parallel then row-parallel linear, all-reduced like a TP MLP shard."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16, bias=False)
        self.down = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = collectives.all_reduce(self.up(x))  # [batch, seq, 16]
        return collectives.all_reduce(self.down(torch.nn.functional.silu(h)))  # [batch, seq, 8]


def _export(module: torch.nn.Module, args, opset: int, **kwargs) -> onnx.ModelProto:
    program = torch.onnx.export(
        module, args, dynamo=True, opset_version=opset, optimize=False,
        custom_translation_table=translation_table(collectives.all_reduce), **kwargs,
    )
    return program.model_proto


@pytest.fixture(scope="module", params=[24])  # opset 23 is covered by the schema test below
def exported(request) -> tuple[onnx.ModelProto, int]:
    torch.manual_seed(0)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    model = _export(TwoLinear().eval(), (torch.randn(2, 3, 8),), request.param,
                    input_names=["x"], output_names=["y"], dynamic_shapes=({0: batch, 1: seq},))
    return model, request.param


def _attrs(node: onnx.NodeProto) -> dict[str, tuple[int, object]]:
    return {a.name: (a.type, helper.get_attribute_value(a)) for a in node.attribute}


def test_eager_all_reduce_is_a_copy():
    x = torch.randn(3, 4)
    y = collectives.all_reduce(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def test_reimport_is_safe():
    importlib.reload(collectives)
    register_dist_collective_schema()
    register_dist_collective_schema()
    assert torch.equal(torch.ops.llama405.all_reduce(torch.ones(2)), torch.ones(2))


def test_export_emits_private_placeholder(exported):
    model, opset = exported
    placeholders = [n for n in model.graph.node if n.domain == PLACEHOLDER_DOMAIN]
    assert [n.op_type for n in placeholders] == ["AllReduce", "AllReduce"]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", opset), (PLACEHOLDER_DOMAIN, 1)}


def test_rewrite_gives_checked_dist_collectives(exported):
    model = onnx.ModelProto()
    model.CopyFrom(exported[0])
    assert rewrite_collectives(model, TP_SIZE) == 2

    assert all(o.domain != PLACEHOLDER_DOMAIN for o in model.opset_import)
    assert not any(n.domain == PLACEHOLDER_DOMAIN for n in model.graph.node)
    assert not [f for f in model.functions if f.domain == PLACEHOLDER_DOMAIN]
    dist = [n for n in model.graph.node if n.op_type == DIST_COLLECTIVE]
    assert len(dist) == 2
    A = onnx.AttributeProto
    for node in dist:
        assert node.domain == ""
        assert _attrs(node) == {
            "collective_operation": (A.STRING, b"all_reduce"),
            "reduce_op": (A.STRING, b"sum"),
            "root": (A.INT, -1),
            "group_size": (A.INT, 0),
            "nb_rank": (A.INT, TP_SIZE),
            "groups": (A.INTS, []),
        }
    onnx.checker.check_model(model, full_check=True)


def test_shape_inference_sees_through_dist_collective(exported):
    model = onnx.ModelProto()
    model.CopyFrom(exported[0])
    rewrite_collectives(model, TP_SIZE)
    del model.graph.value_info[:]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in (n for n in inferred.graph.node if n.op_type == DIST_COLLECTIVE):
        before, after = shapes[node.input[0]], shapes[node.output[0]]
        assert after.elem_type == before.elem_type == TensorProto.FLOAT
        assert after.shape == before.shape
    dims = shapes["y"].shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", 8]


def test_dist_collective_schema_infers_gather_shapes():
    register_dist_collective_schema()
    node = helper.make_node("DistCollective", ["x"], ["y"], collective_operation="all_gather",
                            reduce_op="none", nb_rank=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model, full_check=True)
    dims = onnx.shape_inference.infer_shapes(model).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [12, 5]


def test_meta_device_export_keeps_collectives_and_state_dict_names(tmp_path):
    # The exporter's bounded-memory route (README, How it works): meta module -> torch.export -> ONNX,
    # saved without initializers (`model_proto` would try to serialize the meta weights).
    with torch.device("meta"):
        module = TwoLinear().eval()
    exported_program = torch.export.export(module, (torch.empty(2, 3, 8, device="meta"),))
    program = torch.onnx.export(exported_program, dynamo=True, opset_version=24, optimize=False,
                                custom_translation_table=translation_table(collectives.all_reduce))
    program.save(tmp_path / "rank.onnx", include_initializers=False)
    model = onnx.load(tmp_path / "rank.onnx", load_external_data=False)
    rewrite_collectives(model, 2)
    assert not model.graph.initializer and [i.name for i in model.graph.input] == ["x"]
    reads = {name for node in model.graph.node for name in node.input}
    assert {"up.weight", "down.weight"} <= reads  # dangling until the exporter adds initializers
    assert sum(n.op_type == DIST_COLLECTIVE for n in model.graph.node) == 2


def test_rewrite_rejects_bad_tp_size():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ShardingError):
            rewrite_collectives(onnx.ModelProto(), bad)


# --------------------------------------------------------------------------- NVIDIA's parser


def test_rewritten_toy_parses_into_dist_collective_layers(exported):
    model = onnx.ModelProto()
    model.CopyFrom(exported[0])
    n = rewrite_collectives(model, TP_SIZE)
    assert parsed_model_layers(model).get("DIST_COLLECTIVE") == n > 0


def test_placeholder_left_in_graph_is_refused_by_the_parser(exported):
    with pytest.raises(AssertionError, match="AllReduce"):
        parsed_model_layers(exported[0])


def _tiny(nodes, inputs, outputs, initializers=(), opset=24):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] if opset else [])


def _vi(name, dtype=TensorProto.FLOAT, shape=(1, 2, 3, 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_silent_attention_rules_are_flagged():
    """What TensorRT parses but runs differently from ONNX (export/trt_support.py)."""
    ins = [_vi(n) for n in ("q", "k", "v")] + [_vi("lens", TensorProto.INT64, (1,))]
    causal = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="causal", is_causal=1)
    nonpad = helper.make_node("Attention", ["q", "k", "v", "", "", "", "lens"], ["z"], name="nonpad")
    masked = helper.make_node("Attention", ["q", "k", "v"], ["w"], name="masked", is_causal=0)
    problems = silent_trt_problems(_tiny([causal, nonpad, masked], ins, [_vi("y"), _vi("z"), _vi("w")]))
    assert len(problems) == 2
    assert problems[0].startswith("causal: ") and "upper-left" in problems[0]
    assert problems[1].startswith("nonpad: ") and "nonpad_kv_seqlen" in problems[1]
