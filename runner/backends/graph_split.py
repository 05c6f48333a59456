"""Cut a rank graph at its DistCollective nodes so onnxruntime can run it (docs/design-notes.md, Runtime).

onnxruntime has no DistCollective kernel, so the ORT backend runs the *same* rank file that
TensorRT builds as a chain of segments and performs each all-reduce itself:

    env = dict(feeds)
    for segment, session in zip(segments, sessions):
        env.update(zip(segment.outputs, session.run(segment.outputs, {n: env[n] for n in segment.inputs})))
        if segment.collective_input is not None:            # sum over ranks (or in-process)
            env[segment.collective_output] = reduce(env[segment.collective_input])
    results = {name: env[name] for name in graph_output_names}

Segment k holds the nodes that run after collective k-1 and before collective k. A node is
placed as late as its consumers allow (but never before its inputs exist), so a tensor such as a
transposed weight or a cast KV slice is computed in the segment that uses it instead of being
carried through every segment; a tensor whose only consumer is a graph output stays where its
inputs are. Whatever a segment produces that a later segment (or a later collective) reads is
one of its outputs -- residual streams, rotary tables and masks built once from the position
inputs, KV presents -- so nothing about the Llama graph is hard-coded here.

Segments keep the rank file's initializer entries as they are, external-data references to
``model.onnx.data`` included, so building a session reads the weights straight from the rank
directory; no weight bytes are copied on disk and nothing is written next to the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence

import onnx
import onnx.shape_inference
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from export.collectives import (
    DIST_COLLECTIVE,
    PLACEHOLDER_DOMAIN,
    PLACEHOLDER_OP,
    register_dist_collective_schema,
)
from export.errors import ArtifactError, InputError

_DEFAULT_DOMAINS = ("", "ai.onnx")

# onnxruntime (checked on 1.32) resolves external data of a model given as bytes against this
# folder. It refuses symlinks that leave the model's directory and, for bytes without this
# entry, paths outside the working directory -- so the session config is the way in.
EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
DISABLE_QDQ_TRANSFORMERS_KEY = "session.disable_quant_qdq"


@dataclass
class Segment:
    """One piece of a rank graph between two all-reduces.

    ``inputs`` are graph inputs and/or tensors earlier segments or collectives produced;
    ``outputs`` are what later segments or collectives read plus the graph outputs made here.
    ``collective_input`` is the tensor to all-reduce after this segment runs (it may have been
    produced by an earlier segment) and ``collective_output`` the name the reduced tensor takes;
    both are ``None`` for a final segment that no collective follows.
    """

    index: int
    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    collective_input: str | None = None
    collective_output: str | None = None
    collective_node: str | None = None
    graph_outputs: list[str] = field(default_factory=list)
    # The rank file itself when this segment is the whole graph (a rank without collectives):
    # onnxruntime then loads it by path, which decodes ~3% faster on CPU than the same graph
    # handed over as bytes (measured on a 125M fp32 model, 2 threads, docs/genai.md).
    source: Path | None = None


@dataclass
class _Plan:
    """What goes into one segment, before it becomes a ModelProto."""

    index: int
    members: list[int]
    inputs: list[str] = field(default_factory=list)
    initializers: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    collective: tuple[str | None, str | None, str | None] = (None, None, None)


def _is_collective(node: onnx.NodeProto) -> bool:
    if node.domain in _DEFAULT_DOMAINS and node.op_type == DIST_COLLECTIVE:
        return True
    # An un-rewritten export still splits: the placeholder means the same all-reduce(sum).
    return node.domain == PLACEHOLDER_DOMAIN and node.op_type == PLACEHOLDER_OP


def _check_all_reduce_sum(node: onnx.NodeProto, path: Path) -> None:
    attrs = {a.name: a for a in node.attribute}
    operation = attrs["collective_operation"].s.decode().lower() if "collective_operation" in attrs else "all_reduce"
    reduce_op = attrs["reduce_op"].s.decode().lower() if "reduce_op" in attrs else "sum"
    if operation != "all_reduce" or reduce_op != "sum":
        raise ArtifactError(
            f"{path}: collective {node.name!r} is {operation}/{reduce_op}; the onnxruntime backend "
            "performs all_reduce/sum only -- re-export the artifact with llama405"
        )
    if len(node.input) != 1 or len(node.output) != 1:
        raise ArtifactError(f"{path}: collective {node.name!r} must have one input and one output")


def _subgraph_free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scope."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(_node_reads(node))
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined - {""}


def _node_reads(node: onnx.NodeProto) -> set[str]:
    reads = {name for name in node.input if name}
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            reads |= _subgraph_free_names(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for sub in attribute.graphs:
                reads |= _subgraph_free_names(sub)
    return reads


def _contains_collective(node: onnx.NodeProto) -> bool:
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for sub in graphs:
            if any(_is_collective(n) or _contains_collective(n) for n in sub.node):
                return True
    return False


class _Splitter:
    def __init__(self, model: onnx.ModelProto, path: Path) -> None:
        self.model = model
        self.path = path
        graph = model.graph
        self.nodes = list(graph.node)
        self.graph_inputs = [i.name for i in graph.input]
        self.graph_outputs = [o.name for o in graph.output]
        self.initializers = {i.name: i for i in graph.initializer}
        self.producer: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
        self.reads = [_node_reads(node) for node in self.nodes]
        self.collectives = [i for i, node in enumerate(self.nodes) if _is_collective(node)]
        self.collective_rank = {node_index: k for k, node_index in enumerate(self.collectives)}

    # -- placement -----------------------------------------------------------------------
    def _earliest(self) -> list[int]:
        """ASAP segment per node: after every collective it (transitively) depends on."""
        earliest = [0] * len(self.nodes)
        for index, node in enumerate(self.nodes):
            level = 0
            for name in self.reads[index]:
                producer = self.producer.get(name)
                if producer is None:
                    continue  # graph input, initializer, or missing (caught below)
                if producer > index:
                    raise ArtifactError(
                        f"{self.path}: nodes are not topologically sorted ({name!r} is read by "
                        f"node {node.name!r} before it is produced) -- re-export the rank"
                    )
                produced_at = earliest[producer]
                if producer in self.collective_rank:
                    produced_at = self.collective_rank[producer] + 1
                level = max(level, produced_at)
            earliest[index] = level
        for node_index, k in self.collective_rank.items():
            if earliest[node_index] > k:  # cannot happen for a topologically sorted graph
                raise ArtifactError(f"{self.path}: collective {self.nodes[node_index].name!r} is out of order")
        return earliest

    def _placement(self) -> list[int]:
        """Latest segment each node can run in without delaying a consumer."""
        earliest = self._earliest()
        consumers: dict[str, list[int]] = {}
        for index, reads in enumerate(self.reads):
            for name in reads:
                consumers.setdefault(name, []).append(index)
        segment = [0] * len(self.nodes)
        for index in reversed(range(len(self.nodes))):
            if index in self.collective_rank:
                segment[index] = self.collective_rank[index]  # runs right after segment k
                continue
            latest = None
            for name in self.nodes[index].output:
                for consumer in consumers.get(name, ()):
                    latest = segment[consumer] if latest is None else min(latest, segment[consumer])
            # Only graph outputs (or nothing) read it: keep it beside its inputs.
            segment[index] = earliest[index] if latest is None else max(earliest[index], latest)
        return segment

    # -- typing --------------------------------------------------------------------------
    def _value_infos(self, needed: Iterable[str]) -> dict[str, onnx.ValueInfoProto]:
        graph = self.model.graph
        known = {v.name: v for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
        missing = [n for n in needed if n not in known and n not in self.initializers]
        if missing:
            # Boundary tensors need at least an element type; infer what the exporter did not
            # record (metadata only: external data is not loaded).
            register_dist_collective_schema()
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
                raise ArtifactError(f"{self.path}: shape inference failed ({error}); re-export the rank") from error
            known.update({v.name: v for v in inferred.graph.value_info})
            still = [n for n in missing if n not in known]
            if still:
                raise ArtifactError(
                    f"{self.path}: no type known for {still[:5]} needed at a segment boundary; re-export the rank"
                )
        return known

    # -- assembly ------------------------------------------------------------------------
    def _validate(self) -> None:
        for node in self.nodes:
            if _contains_collective(node):
                raise ArtifactError(
                    f"{self.path}: node {node.name!r} holds a DistCollective inside a subgraph; "
                    "the onnxruntime backend can only split the top-level graph"
                )
        for node_index in self.collectives:
            _check_all_reduce_sum(self.nodes[node_index], self.path)
        available = set(self.graph_inputs) | set(self.initializers) | set(self.producer)
        for index, reads in enumerate(self.reads):
            unknown = sorted(reads - available)
            if unknown:
                raise ArtifactError(
                    f"{self.path}: node {self.nodes[index].name!r} reads undefined tensors {unknown[:5]}"
                    " (a weight without an initializer entry?) -- re-export the rank"
                )

    def split(self) -> list[Segment]:
        self._validate()
        placement = self._placement()
        count = len(self.collectives) + 1
        members: list[list[int]] = [[] for _ in range(count)]
        # Constants are copied into every segment that reads them rather than passed between
        # segments: some (the FP8 zero point) have element types numpy cannot carry.
        constants = {node.output[0]: i for i, node in enumerate(self.nodes)
                     if node.op_type == "Constant" and not node.input and len(node.output) == 1
                     and node.output[0] not in set(self.graph_outputs)}
        constant_nodes = set(constants.values())
        for index, seg in enumerate(placement):
            if index not in self.collective_rank and index not in constant_nodes:
                members[seg].append(index)
        for k in range(count):
            needed = sorted({constants[name] for i in members[k] for name in self.reads[i] if name in constants})
            members[k] = needed + members[k]

        # The last segment that reads each runtime tensor. Collective k reads its input at the
        # end of segment k; graph outputs are collected by the caller, so they always leave.
        last_reader: dict[str, int] = {}
        for index, reads in enumerate(self.reads):
            for name in reads:
                if name not in self.initializers and name not in constants:
                    last_reader[name] = max(last_reader.get(name, -1), placement[index])
        graph_outputs = set(self.graph_outputs)

        plans: list[_Plan] = []
        for k in range(count):
            produced = [o for i in members[k] for o in self.nodes[i].output if o]
            produced_set = set(produced)
            plan = _Plan(index=k, members=members[k])
            seen: set[str] = set()
            for i in members[k]:
                for name in _ordered_reads(self.nodes[i], self.reads[i]):
                    if name in produced_set or name in seen:
                        continue
                    seen.add(name)
                    (plan.initializers if name in self.initializers else plan.inputs).append(name)
            if k < len(self.collectives):
                node = self.nodes[self.collectives[k]]
                plan.collective = (node.input[0], node.output[0], node.name)
            plan.outputs = [
                name for name in produced
                if last_reader.get(name, -1) > k or name in graph_outputs or name == plan.collective[0]
            ]
            plans.append(plan)

        # A trailing segment with nothing to compute (the last collective's output is a graph
        # output, e.g. logits right after the lm_head all-reduce) is dropped.
        if count > 1 and not plans[-1].members:
            plans.pop()
        for plan in plans:
            if not plan.members:
                raise ArtifactError(
                    f"{self.path}: nothing to compute before collective {plan.collective[2]!r} (two "
                    "all-reduces back to back, or one over a graph input) -- re-export the rank"
                )
        infos = self._value_infos(sorted({n for p in plans for n in p.inputs + p.outputs}))
        return [self._segment(infos, plan) for plan in plans]

    def _segment(self, infos: dict[str, onnx.ValueInfoProto], plan: _Plan) -> Segment:
        graph = self.model.graph
        nodes = [self.nodes[i] for i in plan.members]
        internal = {o for n in nodes for o in n.output} - set(plan.outputs)
        segment_graph = onnx.helper.make_graph(
            nodes,
            f"{graph.name or 'rank'}_segment{plan.index}",
            [_typed(infos, name) for name in plan.inputs],
            [_typed(infos, name) for name in plan.outputs],
            # Metadata-only copies: external_data entries keep pointing at model.onnx.data.
            initializer=[self.initializers[name] for name in plan.initializers],
            value_info=[v for v in graph.value_info if v.name in internal],
        )
        segment_model = onnx.helper.make_model(
            segment_graph,
            opset_imports=[o for o in self.model.opset_import if o.domain != PLACEHOLDER_DOMAIN],
            ir_version=self.model.ir_version,
            functions=list(self.model.functions),
        )
        collective_input, collective_output, collective_node = plan.collective
        return Segment(
            index=plan.index,
            model=segment_model,
            inputs=list(plan.inputs),
            outputs=list(plan.outputs),
            collective_input=collective_input,
            collective_output=collective_output,
            collective_node=collective_node,
            graph_outputs=[name for name in plan.outputs if name in set(self.graph_outputs)],
        )


def _ordered_reads(node: onnx.NodeProto, reads: set[str]) -> list[str]:
    # Direct inputs in order, then subgraph free variables sorted: deterministic segment IO.
    direct = [name for name in node.input if name]
    return direct + sorted(reads - set(direct))


def _typed(infos: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto()
    value.CopyFrom(infos[name])
    return value


def split_at_collectives(model_path: Path) -> list[Segment]:
    """Split the rank graph at ``model_path`` into segments separated by its all-reduces.

    The graph is read without its external data. Raises :class:`ArtifactError` when the file is
    missing or unreadable, holds a collective other than all-reduce(sum), or cannot be cut
    (collectives inside control flow, undefined tensors, unsorted nodes).
    """
    path = Path(model_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError as error:
        raise ArtifactError(f"{path}: rank graph not found; re-export the artifact") from error
    except (OSError, DecodeError) as error:
        raise ArtifactError(f"{path}: cannot read the rank graph ({error}); re-export the artifact") from error
    segments = _Splitter(model, path).split()
    if len(segments) == 1:
        whole = segments[0]
        whole.source = path
        whole.inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        whole.outputs = [o.name for o in model.graph.output]
    return segments


def make_session(
    segment: Segment,
    rank_dir: Path,
    providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
    session_options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for ``segment`` whose weights come from ``rank_dir``.

    The segment's initializers keep their ``location: model.onnx.data`` entries; the session is
    told to resolve them against ``rank_dir`` (``EXTERNAL_DATA_FOLDER_KEY``), so onnxruntime
    reads only this segment's slices from the rank's own data file. Nothing is written to disk.
    """
    options = session_options or ort.SessionOptions()
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER_KEY, str(Path(rank_dir).resolve()))
    # FP8 weights: with its QDQ transformers on, onnxruntime keeps every weight's
    # DequantizeLinear in the graph (no kernel fuses FP8 Q/DQ into a GEMM) and dequantizes all
    # weights on every step (SmolLM2 FP8 decode on 2 cores: 0.22 tokens/s vs 2.56 folded). Off,
    # constant folding runs each weight's DequantizeLinear once, with the same kernel, at load:
    # the same logits bit for bit (tests/export/test_fp8.py). Activation Q/DQ pairs have a
    # runtime input and stay as they are.
    options.add_session_config_entry(DISABLE_QDQ_TRANSFORMERS_KEY, "1")
    model = str(segment.source) if segment.source is not None else segment.model.SerializeToString()
    try:
        return ort.InferenceSession(model, options, providers=list(providers))
    except ort_errors.NotImplemented as error:
        raise InputError(
            f"{rank_dir}: onnxruntime ({', '.join(map(str, providers))}) has no kernel for an op or dtype "
            f"in segment {segment.index} ({error}); the CPU build cannot run bfloat16 MatMul or Q/DQ -- "
            "use a float16/float32 artifact or a GPU provider"
        ) from error
    except (ort_errors.Fail, ort_errors.NoSuchFile, ort_errors.InvalidGraph,
            ort_errors.InvalidArgument, ort_errors.InvalidProtobuf) as error:
        raise ArtifactError(
            f"{rank_dir}: onnxruntime cannot load segment {segment.index} ({error}); "
            "check that model.onnx.data is complete (llama405 verifies the manifest) or re-export"
        ) from error
