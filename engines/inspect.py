"""`llama405 inspect ART`: what TensorRT's ONNX parser makes of every rank graph.

Per rank: the parsed network's layer-type counts (KV_CACHE_UPDATE, DIST_COLLECTIVE,
QUANTIZE/DEQUANTIZE, MATRIX_MULTIPLY, ATTENTION_*, ROTARY_EMBEDDING, NORMALIZATION, CAST, ...),
the output dtypes of the layer types that matter for an LLM, and — where `llama405 build` has
made engines — their flavour, version, targets and sizes from the manifest. Parsing needs only
the parser: TensorRT-RTX when installed (no GPU needed), else TensorRT.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from engines.build import EngineBuildError, make_logger, parse_rank
from export.errors import MissingRequirement
from export.engines_record import engines_section
from export.manifest import MANIFEST, load_manifest
from export.trt_flavours import FLAVOURS

# Layer types whose output dtypes are reported: where precision and fusion show.
KEY_LAYERS = ("KV_CACHE_UPDATE", "DIST_COLLECTIVE", "QUANTIZE", "DEQUANTIZE", "MATRIX_MULTIPLY", "ATTENTION_INPUT",
              "ATTENTION_OUTPUT", "ROTARY_EMBEDDING", "NORMALIZATION", "CAST")


class NoParser(MissingRequirement):
    """Neither TensorRT-RTX nor TensorRT is importable (exit code 3, as every MissingRequirement)."""


def parser_module():
    """(flavour name, module) of the first importable flavour: rtx parses without a GPU."""
    for name in ("rtx", "tensorrt"):
        module = FLAVOURS[name].import_module()
        if module is not None:
            return name, module
    raise NoParser(f"inspect needs TensorRT's ONNX parser: {FLAVOURS['rtx'].pip}")


def layer_summary(trt, network) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """({layer type: count}, {key layer type: {output dtype: count}}) of a parsed network."""
    counts, dtypes = Counter(), defaultdict(Counter)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).rsplit(".", 1)[-1]
        counts[kind] += 1
        if kind in KEY_LAYERS and layer.num_outputs:
            dtypes[kind][str(layer.get_output(0).dtype).rsplit(".", 1)[-1]] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))), {k: dict(v) for k, v in sorted(dtypes.items())}


def kv_write_index_sources(trt, network) -> list[str]:
    """Network inputs whose values reach the write indices (input 2) of the KV_CACHE_UPDATE
    layers: ["attention_mask"] when each row's slot is computed from its own mask row; [] when
    the slots come from shapes alone (every row at the same slot). A SHAPE layer passes on a
    tensor's dimensions, not its values, so the walk stops there."""
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    stack = [layer.get_input(2).name for layer in (network.get_layer(i) for i in range(network.num_layers))
             if layer.type == trt.LayerType.KV_CACHE_UPDATE]
    sources, seen = set(), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        layer = producer.get(name)
        if name in inputs:
            sources.add(name)
        elif layer is not None and layer.type != trt.LayerType.SHAPE:
            stack += [t.name for t in (layer.get_input(k) for k in range(layer.num_inputs)) if t is not None]
    return sorted(sources)


def inspect_artifact(directory: str | Path, ranks: list[int] | None = None) -> dict[str, Any]:
    """{"parser": ..., "ranks": [{"rank", "layers", "dtypes", "kv_write_indices_from", "parse_s", "engine"}...],
    "engines": ...}."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    name, trt = parser_module()
    engines = engines_section(manifest, str(directory / MANIFEST))
    out = []
    for entry in manifest.ranks:
        if ranks is not None and entry.rank not in ranks:
            continue
        started = time.perf_counter()
        try:
            _builder, network, _parser = parse_rank(trt, directory / entry.onnx_path, make_logger(trt))
        except EngineBuildError as err:
            raise EngineBuildError(f"rank {entry.rank}: {err}") from None
        layers, dtypes = layer_summary(trt, network)
        out.append({"rank": entry.rank, "layers": layers, "dtypes": dtypes, "num_layers": sum(layers.values()),
                    "kv_write_indices_from": kv_write_index_sources(trt, network),
                    "parse_s": round(time.perf_counter() - started, 3),
                    "engine": engines.ranks[entry.rank].to_dict() if engines and entry.rank in engines.ranks else None})
    summary = {"artifact": str(directory), "parser": {"flavour": name, "version": trt.__version__},
               "tp": manifest.tp, "pp": manifest.pp, "dtype": manifest.dtype, "quant": manifest.quant,
               "kv_cache": manifest.kv_cache, "kv_cache_writes": manifest.cache_writes, "ranks": out}
    if engines:
        raw = engines.to_dict()
        summary["engines"] = {k: raw[k] for k in ("flavour", "version", "targets", "gpu", "flags") if k in raw}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    parser = summary["parser"]
    lines = [f"{summary['artifact']}: tp {summary['tp']} x pp {summary['pp']}, {summary['dtype']}, "
             f"quant {summary['quant']}, {summary['kv_cache']} KV cache ({summary['kv_cache_writes']} writes) — "
             f"parsed by {FLAVOURS[parser['flavour']].title} {parser['version']}"]
    for rank in summary["ranks"]:
        key = ", ".join(f"{k} {rank['layers'][k]}" for k in KEY_LAYERS if k in rank["layers"])
        lines.append(f"rank {rank['rank']}: {rank['num_layers']} layers; {key}")
        for kind, dtypes in rank["dtypes"].items():
            if kind in ("MATRIX_MULTIPLY", "QUANTIZE", "DEQUANTIZE", "KV_CACHE_UPDATE"):
                lines.append(f"  {kind} outputs: " + ", ".join(f"{d} {n}" for d, n in dtypes.items()))
        if rank["layers"].get("KV_CACHE_UPDATE"):
            sources = rank["kv_write_indices_from"]
            lines.append("  KV_CACHE_UPDATE write indices: " + (f"from the values of {', '.join(sources)} (a slot per row)"
                                                              if sources else "from shapes only (every row at one slot)"))
        engine = rank.get("engine")
        if engine:
            lines.append(f"  engine {engine['file']}: {engine['size'] / 2**20:.1f} MiB")
    engines = summary.get("engines")
    if engines:
        where = (f"targets {', '.join(engines['targets'])}" if engines.get("targets")
                 else f"GPU {engines.get('gpu')}")
        lines.append(f"engines: {FLAVOURS[engines['flavour']].title} {engines['version']}, {where}")
    else:
        lines.append("engines: none built (llama405 build --artifact ART --trt rtx|tensorrt)")
    return "\n".join(lines)
