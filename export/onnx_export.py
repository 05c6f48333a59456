"""Checkpoint -> artifact directory with one ONNX graph per rank.

Per rank: build the rank module on the meta device, `torch.export` it with meta inputs, convert
with torch.onnx (dynamo) and keep the graph with no initializers — its nodes name the HF
state-dict keys. Then every weight slice is read from the checkpoint in row blocks, cast
and appended to the rank's `model.onnx.data` (export/weight_stream.py), and an initializer
pointing at (offset, length) is added per tensor. A few blocks are in memory at a time, so peak
RSS does not grow with the model. One graph is traced per pipeline stage and copied for each of
its TP ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch.export import Dim
from tqdm import tqdm

from export import attention_op, cache_ops, collectives, fp8, rotary_op
from export.custom_ops import translation_table
from export.dtypes import dtype as dtype_named, dtype_of_onnx, dtype_of_torch
from export.calibrate import Calibration, calibrate
from export.fp8 import input_scale_from_amax
from export.rank_tensors import checkpoint_input_scales, rank_module_blocks
from export.smoothing import Smoothing, SmoothedCheckpoint, smooth_down_proj_inputs
from export.checkpoint import Checkpoint
from export.kv_cache import PARTS, KVCacheLayout, past_name, present_name
from export.options import ExportOptions
from export.checkpoint_quant import CheckpointQuantization
from export.config import LlamaConfig
from export.errors import ArtifactError, CheckpointError, InternalError, naming
from export.scales_record import FROM_CALIBRATION, FROM_CHECKPOINT, CalibrationRecord, ScalesRecord
from export.manifest import (CACHE_WRITES, DATA_FILE, ONNX_FILE, Manifest, RankEntry, TensorSpec, artifact_files,
                             config_digest, file_entry, is_finished_artifact, options_digest, rank_folder, rank_identity,
                             write_manifest)
from export.output_dir import (check_replaceable, exclusive_writer, marked_temporary_folder, move_into_place,
                               output_folder, remove_stale_siblings, remove_stale_temporaries, temporary_sibling)
from export.model import ModelOptions, build_rank_module, no_reduce, rank_constants
from export.rank_layout import (checkpoint_name, layer_linears, rank_layout, shares_tied_head, stored_tensor_names,
                                tensor_slice)
from export.sharding import RankSpec, all_ranks, kv_heads_local, stage_layers, validate_parallelism
from export.genai_config import NOT_SUPPORTED as GENAI_NOT_SUPPORTED
from export.genai_config import genai_supported, write_genai_config
from export.graph_passes import fold_constant_arithmetic
from export.stamp import stamp_layers, strip_metadata
from export.tokenizer import checkpoint_tokenizer
from export.weight_stream import ALIGN, BLOCK_BYTES, WrittenTensor, write_weights

OPSET = 24


# -- graph IO --------------------------------------------------------------------------------

def io_names(cfg: LlamaConfig, spec: RankSpec) -> tuple[list[str], list[str]]:
    layers = stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank)
    inputs = ["input_ids" if spec.is_first_stage else "hidden_states", "position_ids", "attention_mask"]
    inputs += [past_name(i, part) for i in layers for part in PARTS]
    outputs = ["logits" if spec.is_last_stage else "hidden_states"]
    outputs += [present_name(i, part) for i in layers for part in PARTS]
    return inputs, outputs


def _example_inputs(cfg: LlamaConfig, spec: RankSpec, options: ModelOptions, dtype: torch.dtype):
    """Meta tensors with distinct sizes > 1, so no dimension is specialised by accident."""
    batch, seq, past = 2, 3, 5
    meta = torch.device("meta")
    first = (torch.empty(batch, seq, dtype=torch.int64, device=meta) if spec.is_first_stage
             else torch.empty(batch, seq, cfg.hidden_size, dtype=dtype, device=meta))
    positions = torch.empty(batch, seq, dtype=torch.int64, device=meta)
    cache = options.cache_layout
    cache_len = past if cache.past_dim_name else cache.buffer_len(options.max_seq_len)
    attention_mask = torch.empty(batch, past + seq, dtype=torch.int64, device=meta)  # [batch, total]
    n_layers = len(stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank))
    kv = kv_heads_local(cfg, spec.tp_size)
    past_kv = tuple(torch.empty(batch, kv, cache_len, cfg.head_dim, dtype=dtype, device=meta)
                    for _ in range(2 * n_layers))
    auto = Dim.AUTO
    cache_dims = {0: auto, 2: auto} if cache.past_dim_name else {0: auto}
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple(cache_dims for _ in past_kv))
    return (first, positions, attention_mask, *past_kv), dynamic


def rank_graph(cfg: LlamaConfig, spec: RankSpec, options: ModelOptions, dtype: torch.dtype,
               workdir: Path) -> onnx.ModelProto:
    """The rank's graph, no initializers: one traced layer per distinct layer pattern (which
    linears are FP8), stamped for every layer of the stage."""
    layers = list(stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank))
    leaves = layer_linears(cfg)
    patterns = {i: options.quant.layer_pattern(leaves, i, cfg.num_hidden_layers) for i in layers}
    # With num_hidden_layers = pp every stage holds exactly one layer: layer number pp_rank.
    template_cfg = cfg.replace(num_hidden_layers=spec.pp_size)
    traces: dict[tuple[bool, ...], onnx.ModelProto] = {}
    for pattern in dict.fromkeys(patterns.values()):  # first-seen order: deterministic
        template_options = dataclasses.replace(options, quant=options.quant.for_template(leaves, pattern, spec.pp_rank))
        traces[pattern] = trace_rank_graph(template_cfg, spec, template_options, dtype, workdir)
    base = traces[patterns[layers[0]]]
    others = {i: traces[p] for i, p in patterns.items() if traces[p] is not base}
    model = stamp_layers(base, template_layer=spec.pp_rank, layer_ids=layers, other_patterns=others)
    strip_metadata(model)
    return model


def trace_rank_graph(cfg: LlamaConfig, spec: RankSpec, options: ModelOptions, dtype: torch.dtype,
                     workdir: Path) -> onnx.ModelProto:
    """The rank's graph as torch.onnx emits it, no initializers (weights named by state-dict key)."""
    reduce = collectives.all_reduce if spec.tp_size > 1 else no_reduce
    module = build_rank_module(cfg, spec, options, reduce=reduce, dtype=dtype, device="meta")
    for name in rank_constants(cfg, spec, dtype):  # initializers the exporter adds per rank
        owner, _, leaf = name.rpartition(".")
        target = module.get_submodule(owner)
        setattr(target, leaf, getattr(target, leaf).to("meta"))
    args, dynamic = _example_inputs(cfg, spec, options, dtype)
    input_names, output_names = io_names(cfg, spec)
    table = translation_table(collectives.all_reduce, cache_ops.kv_cache_write, fp8.fp8_quantize,
                              fp8.fp8_dequantize, attention_op.gqa_attention, rotary_op.rotary_embedding)
    with _quiet_exporter():
        program = torch.export.export(module, args, dynamic_shapes=dynamic)
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET, optimize=False,
                                         custom_translation_table=table, input_names=input_names,
                                         output_names=output_names, verbose=False)
        path = workdir / "graph.onnx"
        onnx_program.save(str(path), include_initializers=False)
    model = onnx.load(str(path), load_external_data=False)
    path.unlink()
    # TensorRT needs the exporter's shape/axes arithmetic as build-time constants.
    return fold_constant_arithmetic(model)


