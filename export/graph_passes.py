"""Graph-only clean-up of a traced rank graph, before stamping: no weight is ever touched.

torch.onnx with `optimize=False` (its optimizer cannot run on a meta-device graph) leaves the
shape and axes arithmetic as `Reshape(Constant, Constant)`, `Cast(Constant)` and the like.
TensorRT's ONNX parser needs some of those values at build time — a ReduceMean's axes must
"resolve to a build-time constant" or the graph is rejected — so the subgraphs whose inputs are
all constants are folded here, with onnxscript's constant folder (the one torch.onnx itself runs
when it can). The graph has no weight initializers yet (they are attached from the checkpoint
later), so only exporter-made constants can fold; the folder's size limits keep it that way.

The folder turns folded values into initializers; they are turned back into `Constant` nodes, so
every initializer of a rank graph stays a weight or a rank constant attached by the exporter
(the loaders check that set exactly) and the stamper treats them like the exporter's own
constants: shared between stamped layers (a folded value is the same in every layer). Node
name-scope metadata survives, so the stamper still finds the template layer's nodes.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedNodesPass

# The graph references weights that are not attached yet; onnx_ir warns about every one of them
# when it deserializes. That is expected here, so those messages are kept out of the CLI output.
_IR_LOGGERS = ("onnx_ir", "onnx_ir.serde", "onnxscript")
# Largest constant a fold may produce: shape/axes arithmetic is tiny, anything bigger is not ours
# to bake into the graph file.
FOLD_OUTPUT_LIMIT = 1 << 16


def fold_constant_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every all-constant subgraph folded and dead nodes removed."""
    levels = [(name, logging.getLogger(name).level) for name in _IR_LOGGERS]
    for name, _ in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        ir_model = ir.serde.deserialize_model(model)
        onnxscript.optimizer.fold_constants(ir_model, input_size_limit=FOLD_OUTPUT_LIMIT,
                                            output_size_limit=FOLD_OUTPUT_LIMIT)
        RemoveUnusedNodesPass()(ir_model)
        folded = ir.serde.serialize_model(ir_model)
    finally:
        for name, level in levels:
            logging.getLogger(name).setLevel(level)
    return _trim_unused_outputs(_initializers_as_constants(folded))


def _trim_unused_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop trailing optional outputs nothing reads (Attention's present/qk outputs): TensorRT
    accepts an Attention node only with its one output Y."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        outputs = list(node.output)
        while len(outputs) > 1 and outputs[-1] not in used:
            outputs.pop()
        if len(outputs) != len(node.output):
            del node.output[:]
            node.output.extend(outputs)
    return model


def _initializers_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    constants = [onnx.helper.make_node("Constant", [], [t.name], name=f"folded/{t.name}", value=t)
                 for t in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
