"""What TensorRT's ONNX parser accepts, restricted to what a Llama rank graph can contain.

Source: onnx/onnx-tensorrt ``docs/operators.md``, the revision headed "TensorRT 10.15 supports
operators in the inclusive range of opset 9 to opset 24" (its changelog: "TensorRT 10.15 GA
Release - 2026-2-2 -- Added support for RotaryEmbedding, RMSNormalization and TensorScatter").
The reference index served that revision without a commit hash; the newest git snapshot of the
repository reachable here (branch 10.1-GA, commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c)
predates those ops, so re-check this table against docs/operators.md when bumping TensorRT.
``DistCollective`` is absent from that table: it comes from TensorRT >= 10.16's parser
(docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/DistCollective.html).

Only the ops a Llama graph plausibly uses are listed, with the supported-type column cut down
to the element types this project emits. An op that is missing here is not necessarily
unsupported by TensorRT -- it is unexpected in our graphs, which deserves a look either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

# Opset window: the opset-23/24 LLM ops (Attention, RMSNormalization, RotaryEmbedding,
# TensorScatter) are what the exporter targets; TensorRT 10.15 parses up to opset 24.
MIN_OPSET = 23
MAX_OPSET = 24

_T = TensorProto
# Element types this project may put in a rank graph (activations, FP8 weights, ids, masks).
ALLOWED_DTYPES: frozenset[int] = frozenset(
    {_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.FLOAT8E4M3FN, _T.INT64, _T.INT32, _T.BOOL}
)

_FLOATS = frozenset({_T.FLOAT, _T.FLOAT16, _T.BFLOAT16})
_NUMERIC = _FLOATS | {_T.INT32, _T.INT64}
_ANY = _NUMERIC | {_T.BOOL}


@dataclass(frozen=True)
class OpSupport:
    """One row of the support matrix.

    ``dtypes`` constrains the element type of input ``checked_input`` (the data input the
    table's "Supported Types" column refers to); ``None`` skips the per-op check (the op's
    types are covered elsewhere, e.g. Constant's value tensor).
    """

    dtypes: frozenset[int]
    checked_input: int | None = 0
    restriction: str = ""


SUPPORTED_OPS: dict[str, OpSupport] = {
    "Abs": OpSupport(_NUMERIC),
    "Add": OpSupport(_NUMERIC),
    "And": OpSupport(frozenset({_T.BOOL})),
    "ArgMax": OpSupport(_NUMERIC),
    "Attention": OpSupport(
        _FLOATS | {_T.FLOAT8E4M3FN},
        restriction="Q/K/V and attn_mask 4D; past_key, past_value, nonpad_kv_seqlen inputs and "
        "present_key, present_value, qk_matmul_output outputs unsupported; softcap unsupported",
    ),
    "Cast": OpSupport(_ANY),
    "CastLike": OpSupport(_ANY),
    "Clip": OpSupport(_FLOATS),
    "Concat": OpSupport(_ANY),
    "Constant": OpSupport(_ANY | {_T.FLOAT8E4M3FN}, checked_input=None),
    "ConstantOfShape": OpSupport(_ANY | {_T.FLOAT8E4M3FN}, checked_input=None),
    "Cos": OpSupport(_FLOATS),
    "DequantizeLinear": OpSupport(frozenset({_T.FLOAT8E4M3FN}), restriction="x_zero_point zero"),
    "Div": OpSupport(_NUMERIC),
    "Equal": OpSupport(_NUMERIC),
    "Exp": OpSupport(_FLOATS),
    "Expand": OpSupport(_ANY),
    "Gather": OpSupport(_ANY),
    "GatherElements": OpSupport(_ANY),
    "GatherND": OpSupport(_ANY),
    "Gemm": OpSupport(_FLOATS),
    "Greater": OpSupport(_NUMERIC),
    "GreaterOrEqual": OpSupport(_NUMERIC),
    "Identity": OpSupport(_ANY),
    "Less": OpSupport(_NUMERIC),
    "LessOrEqual": OpSupport(_NUMERIC),
    "MatMul": OpSupport(_FLOATS),
    "Max": OpSupport(_NUMERIC),
    "Min": OpSupport(_NUMERIC),
    "Mul": OpSupport(_NUMERIC),
    "Neg": OpSupport(_NUMERIC),
    "Not": OpSupport(frozenset({_T.BOOL})),
    "Or": OpSupport(frozenset({_T.BOOL})),
    "Pow": OpSupport(_NUMERIC),
    "QuantizeLinear": OpSupport(_FLOATS, restriction="y_zero_point zero"),
    "Range": OpSupport(_NUMERIC),
    "Reciprocal": OpSupport(_FLOATS),
    "ReduceMax": OpSupport(_NUMERIC, restriction="axes must be an initializer"),
    "ReduceMean": OpSupport(_NUMERIC, restriction="axes must be an initializer"),
    "ReduceSum": OpSupport(_NUMERIC, restriction="axes must be an initializer"),
    "Reshape": OpSupport(_ANY),
    "RMSNormalization": OpSupport(_FLOATS),
    "RotaryEmbedding": OpSupport(_FLOATS, restriction="position_ids INT64"),
    "ScatterElements": OpSupport(_NUMERIC),
    "ScatterND": OpSupport(_NUMERIC, restriction="reduction 'none' only"),
    "Shape": OpSupport(_ANY),
    "Sigmoid": OpSupport(_FLOATS),
    "Sin": OpSupport(_FLOATS),
    "Slice": OpSupport(_ANY),
    "Softmax": OpSupport(_FLOATS),
    "Split": OpSupport(_ANY),
    "Sqrt": OpSupport(_FLOATS),
    "Squeeze": OpSupport(_ANY),
    "Sub": OpSupport(_NUMERIC),
    "Tanh": OpSupport(_FLOATS),
    "TensorScatter": OpSupport(
        frozenset({_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.INT32}),
        restriction="past_cache and update 4D, axis -2",
    ),
    "Tile": OpSupport(_ANY),
    "TopK": OpSupport(_NUMERIC, restriction="sorted=1, K < 3840"),
    "Transpose": OpSupport(_ANY),
    "Trilu": OpSupport(_ANY),
    "Unsqueeze": OpSupport(_ANY),
    # Where's data inputs are 1 and 2; input 0 is the BOOL condition.
    "Where": OpSupport(_ANY, checked_input=1),
    # TensorRT >= 10.16; we only ever reduce activations.
    "DistCollective": OpSupport(_FLOATS, restriction="needs TensorRT >= 10.16 and an NCCL communicator"),
}

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _dtype_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"<unknown dtype {elem_type}>"


class _Checker:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.problems: list[str] = []
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self._walked_functions: set[tuple[str, str]] = set()

    def run(self) -> list[str]:
        self._check_opset()
        self._check_graph(self.model.graph, "graph", {})
        return self.problems

    def _check_opset(self) -> None:
        versions = [o.version for o in self.model.opset_import if o.domain in _DEFAULT_DOMAINS]
        if not versions:
            self.problems.append(
                f"model has no default-domain opset import; TensorRT needs opset {MIN_OPSET}..{MAX_OPSET}"
            )
            return
        version = max(versions)
        if version < MIN_OPSET:
            self.problems.append(
                f"default-domain opset {version} is below {MIN_OPSET} (Attention, RMSNormalization, "
                "RotaryEmbedding need opset 23); re-export with opset_version>=23"
            )
        elif version > MAX_OPSET:
            self.problems.append(
                f"default-domain opset {version} is above {MAX_OPSET}, the newest TensorRT's parser reads"
            )

    # -- types ---------------------------------------------------------------------------
    def _check_dtype(self, elem_type: int, what: str) -> None:
        if elem_type not in ALLOWED_DTYPES:
            self.problems.append(f"{what} has dtype {_dtype_name(elem_type)}, not one TensorRT builds here")

    def _check_value_info(self, value: onnx.ValueInfoProto, what: str, types: dict[str, int]) -> None:
        kind = value.type.WhichOneof("value")
        if kind is None:
            return  # type not recorded (e.g. a function-body value); nothing to check
        if kind != "tensor_type":
            self.problems.append(f"{what} {value.name!r} is a {kind}, TensorRT takes tensors only")
            return
        elem_type = value.type.tensor_type.elem_type
        types[value.name] = elem_type
        self._check_dtype(elem_type, f"{what} {value.name!r}")

    # -- graphs --------------------------------------------------------------------------
    def _check_graph(self, graph: onnx.GraphProto, where: str, outer_types: dict[str, int]) -> None:
        types = dict(outer_types)  # subgraphs see the enclosing scope's values
        for init in graph.initializer:
            types[init.name] = init.data_type
            self._check_dtype(init.data_type, f"{where}: initializer {init.name!r}")
        for sparse in graph.sparse_initializer:
            self.problems.append(
                f"{where}: sparse initializer {sparse.values.name!r}; TensorRT needs dense weights"
            )
        for label, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
            for value in values:
                self._check_value_info(value, f"{where}: {label}", types)
        for index, node in enumerate(graph.node):
            self._check_node(node, f"{where}: node {node.name or index!r} ({node.op_type})", types)

    def _check_node(self, node: onnx.NodeProto, where: str, types: dict[str, int]) -> None:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                self._check_graph(attribute.g, f"{where}.{attribute.name}", types)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for i, sub in enumerate(attribute.graphs):
                    self._check_graph(sub, f"{where}.{attribute.name}[{i}]", types)
            elif attribute.type == onnx.AttributeProto.TENSOR:
                self._check_dtype(attribute.t.data_type, f"{where} attribute {attribute.name!r}")
        if node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to":
                    self._check_dtype(attribute.i, f"{where} cast target")

        key = (node.domain, node.op_type)
        if key in self.functions:
            # TensorRT's parser inlines model-local functions: judge the body instead.
            if key not in self._walked_functions:
                self._walked_functions.add(key)
                function = self.functions[key]
                for index, inner in enumerate(function.node):
                    self._check_node(inner, f"function {function.name}: node {inner.name or index!r} "
                                     f"({inner.op_type})", {})
            return
        if node.domain not in _DEFAULT_DOMAINS:
            hint = " (run export.collectives.rewrite_collectives)" if node.domain == "llama405" else ""
            self.problems.append(f"{where}: op {node.domain}.{node.op_type} is not a TensorRT ONNX op{hint}")
            return
        support = SUPPORTED_OPS.get(node.op_type)
        if support is None:
            self.problems.append(f"{where}: op {node.op_type} is not in the TensorRT allowlist")
            return
        if support.checked_input is not None and len(node.input) > support.checked_input:
            name = node.input[support.checked_input]
            if name and name in types and types[name] not in support.dtypes:
                self.problems.append(
                    f"{where}: input {name!r} has dtype {_dtype_name(types[name])}; TensorRT's "
                    f"{node.op_type} takes {', '.join(sorted(_dtype_name(t) for t in support.dtypes))}"
                )
        self._check_restrictions(node, where)

    def _check_restrictions(self, node: onnx.NodeProto, where: str) -> None:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Attention":
            if any(node.input[i] for i in range(4, len(node.input))):
                self.problems.append(
                    f"{where}: Attention with past_key/past_value/nonpad_kv_seqlen inputs; TensorRT "
                    "supports Q, K, V, attn_mask only (update the cache with TensorScatter/Concat)"
                )
            if any(node.output[i] for i in range(1, len(node.output))):
                self.problems.append(
                    f"{where}: Attention with present_key/present_value/qk_matmul_output outputs; "
                    "TensorRT supports only the first output"
                )
            if "softcap" in attrs and attrs["softcap"].f != 0.0:
                self.problems.append(f"{where}: Attention softcap is unsupported by TensorRT")
        elif node.op_type == "TensorScatter":
            axis = attrs["axis"].i if "axis" in attrs else -2
            if axis != -2:
                self.problems.append(f"{where}: TensorScatter axis={axis}; TensorRT requires axis -2")
        elif node.op_type == "ScatterND":
            reduction = attrs["reduction"].s.decode() if "reduction" in attrs else "none"
            if reduction != "none":
                self.problems.append(f"{where}: ScatterND reduction={reduction!r}; TensorRT supports 'none'")


def trt_compatibility_problems(model: onnx.ModelProto) -> list[str]:
    """Reasons TensorRT's ONNX parser would reject ``model``; empty when none are known.

    Checks the default-domain opset (23..24), every node's op against the allowlist (main graph,
    control-flow subgraphs, model-local functions), element types of initializers, graph
    inputs/outputs, value_info, tensor attributes and Cast targets, the table's dtype column
    for each op's data input where the type is known, and the restrictions that bite LLM graphs
    (Attention with KV inputs/outputs, TensorScatter axis, ScatterND reduction). Works on a
    graph loaded with ``load_external_data=False``: only metadata is read.
    """
    return _Checker(model).run()