class _quiet_exporter:
    """torch.onnx prints progress lines and torchvision warnings; keep the CLI output ours."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._loggers = [(name, logging.getLogger(name).level) for name in ("torch.onnx", "torch._export", "torch.export")]
        for name, _ in self._loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        self._stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")
        return self

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout
        for name, level in self._loggers:
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)
        return False


def _name_symbolic_dims(model: onnx.ModelProto, spec: RankSpec, cache: KVCacheLayout) -> None:
    """Replace the exporter's s17-style symbols by batch / seq / the cache layout's past length
    (concat: past_seq) or else total_seq (the attention mask's length, slots in use after the
    step) everywhere."""
    graph = model.graph
    first = graph.input[0].type.tensor_type.shape.dim
    names = {first[0].dim_param: "batch", first[1].dim_param: "seq"}
    if cache.past_dim_name:
        past = graph.input[3].type.tensor_type.shape.dim[2].dim_param
        names[past] = cache.past_dim_name
    else:
        names[graph.input[2].type.tensor_type.shape.dim[1].dim_param] = "total_seq"
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in names if k) + r")\b")

    def rename(value_info):
        for dim in value_info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(0)], dim.dim_param)

    for value in [*graph.input, *graph.output, *graph.value_info]:
        rename(value)


# -- weights ---------------------------------------------------------------------------------

def _external_initializer(tensor: WrittenTensor) -> TensorProto:
    proto = TensorProto(name=tensor.name, data_type=dtype_of_torch(tensor.dtype).onnx, dims=list(tensor.shape))
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", str(tensor.offset)), ("length", str(tensor.length))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto


def share_tied_head(model: onnx.ModelProto) -> None:
    """Point the traced lm_head at the embedding's initializer (export/sharding.py:shares_tied_head):
    both are [vocab, hidden] in the compute dtype (the embedding and lm_head are never FP8), the
    Gather reads rows and the head's Transpose -> MatMul reads the same matrix."""
    readers = [node for node in model.graph.node if "lm_head.weight" in node.input]
    if not readers:
        raise InternalError("the traced rank graph has no lm_head.weight reader to share the embedding with")
    for node in readers:
        node.input[:] = ["model.embed_tokens.weight" if name == "lm_head.weight" else name for name in node.input]


