"""Tensor-parallel all-reduce in the exported graph (docs/design-notes.md, docs/engines.md).

Three pieces, used in this order by the exporter:

1. ``torch.ops.llama405.all_reduce`` -- a torch custom op the rank module calls at each
   all-reduce point *while being exported* (eager runs use a real reducer instead). Its eager
   body is a copy and its fake body an ``empty_like``, so ``torch.export`` sees one opaque node
   per collective, on real or meta tensors alike.
2. ``_all_reduce_onnx`` -- the onnxscript translation that turns that node into
   ``llama405.AllReduce``. It lives in a private domain because the exporter validates
   default-domain ops against ONNX's own schemas, and ``DistCollective`` is not one of them.
3. :func:`rewrite_collectives` -- the post-pass that renames every ``llama405.AllReduce`` to
   TensorRT's native ``DistCollective`` (default domain) with the attributes Polygraphy's
   multi-device tooling writes, so TensorRT >= 10.16 builds an ``IDistCollectiveLayer`` from it.

:func:`register_dist_collective_schema` teaches ``onnx.checker`` and ``onnx.shape_inference``
about ``DistCollective`` so the final rank graph can be fully checked.

Attribute names and types follow, in NVIDIA/TensorRT:
  * tools/Polygraphy/polygraphy/tools/multi_device/multi_device.py (commit 3bd1928b),
    class ``DistCollective``: ``all_reduce_attrs()`` = ``_common_attrs()`` (``group_size``,
    ``root``, ``nb_rank``; ints) + ``reduce_op="sum"``, ``collective_operation="all_reduce"``
    (strings); defaults ``group_size=0``, ``root=-1``, ``groups=[]``.
  * tools/Polygraphy/polygraphy/tools/multi_device/subtool/shard.py (commit 3bd1928b),
    ``Shard.fix_group_attribute``: ``groups`` is appended afterwards as an explicit
    ``AttributeProto.INTS`` because graphsurgeon cannot type an empty list.
and the TensorRT operator page for the parser's ``DistCollective``
(docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/DistCollective.html):
``group_size`` must be 0 when ``groups`` is empty, ``root`` is -1 for collectives without a
root, and ``nb_rank`` > 1 enables multi-device execution. (The onnx-tensorrt importer source for
DistCollective was not in the reference index; the mirrored onnx/onnx-tensorrt snapshot stops at
10.1-GA, which predates the op.)
"""

from __future__ import annotations


import onnx
import onnx.defs
import onnxscript
import torch
from onnx import helper

from export.custom_ops import define_op
from export.errors import InternalError, ShardingError

# Private placeholder domain; never present in a finished rank graph.
PLACEHOLDER_DOMAIN = "llama405"
_PLACEHOLDER_OPSET = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)
PLACEHOLDER_OP = "AllReduce"
DIST_COLLECTIVE = "DistCollective"

# Element types a collective may carry. The placeholder only ever sees activations (float
# types); DistCollective is broader because NCCL reduces integers and FP8 too and the schema
# must not reject a graph TensorRT would accept.
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_COLLECTIVE_TYPES = _FLOAT_TYPES + [
    "tensor(double)",
    "tensor(float8e4m3fn)",
    "tensor(int8)",
    "tensor(uint8)",
    "tensor(int32)",
    "tensor(int64)",
]


# --------------------------------------------------------------------------- torch custom op


def _all_reduce_eager(x: torch.Tensor) -> torch.Tensor:
    # A copy, not `x` itself: custom ops may not return an alias of an input.
    return x.clone()


def _all_reduce_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _all_reduce_onnx(x):
    """onnxscript translation of ``llama405::all_reduce`` -> ``llama405.AllReduce``."""
    return _PLACEHOLDER_OPSET.AllReduce(x)


# all_reduce(x): the export-time all-reduce(sum) marker: a copy in eager, one graph node when exported.
all_reduce = define_op("all_reduce", _all_reduce_eager, _all_reduce_fake, _all_reduce_onnx)


# --------------------------------------------------------------------------- ONNX schemas


def _same_type_as_input(ctx: onnx.shape_inference.InferenceContext) -> None:
    # all_reduce keeps shape and type; leave the output unset when the input type is unknown.
    if ctx.get_num_inputs() < 1 or not ctx.has_input(0):
        return
    input_type = ctx.get_input_type(0)
    if input_type is not None and input_type.WhichOneof("value") is not None:
        ctx.set_output_type(0, input_type)


def _dist_collective_infer(ctx: onnx.shape_inference.InferenceContext) -> None:
    """Output type = input type; for gathers/scatters the leading dimension changes."""
    if ctx.get_num_inputs() < 1 or not ctx.has_input(0):
        return
    input_type = ctx.get_input_type(0)
    if input_type is None or not input_type.HasField("tensor_type"):
        return
    out = onnx.TypeProto()
    out.CopyFrom(input_type)
    operation = _string_attribute(ctx.get_attribute("collective_operation"))
    nb_rank_attr = ctx.get_attribute("nb_rank")
    nb_rank = nb_rank_attr.i if nb_rank_attr is not None else 1
    dims = out.tensor_type.shape.dim if out.tensor_type.HasField("shape") else []
    if dims and operation in ("all_gather", "gather", "reduce_scatter", "scatter"):
        first = dims[0]
        grows = operation in ("all_gather", "gather")
        if first.HasField("dim_value") and nb_rank >= 1:
            value = first.dim_value * nb_rank if grows else first.dim_value // nb_rank
            first.Clear()
            first.dim_value = value
        else:
            first.Clear()  # symbolic leading dim scaled by nb_rank: unknown
    ctx.set_output_type(0, out)


