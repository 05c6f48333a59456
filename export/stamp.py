"""Trace one decoder layer, stamp it once per layer: export time flat in the layer count.

torch.export + torch.onnx spend seconds per decoder layer; 126 layers of 405B would take many
minutes per rank. Every layer of a stage is the same computation over different weights and
cache tensors, so the exporter traces the rank module with a single layer and copies that
layer's nodes for each layer of the stage, renaming:

  weights      model.layers.{t}.*       -> model.layers.{i}.*
  cache IO     past_key_values.{t}.*    -> past_key_values.{i}.*,  present.{t}.* -> present.{i}.*
  residual     the layer's input stream -> the previous layer's output stream
  everything else the layer computes gets a per-layer name; values it reads from outside
  (rotary cos/sin, the attention mask, the static cache's write slots) stay shared.

The PyTorch module stays the single source of the graph: nothing here creates an op, it only
repeats what the exporter emitted. tests/export/test_export_artifact.py
(test_stamped_rank_graph_computes_exactly_what_a_full_trace_computes) checks a stamped graph
computes exactly what a full multi-layer trace computes.
"""

from __future__ import annotations

import ast
import dataclasses

import onnx

from export.errors import InternalError
from export.kv_cache import PAST, PRESENT

NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            return ast.literal_eval(prop.value)
    return []