def attach_initializers(model: onnx.ModelProto, written: list[WrittenTensor], cfg: LlamaConfig,
                        spec: RankSpec, dtype: torch.dtype) -> None:
    """Point the graph's weights at the data file and add the rank's constants inline; every
    initializer the graph reads must be provided, and nothing else."""
    wanted = {i for node in model.graph.node for i in node.input}
    wanted -= {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    wanted.discard("")
    # RoPE tables, this rank's vocab start and hidden columns.
    constants = rank_constants(cfg, spec, dtype)
    names = {t.name for t in written} | set(constants)
    extra, missing = names - wanted, wanted - names
    if extra or missing:
        raise InternalError(f"rank {spec.rank}: the traced graph and the weights disagree (unused: "
                            f"{sorted(extra)[:3]}, missing: {sorted(missing)[:3]})")
    model.graph.initializer.extend(_external_initializer(t) for t in written)
    model.graph.initializer.extend(_inline_initializer(name, v) for name, v in constants.items())


def _inline_initializer(name: str, tensor: torch.Tensor) -> TensorProto:
    """A rank constant stored in model.onnx itself, raw little-endian bytes (bfloat16 included)."""
    proto = TensorProto(name=name, data_type=dtype_of_torch(tensor.dtype).onnx, dims=list(tensor.shape))
    proto.raw_data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return proto


def rank_bytes(checkpoint: Checkpoint, spec: RankSpec, dtype: torch.dtype) -> int:
    """Weight bytes one rank writes (headers only: nothing is read)."""
    cfg, itemsize = checkpoint.config, torch.empty(0, dtype=dtype).element_size()
    total = 0
    for name in stored_tensor_names(cfg, spec):
        shape = tensor_slice(cfg, spec, name, checkpoint.kv_dup_factor).local_shape(
            checkpoint.shape(checkpoint_name(cfg, name)))
        total += int(np.prod(shape)) * itemsize + ALIGN
    return total


# -- one rank, whole artifact ----------------------------------------------------------------

def _spec_entries(values) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        out.append(TensorSpec(v.name, dtype_of_onnx(t.elem_type).name, shape))
    return tuple(out)


TRACE_PREFIX = "llama405-trace-"  # $TMPDIR/llama405-trace-PID-*: where torch.onnx writes a traced layer


def rank_graph_proto(cfg: LlamaConfig, spec: RankSpec, options: ExportOptions) -> tuple[onnx.ModelProto, int]:
    """The finished rank graph without weights: traced, collectives rewritten, dims named.
    Returns it and the number of DistCollective nodes."""
    with marked_temporary_folder(TRACE_PREFIX) as workdir:
        model = rank_graph(cfg, spec, options.model_options, dtype_named(options.dtype).torch, workdir)
    n_collectives = collectives.rewrite_collectives(model, spec.tp_size) if spec.tp_size > 1 else 0
    _name_symbolic_dims(model, spec, options.model_options.cache_layout)
    return model, n_collectives


class StageGraphs:
    """One traced graph per pipeline stage, copied for each of its TP ranks (they differ only in
    initializers: weight slices, vocab start, hidden columns)."""

    def __init__(self, cfg: LlamaConfig, options: ExportOptions):
        self.cfg, self.options = cfg, options
        self._traced: dict[int, tuple[onnx.ModelProto, int]] = {}
        self.trace_s = 0.0

    def for_rank(self, spec: RankSpec) -> tuple[onnx.ModelProto, int]:
        if spec.pp_rank not in self._traced:
            started = time.perf_counter()
            self._traced[spec.pp_rank] = rank_graph_proto(self.cfg, spec, self.options)
            self.trace_s += time.perf_counter() - started
        model, n_collectives = self._traced[spec.pp_rank]
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, n_collectives


def export_rank(checkpoint: Checkpoint, spec: RankSpec, options: ExportOptions, rank_dir: Path,
                graphs: StageGraphs, input_scales: dict[str, float] | None = None,
                on_bytes: Callable[[int], None] = lambda n: None,
                stats: dict[str, float] | None = None) -> tuple[RankEntry, dict]:
    cfg, dtype = checkpoint.config, dtype_named(options.dtype).torch
    rank_dir.mkdir(parents=True)
    # The graph first: the tracer's transient memory is freed before weight blocks are in
    # flight, so the two peaks do not add up.
    model, n_collectives = graphs.for_rank(spec)
    started = time.perf_counter()
    tensors = rank_module_blocks(checkpoint, spec, dtype, options.quantization, input_scales, None, BLOCK_BYTES)
    if shares_tied_head(cfg, spec):
        share_tied_head(model)
        tensors = ((name, blocks) for name, blocks in tensors if name != "lm_head.weight")  # blocks are lazy: unread
    written, data_sha = write_weights(tensors, rank_dir / DATA_FILE, on_bytes=on_bytes)
    if stats is not None:
        stats["weights_s"] = stats.get("weights_s", 0.0) + time.perf_counter() - started
        stats["trace_s"] = graphs.trace_s
    attach_initializers(model, written, cfg, spec, dtype)
    model.producer_name, model.producer_version = "llama405", _version()
    layers = stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank)
    identity = RankEntry(rank=spec.rank, tp_rank=spec.tp_rank, pp_rank=spec.pp_rank,
                         layers=(layers.start, layers.stop), inputs=(), outputs=(), collectives=0)
    onnx.helper.set_model_props(model, rank_identity(identity, spec.tp_size, spec.pp_size))
    model.doc_string = (f"Llama 3.1 rank {spec.rank} (tp {spec.tp_rank}/{spec.tp_size}, "
                        f"pp {spec.pp_rank}/{spec.pp_size})")
    onnx_path = rank_dir / ONNX_FILE
    with naming(onnx_path):
        onnx.save_model(model, str(onnx_path))
    collectives.register_dist_collective_schema()
    onnx.checker.check_model(str(onnx_path), full_check=False)
    layers = stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank)
    entry = RankEntry(rank=spec.rank, tp_rank=spec.tp_rank, pp_rank=spec.pp_rank,
                      layers=(layers.start, layers.stop), inputs=_spec_entries(model.graph.input),
                      outputs=_spec_entries(model.graph.output), collectives=n_collectives)
    files = {entry.onnx_path: file_entry(onnx_path), entry.data_path: file_entry(rank_dir / DATA_FILE, data_sha)}
    return entry, files


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llama405")
    except PackageNotFoundError:
        return "0+unknown"


