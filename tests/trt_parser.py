"""NVIDIA's ONNX parser (TensorRT-RTX, installed by `make setup`) as the tests' oracle of what
TensorRT makes of a graph: parse from a file or from bytes, and the parsed network's layer counts.

TensorRT-RTX is a hard requirement of the suite, never a skip: without it nothing would check
that the graphs we ship parse.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import tensorrt_rtx_bindings as trt

from engines.build import EngineBuildError, make_logger, parse_rank
from engines.inspect import kv_write_index_sources, layer_summary
from export.manifest import load_manifest


def parsed_layers(onnx_path: Path) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(layer-type counts, key layers' output dtypes); AssertionError with the parser's message."""
    try:
        _builder, network, _parser = parse_rank(trt, Path(onnx_path), make_logger(trt))
    except EngineBuildError as err:
        raise AssertionError(str(err)) from None
    return layer_summary(trt, network)


def write_index_sources(onnx_path: Path) -> list[str]:
    """The graph inputs whose values reach the KV_CACHE_UPDATE layers' write indices."""
    try:
        _builder, network, _parser = parse_rank(trt, Path(onnx_path), make_logger(trt))
    except EngineBuildError as err:
        raise AssertionError(str(err)) from None
    return kv_write_index_sources(trt, network)


def parsed_forms(model: onnx.ModelProto) -> dict[str, list[dict[str, object]]]:
    """What the parser makes of an in-memory model's KV-cache updates and attentions, as the
    layers' own attributes: {"errors": [...], "kv_cache_update": [{"update_form",
    "update_lengths"}], "attention": [{"query_form", "key_value_form", "query_lengths",
    "key_value_lengths", "mask", "causal_kind"}]} (forms as TensorRT names them, lengths and
    mask as whether they are set)."""
    _builder, network, _parser, errors = _parse_model(model)
    out: dict[str, list] = {"errors": errors, "kv_cache_update": [], "attention": []}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.KV_CACHE_UPDATE:
            layer.__class__ = trt.IKVCacheUpdateLayer  # the bindings hand out the base class
            out["kv_cache_update"].append({"update_form": layer.update_form.name,
                                           "update_lengths": layer.update_lengths is not None})
        elif layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer
            attention = layer.attention
            out["attention"].append({"query_form": attention.query_form.name,
                                     "key_value_form": attention.key_value_form.name,
                                     "query_lengths": attention.query_lengths is not None,
                                     "key_value_lengths": attention.key_value_lengths is not None,
                                     "mask": attention.mask is not None,
                                     "causal_kind": attention.causal_kind.name})
    return out


def _parse_model(model: onnx.ModelProto):
    """(builder, network, parser, errors) of an in-memory model; the network lives as long as
    its builder, so the caller holds all three."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parser.parse(model.SerializeToString())
    return builder, network, parser, [str(parser.get_error(i)) for i in range(parser.num_errors)]


def parsed_model_layers(model: onnx.ModelProto) -> dict[str, int]:
    """Layer-type counts of an in-memory model (weights inline)."""
    _builder, network, _parser, errors = _parse_model(model)
    assert not errors, errors
    return layer_summary(trt, network)[0]


def assert_artifact_parses(artifact: Path) -> dict[int, dict[str, int]]:
    """Every rank graph parses; returns {rank: layer counts}."""
    manifest = load_manifest(artifact, only=[])
    return {e.rank: parsed_layers(Path(artifact) / e.onnx_path)[0] for e in manifest.ranks}


def parse_errors(model: onnx.ModelProto) -> list[str]:
    """The parser's errors for an in-memory model ([] when it parses)."""
    return _parse_model(model)[3]