def _layer_of(node: onnx.NodeProto) -> str | None:
    """'model.layers.7' for nodes the exporter emitted inside DecoderLayer 7."""
    for scope in _scopes(node):
        if scope.startswith("model.layers."):
            parts = scope.split(".")
            return ".".join(parts[:3])
    return None


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces: they name local file paths (so two checkouts
    would export different bytes) and are a large share of the graph file."""
    for node in model.graph.node:
        del node.metadata_props[:]
    del model.metadata_props[:]


@dataclasses.dataclass
class _Template:
    """One traced decoder layer: its nodes and the names it reads and writes."""

    nodes: list[onnx.NodeProto]
    produced: dict[str, None]  # in node order: output bytes must not depend on PYTHONHASHSEED
    h_in: str
    h_out: str
    constants: list[onnx.NodeProto]  # shared Constant nodes outside the layer that it reads


def _layer_template(model: onnx.ModelProto, scope: str) -> tuple[_Template, list[bool]]:
    graph = model.graph
    # One list of node objects, used throughout: protobuf may hand out a fresh wrapper on every
    # access to graph.node, so membership is tracked by position, never by id().
    all_nodes = list(graph.node)
    # Constants have no inputs and the exporter shares them across scopes: they stay shared.
    in_layer = [_layer_of(n) == scope and n.op_type != "Constant" for n in all_nodes]
    layer_nodes = [n for n, inside in zip(all_nodes, in_layer) if inside]
    if not layer_nodes:
        raise InternalError(f"traced graph has no nodes scoped {scope!r}; the exporter's name-scope "
                            "metadata changed")
    produced = dict.fromkeys(o for n in layer_nodes for o in n.output if o)
    external_in = []
    for node in layer_nodes:
        for name in node.input:
            if name and name not in produced and name not in external_in:
                external_in.append(name)
    graph_outputs = {o.name for o in graph.output}
    consumed_outside = {i for n, inside in zip(all_nodes, in_layer) if not inside for i in n.input}
    leaving = [v for v in produced if v in consumed_outside and v not in graph_outputs]
    if not leaving:  # a stage that is not the last: the stream leaves as the hidden_states output
        leaving = [v for v in produced if v in graph_outputs and not v.startswith(PRESENT)]
    if len(leaving) != 1:
        raise InternalError(f"expected one residual stream leaving {scope}, found {sorted(leaving)}")
    h_out = leaving[0]
    h_in = _residual_input(layer_nodes, h_out, set(external_in))
    read = set(external_in)
    constants = [n for n in all_nodes if n.op_type == "Constant" and any(o in read for o in n.output)]
    return _Template(layer_nodes, produced, h_in, h_out, constants), in_layer


def stamp_layers(model: onnx.ModelProto, template_layer: int, layer_ids: list[int],
                 other_patterns: dict[int, onnx.ModelProto] | None = None) -> onnx.ModelProto:
    """Expand a one-layer rank graph into one with `layer_ids` layers (in order).

    other_patterns: layer id -> a one-layer trace of the same stage whose template layer differs
    from `model`'s (e.g. left unquantized by an FP8 recipe); those layers are stamped from it.
    Everything outside the layer (embedding, norm, head, rotary tables, mask) comes from `model`.
    """
    graph = model.graph
    all_nodes = list(graph.node)
    scope = f"model.layers.{template_layer}"
    base, in_layer = _layer_template(model, scope)
    templates = {i: base for i in layer_ids}
    extra_constants: list[onnx.NodeProto] = []
    for k, alternative in enumerate(_distinct(other_patterns or {})):
        template, _ = _layer_template(alternative, scope)
        template = _rebase(template, f"pattern{k + 1}/", model)
        extra_constants += template.constants
        for layer, source in (other_patterns or {}).items():
            if source is alternative:
                templates[layer] = template
    graph_outputs = {o.name for o in graph.output}
    past_prefix, present_prefix = f"{PAST}{template_layer}.", f"{PRESENT}{template_layer}."
    weight_prefix = scope + "."

    after = _downstream(all_nodes, base.h_out)
    prologue = [n for k, n in enumerate(all_nodes) if not in_layer[k] and not after[k]]
    epilogue = [n for k, n in enumerate(all_nodes) if after[k]]

    # Shape lookups outside the layer (the mask reads the cache length) keep reading the first
    # stamped layer's cache input.
    first_past = f"{PAST}{layer_ids[0]}."
    nodes = []
    for node in prologue:
        if any(x.startswith(past_prefix) for x in node.input):
            node = _copy(node)
            node.input[:] = [first_past + x[len(past_prefix):] if x.startswith(past_prefix) else x
                             for x in node.input]
        nodes.append(node)
    nodes += extra_constants
    value_infos = {v.name: v for v in graph.value_info}
    new_value_infos = [v for v in graph.value_info if v.name not in base.produced]
    stream = base.h_in
    for i in layer_ids:
        t = templates[i]
        last = i == layer_ids[-1]

        def rename(name: str, i=i, t=t, stream=stream, last=last) -> str:
            if not name:
                return name
            if name == t.h_in:
                return stream
            if name == t.h_out and name in graph_outputs:
                return name if last else f"layers.{i}/{name}"
            if name.startswith(weight_prefix):
                return f"model.layers.{i}." + name[len(weight_prefix):]
            if name.startswith(past_prefix):
                return f"{PAST}{i}." + name[len(past_prefix):]
            if name.startswith(present_prefix):
                return f"{PRESENT}{i}." + name[len(present_prefix):]
            if name in t.produced:
                return f"layers.{i}/{name}"
            return name  # shared: rotary tables, mask, write slots
        for node in t.nodes:
            copy = _copy(node)
            copy.name = f"layers.{i}/{node.name}"
            copy.input[:] = [rename(x) for x in node.input]
            copy.output[:] = [rename(x) for x in node.output]
            nodes.append(copy)
        if t is base:
            for name in base.produced:
                if name in value_infos and name not in graph_outputs:
                    info = onnx.ValueInfoProto()
                    info.CopyFrom(value_infos[name])
                    info.name = rename(name)
                    new_value_infos.append(info)
        stream = rename(t.h_out)
    for node in epilogue:
        copy = _copy(node)
        copy.input[:] = [stream if x == base.h_out else x for x in node.input]
        nodes.append(copy)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    out.graph.value_info.extend(new_value_infos)
    _expand_io(out.graph.input, past_prefix, "past_key_values", layer_ids)
    _expand_io(out.graph.output, present_prefix, "present", layer_ids)
    return out


def _distinct(models: dict[int, onnx.ModelProto]) -> list[onnx.ModelProto]:
    seen: list[onnx.ModelProto] = []
    for model in models.values():
        if not any(model is m for m in seen):
            seen.append(model)
    return seen


def _rebase(template: _Template, prefix: str, base: onnx.ModelProto) -> _Template:
    """A template from another trace, made to fit `base`: its shared constants renamed with
    `prefix` (another trace may give a name to another value), and every other name it reads
    from outside the layer checked to exist in `base` (the rotary tables, the mask: the traces
    differ only inside the layer)."""
    renamed = {o: prefix + o for c in template.constants for o in c.output}
    known = {i.name for i in base.graph.input} | {o for n in base.graph.node for o in n.output}
    constants = []
    for node in template.constants:
        copy = _copy(node)
        copy.name = prefix + (node.name or node.output[0])
        copy.output[:] = [renamed[o] for o in node.output]
        constants.append(copy)
    nodes = []
    for node in template.nodes:
        copy = _copy(node)
        copy.input[:] = [renamed.get(x, x) for x in node.input]
        for name in copy.input:
            if name and name not in template.produced and name not in renamed.values() and name != template.h_in \
                    and not name.startswith(("model.layers.", PAST)) and name not in known:
                raise InternalError(f"a layer pattern's trace reads {name!r}, which the stage's graph does not "
                                    "define")
        nodes.append(copy)
    return _Template(nodes, template.produced, template.h_in, template.h_out, constants)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _residual_input(layer_nodes, h_out: str, external: set[str]) -> str:
    """The layer input that reaches h_out through residual Adds only."""
    producer = {o: n for n in layer_nodes for o in n.output}
    found, todo, seen = set(), [h_out], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in external:
            found.add(name)
            continue
        node = producer.get(name)
        if node is not None and node.op_type == "Add":
            todo.extend(node.input)
    if len(found) != 1:
        raise InternalError(f"could not identify the residual input of the template layer "
                            f"(candidates {sorted(found)})")
    return found.pop()


def _downstream(nodes: list[onnx.NodeProto], source: str) -> list[bool]:
    """Per node: does it depend (transitively) on `source`? (nodes are topologically sorted)"""
    reached, flags = {source}, []
    for node in nodes:
        flags.append(any(i in reached for i in node.input))
        if flags[-1]:
            reached.update(node.output)
    return flags


def _expand_io(values, template_prefix: str, family: str, layer_ids: list[int]) -> None:
    """Replace the template layer's cache inputs/outputs by one pair per stamped layer."""
    template = [v for v in values if v.name.startswith(template_prefix)]
    others = [v for v in values if not v.name.startswith(template_prefix)]
    expanded = []
    for i in layer_ids:
        for v in template:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(v)
            copy.name = f"{family}.{i}." + v.name[len(template_prefix):]
            expanded.append(copy)
    del values[:]
    values.extend(others + expanded)