def _toolchain() -> dict[str, str]:
    import onnxscript
    return {"llama405": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "python": ".".join(map(str, sys.version_info[:3]))}


# model.onnx and manifest.json of a rank: the graph is small but grows with the layers.
GRAPH_BYTES_PER_LAYER = 256 << 10


def check_disk(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed * 1.02:
        raise ArtifactError(f"{directory}: the export needs {needed / 1e9:.2f} GB but only "
                            f"{free / 1e9:.2f} GB are free; free space or pass another --out")


def resolve_input_scales(checkpoint: Checkpoint, options: ExportOptions,
                         calibration_tokens: np.ndarray | None, calibration_source: str,
                         progress: bool, calibration_device: str = "cpu"
                         ) -> tuple[dict[str, float] | None, ScalesRecord | None, Smoothing | None]:
    """Static activation scales: the checkpoint's own, else calibration (on calibration_device).
    Returns the scales, what the manifest records about them (None for a scheme without static
    scales), and the up->down smoothing (--fp8-smoothing) the scales assume, which the rank
    weights must then get (export/smoothing.py)."""
    quant = options.quantization
    if not quant.needs_activation_scales:
        return None, None, None
    cfg = checkpoint.config
    needed = sorted(set().union(*(rank_layout(cfg, s).quantized_linears(quant) for s in all_ranks(options.tp, options.pp))))
    stored = checkpoint_input_scales(checkpoint)
    exclusions = (checkpoint.quantization.manifest_record(honoured=options.fp8_checkpoint_exclusions == "honour")
                  if checkpoint.quantization.not_quantized else None)
    record = functools.partial(ScalesRecord, recipe=quant.recipe, exclude=quant.patterns(cfg.num_hidden_layers),
                               quantized_linears=len(needed), checkpoint_exclusions=exclusions)
    if all(name in stored for name in needed):
        if options.fp8_smoothing is not None:
            raise CheckpointError(f"{checkpoint.directory}: --fp8-smoothing needs calibrated activation ranges, "
                                  "but this checkpoint carries its own input_scale tensors; drop --fp8-smoothing")
        for name in needed:
            if not (stored[name] > 0 and np.isfinite(stored[name])):
                raise CheckpointError(f"{checkpoint.directory}: {name}.input_scale is {stored[name]}; "
                                      "scales must be positive and finite")
        return {n: stored[n] for n in needed}, record(scales_from=FROM_CHECKPOINT,
                                                      input_scales={n: stored[n] for n in needed}), None
    if calibration_tokens is None:
        missing = [n for n in needed if n not in stored]
        raise CheckpointError(f"{checkpoint.directory}: --quant fp8 needs static activation scales, but "
                              f"the checkpoint has no input_scale for {missing[0]} (and {len(missing) - 1} more) "
                              "and calibration is off; drop --calib-text none or pass a --calib-text FILE")
    calibration: Calibration = calibrate(checkpoint, calibration_tokens, calibration_source,
                                         progress=progress, device=calibration_device)
    warning = calibration.float16_headroom_warning()
    if warning and options.dtype == "float16":
        print(f"warning: {warning}", file=sys.stderr)
    amax, smoothing = calibration.amax, None
    if options.fp8_smoothing is not None:
        smoothing, amax = smooth_down_proj_inputs(checkpoint, calibration.channel_amax, amax,
                                                  options.fp8_smoothing, needed)
    scales = {n: input_scale_from_amax(a) for n, a in amax.items()}
    return scales, record(scales_from=FROM_CALIBRATION, input_scales={n: scales[n] for n in needed},
                          amax={n: amax[n] for n in needed},
                          calibration=CalibrationRecord(calibration_source, calibration.samples, calibration.seq_len,
                                                        calibration.max_activation),
                          checkpoint_weights="fp8" if any(n.endswith(".weight_scale") for n in checkpoint.weight_map)
                          else "unquantized",
                          smoothing=smoothing.manifest_record() if smoothing is not None else None), smoothing


def with_checkpoint_exclusions(options: ExportOptions, quantization: CheckpointQuantization) -> ExportOptions:
    """options whose FP8 exclusions include the checkpoint's own unquantized modules, when
    quantizing and asked to honour them (the default)."""
    if (not options.quantization.quantized or options.fp8_checkpoint_exclusions != "honour"
            or not quantization.not_quantized):
        return options
    added = tuple(p for p in quantization.fp8_exclude_patterns() if p not in options.fp8_exclude)
    return dataclasses.replace(options, fp8_exclude=options.fp8_exclude + added)


def export_artifact(checkpoint_dir: str | Path, out: str | Path, options: ExportOptions,
                    force: bool = False, progress: bool = False,
                    calibration_tokens: np.ndarray | None = None,
                    calibration_source: str = "", stats: dict[str, float] | None = None,
                    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                    calibration_device: str = "cpu") -> Path:
    """Write the artifact atomically: a temporary sibling renamed into place at the end.

    `out` may be replaced (force) only when it holds a finished llama405 artifact or nothing, and
    never when it is, contains or lies inside the checkpoint (export/output_dir.py); one export
    at a time holds it.

    calibration_tokens [samples, seq] are used for FP8 activation scales when the checkpoint
    carries none (the CLI tokenizes --calib-text; export/ never imports the runner's tokenizer), on
    calibration_device ("cpu" or "cuda:N", as torch names it; the CLI's --calib-device checked it).
    stats, if given, receives the seconds spent streaming weights (weights_s) and tracing (trace_s).
    """
    out = output_folder(out)
    checkpoint = Checkpoint(checkpoint_dir)
    cfg = checkpoint.config
    validate_parallelism(cfg, options.tp, options.pp)
    options.validate(cfg)
    options = with_checkpoint_exclusions(options, checkpoint.quantization)
    specs = [s for s in all_ranks(options.tp, options.pp) if options.ranks is None or s.rank in options.ranks]
    for spec in specs:
        checkpoint.validate(spec)
    replaceable = {"force": force, "is_ours": is_finished_artifact, "what": "a finished llama405 artifact",
                   "protected": [checkpoint.directory]}
    check_replaceable(out, **replaceable)
    with exclusive_writer(out):
        check_replaceable(out, **replaceable)  # again, now that no other export can change it
        remove_stale_siblings(out, log)
        remove_stale_temporaries(Path(tempfile.gettempdir()), TRACE_PREFIX, log)
        _export_locked(checkpoint, specs, out, options, progress, calibration_tokens, calibration_source, stats,
                       calibration_device)
    return out


def _export_locked(checkpoint: Checkpoint, specs: list[RankSpec], out: Path, options: ExportOptions, progress: bool,
                   calibration_tokens: np.ndarray | None, calibration_source: str,
                   stats: dict[str, float] | None, calibration_device: str = "cpu") -> None:
    cfg = checkpoint.config
    dtype = dtype_named(options.dtype).torch
    # Carried as the checkpoint has it: a synthesized cut-vocabulary model keeps Llama 3's files, and
    # what tokenizes text (generate, parity, calibration, tokenize) refuses ids past the vocabulary.
    tokenizer = checkpoint_tokenizer(checkpoint.directory)
    tokenizer_bytes = sum(p.stat().st_size for p in tokenizer.sources())
    graph_bytes = len(specs) * GRAPH_BYTES_PER_LAYER * (cfg.num_hidden_layers + 2)
    total = sum(rank_bytes(checkpoint, s, dtype) for s in specs)
    check_disk(out.parent, total + tokenizer_bytes + graph_bytes)

    input_scales, scales_info, smoothing = resolve_input_scales(checkpoint, options, calibration_tokens,
                                                                calibration_source, progress, calibration_device)
    if smoothing is not None:
        checkpoint = SmoothedCheckpoint(checkpoint.directory, smoothing)
    graphs = StageGraphs(cfg, options)
    tmp = temporary_sibling(out)
    try:
        entries, files = [], {}
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="export") as bar:
            for spec in specs:
                bar.set_postfix_str(f"rank {spec.rank}")
                entry, rank_files = export_rank(checkpoint, spec, options, tmp / rank_folder(spec.rank), graphs,
                                                input_scales, bar.update, stats)
                entries.append(entry)
                files.update(rank_files)
        for path in tokenizer.copy_to(tmp):  # the artifact carries the tokenizer it was exported with
            files[path.name] = file_entry(path)
        extra = {options.quantization.record_key: scales_info.to_dict()} if scales_info is not None else {}
        extra[CACHE_WRITES] = options.cache_layout.writes
        if genai_supported(options.tp, options.pp):
            path = write_genai_config(tmp, cfg, options.kv_cache, options.max_seq_len, checkpoint.directory)
            files[path.name] = file_entry(path)
            extra["genai"] = {"config": path.name}
        else:
            extra["genai"] = {"config": None, "why": GENAI_NOT_SUPPORTED}
        manifest = Manifest(
            config=cfg, options=options, opset=OPSET, ranks=tuple(entries), files=dict(sorted(files.items())),
            source={"config_sha256": config_digest(cfg),
                    "kv_dup_factor": checkpoint.kv_dup_factor,
                    "tokenizer": tokenizer.description},
            toolchain=_toolchain(), extra=extra)
        manifest.source["options_sha256"] = options_digest(manifest)
        write_manifest(tmp, manifest)
        move_into_place(tmp, out, artifact_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