def _string_attribute(attr: onnx.AttributeProto | None) -> str:
    return attr.s.decode().lower() if attr is not None else ""


def _schema_registered(op_type: str, domain: str) -> bool:
    return onnx.defs.has(op_type, domain)


def _register_placeholder_schema() -> None:
    # onnxscript resolves `Opset("llama405", 1).AllReduce` through the ONNX schema registry, so
    # the placeholder needs a schema of its own before the exporter can emit it.
    if _schema_registered(PLACEHOLDER_OP, PLACEHOLDER_DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        PLACEHOLDER_OP,
        PLACEHOLDER_DOMAIN,
        1,
        "Export-time placeholder for a tensor-parallel all-reduce(sum); "
        "rewritten to DistCollective by export.collectives.rewrite_collectives.",
        inputs=[param("input", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "activation types")],
    )
    schema.set_type_and_shape_inference_function(_same_type_as_input)
    onnx.defs.register_schema(schema)


def register_dist_collective_schema() -> None:
    """Register an ``OpSchema`` for default-domain ``DistCollective`` (idempotent).

    ``since_version=1`` makes the schema visible to every default-domain opset (the registry
    returns the newest version <= the model's opset), so opset 23/24 rank graphs pass
    ``onnx.checker.check_model(full_check=True)`` and shape inference propagates the input's
    type and shape through the collective. Every attribute is optional, as in TensorRT.
    """
    if _schema_registered(DIST_COLLECTIVE, ""):
        return
    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        DIST_COLLECTIVE,
        "",
        1,
        "TensorRT multi-device collective (IDistCollectiveLayer), executed with NCCL.",
        inputs=[param("input", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", _COLLECTIVE_TYPES, "types NCCL can move")],
        attributes=[
            attr("collective_operation", kind.STRING, "all_reduce, all_gather, ...", required=False),
            attr("reduce_op", kind.STRING, "sum, prod, max, min, avg or none", required=False),
            attr("root", kind.INT, "root rank, -1 for rootless collectives", required=False),
            attr("group_size", kind.INT, "len(groups); 0 = all ranks", required=False),
            attr("nb_rank", kind.INT, "number of participating ranks", required=False),
            attr("groups", kind.INTS, "participating ranks; empty = all", required=False),
        ],
    )
    schema.set_type_and_shape_inference_function(_dist_collective_infer)
    onnx.defs.register_schema(schema)


_register_placeholder_schema()


# --------------------------------------------------------------------------- export translation



# --------------------------------------------------------------------------- post-pass


def dist_collective_attributes(tp_size: int) -> list[onnx.AttributeProto]:
    """The all-reduce attributes exactly as Polygraphy writes them, in a fixed order."""
    return [
        helper.make_attribute("collective_operation", "all_reduce"),
        helper.make_attribute("reduce_op", "sum"),
        helper.make_attribute("root", -1),
        helper.make_attribute("group_size", 0),
        helper.make_attribute("nb_rank", tp_size),
        helper.make_attribute("groups", [], attr_type=onnx.AttributeProto.INTS),
    ]


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _rewrite_nodes(nodes, tp_size: int, counter: list[int]) -> None:
    for node in nodes:
        for graph in _subgraphs(node):
            _rewrite_nodes(graph.node, tp_size, counter)
        if node.domain != PLACEHOLDER_DOMAIN:
            continue
        if node.op_type != PLACEHOLDER_OP or len(node.input) != 1 or len(node.output) != 1:
            # The private domain holds only what the exporter's own trace put there: a bug.
            raise InternalError(
                f"unexpected node {node.op_type!r} ({len(node.input)} inputs, "
                f"{len(node.output)} outputs) in the private {PLACEHOLDER_DOMAIN!r} domain; "
                "only a one-input AllReduce placeholder can be rewritten"
            )
        node.domain = ""
        node.op_type = DIST_COLLECTIVE
        del node.attribute[:]
        node.attribute.extend(dist_collective_attributes(tp_size))
        if not node.name:
            node.name = f"{DIST_COLLECTIVE}_{counter[0]}"
        counter[0] += 1


def _drop_placeholder_opset(opset_imports) -> None:
    keep = [o for o in opset_imports if o.domain != PLACEHOLDER_DOMAIN]
    del opset_imports[:]
    opset_imports.extend(keep)


def rewrite_collectives(model: onnx.ModelProto, tp_size: int) -> int:
    """Turn every ``llama405.AllReduce`` into a default-domain ``DistCollective`` in place.

    Walks the main graph, control-flow subgraphs and model-local functions; drops the
    ``llama405`` opset import and any function defined in that domain. Returns the number of
    collectives written (the caller can assert 2 per layer + 2 for a full TP rank).
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ShardingError(f"tensor-parallel size must be a positive integer, got {tp_size!r}")
    register_dist_collective_schema()
    counter = [0]
    _rewrite_nodes(model.graph.node, tp_size, counter)
    keep_functions = [f for f in model.functions if f.domain != PLACEHOLDER_DOMAIN]
    for function in keep_functions:
        _rewrite_nodes(function.node, tp_size, counter)
        _drop_placeholder_opset(function.opset_import)
    del model.functions[:]
    model.functions.extend(keep_functions)
    _drop_placeholder_opset(model.opset_import)
    return counter[0]
