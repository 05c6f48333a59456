"""Artifact -> one TensorRT engine per rank, with either TensorRT flavour (export/trt_flavours.py):
`tensorrt` (>= 10.16, on the NVIDIA GPU it builds for: the H100/H200 FP8 deployment) or `rtx`
(TensorRT-RTX: ahead of time, for the `--target` compute capabilities, on any machine).

Per rank (`build_rank_engine`):

  parse_from_file (never an in-memory ModelProto: 405B ranks are far beyond protobuf's 2 GiB)
  -> strongly typed network (TensorRT 11 and TensorRT-RTX: the only mode; 10.x: the
     STRONGLY_TYPED creation flag) — no FP8/FP16/BF16/INT8 builder flags: precision comes from
     the graph
  -> attention layers marked decomposable (a fallback where TensorRT has no fused kernel: fp32, small heads)
  -> optimization profile(s) from max-batch / max-input-len / max-seq-len (`optimization_profiles`)
  -> builder optimization level, workspace limit, optional WEIGHT_STREAMING, STRIP_PLAN +
     REFIT_IDENTICAL; `tensorrt`: the timing cache shared across ranks and runs (ART/timing.cache);
     `rtx`: the targets (IBuilderConfig.num_compute_capabilities + set_compute_capability)
  -> build_serialized_network; everything the manifest records is known, then
     rank{r}/engine.plan is written atomically and the manifest gains its "engines" section.

Ranks build in parallel with `workers` > 1: a spawn process pool; for `tensorrt` one GPU per
worker (CUDA_VISIBLE_DEVICES set before TensorRT loads) and the workers' timing caches merged.

API names were checked against NVIDIA/TensorRT 11.1 (python/src/infer/pyCore.cpp, NvInfer.h) and
the TensorRT-RTX 1.7.1 bindings; the `rtx` path runs in `make test`, the `tensorrt` path only on
a GPU machine with TensorRT (tests marked `gpu`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from engines.plan import BUILDER_HOST_BYTES_PER_WEIGHT_BYTE, builder_host_bytes
from engines.profiles import BuildOptions, optimization_profiles
from export.errors import ArtifactError, Llama405Error, MissingRequirement, naming
from export.cli_run import DeferredSignals, signals_deferred
from export.engines_record import ENGINES_FORMAT, BuildGpu, EnginesSection, RankEngine, engines_section
from export.manifest import (MANIFEST, Manifest, check_rank_identity, load_manifest, read_rank_identity,
                             write_manifest)
from export.quantization import Quantization
from export.trt_flavours import cuda_devices, version_tuple
from export.trt_flavours import flavour as trt_flavour

TIMING_CACHE = "timing.cache"
FP8_MIN_SM = (9, 0)  # the `tensorrt` flavour's FP8 deployment: Hopper


class EnginesNotBuilt(MissingRequirement):
    """The TensorRT flavour (or, for `tensorrt`, a suitable GPU) is missing, so the engine stage
    did not run; the ONNX artifact is finished (exit code 3, as every MissingRequirement)."""

    def __init__(self, missing: Sequence[str], artifact: Path, flavour: str = "tensorrt", verified: bool = True):
        """verified: the artifact was just exported or its hashes checked (else it is not called complete)."""
        self.missing, self.artifact = list(missing), Path(artifact)
        chosen = trt_flavour(flavour)
        where = chosen.pip if chosen.builds_without_gpu else f"on a machine with an NVIDIA GPU and {chosen.pip}"
        state = (f"The ONNX artifact is complete at {self.artifact}" if verified else
                 f"The ONNX artifact is at {self.artifact} (not verified here: `llama405 verify {self.artifact}`)")
        super().__init__(
            f"engine stage not run: {'; '.join(self.missing)}. {state} — continue {where} with "
            f"`build-engine --artifact {self.artifact} --trt {flavour}`"
            + ("" if chosen.builds_without_gpu else ", or build TensorRT-RTX engines here with --trt rtx"))


class EngineBuildError(Llama405Error):
    """TensorRT refused the graph or the build failed; the message carries TensorRT's errors."""


# -- preflight -------------------------------------------------------------------------------

def preflight(flavour: str, quant: Quantization, tp: int = 1, workers: int = 1) -> list[str]:
    """What building with `flavour` lacks here, one phrase each; empty when it can run."""
    chosen = trt_flavour(flavour)
    missing: list[str] = []
    module = chosen.import_module()
    need = ".".join(map(str, chosen.min_version))
    if module is None:
        how = "fails: a stub or broken install" if chosen.installed_but_unusable() else "finds no module"
        missing.append(f"{chosen.title} is not importable (`import {chosen.module}` {how}; need >= {need})")
    elif version_tuple(module.__version__) < chosen.min_version:
        missing.append(f"{chosen.title} {module.__version__} is older than {need}")
    if chosen.builds_without_gpu:
        return missing
    devices = cuda_devices()
    if not devices:
        import torch
        note = ("no CUDA GPU: this PyTorch is a CPU-only build" if torch.version.cuda is None
                else "no CUDA GPU visible (torch.cuda.is_available() is False)")
        if torch.version.cuda is None and shutil.which("nvidia-smi"):
            note += " (nvidia-smi exists: install a CUDA build of torch)"
        return missing + [note]
    if workers > len(devices):
        missing.append(f"--workers {workers} needs {workers} GPUs but {len(devices)} are visible")
    if quant.fp8_tensor_cores:
        old = [f"GPU {i} is SM{a}{b}" for i, (_, (a, b)) in enumerate(devices[:max(workers, 1)]) if (a, b) < FP8_MIN_SM]
        if old:
            missing.append(f"FP8 engines need SM{FP8_MIN_SM[0]}{FP8_MIN_SM[1]} (Hopper) or newer; " + ", ".join(old))
    return missing


def describe_flavour(options: BuildOptions) -> str:
    """One line: which TensorRT builds, its version, and what it can and cannot do here."""
    chosen = trt_flavour(options.flavour)
    module = chosen.import_module()
    version = getattr(module, "__version__", "?")
    devices = cuda_devices()
    if chosen.targets:
        runs = (f"this machine's GPU{'s' if len(devices) > 1 else ''}: {', '.join(n for n, _ in devices)}" if devices
                else "no GPU here: the engines are built, not run")
        return (f"{chosen.title} {version}: ahead-of-time build for {', '.join(options.targets)} "
                f"(RTX / Ampere+ GPUs, not H100); {runs}")
    return f"{chosen.title} {version}: building for {devices[0][0]} (SM{''.join(map(str, devices[0][1]))})"


# -- one rank --------------------------------------------------------------------------------

def make_logger(trt):
    """The TensorRT logger of this process for module `trt` (TensorRT registers the first logger
    process-wide and warns about any other), printing warnings and errors to stderr, one line
    each, but for the lines in _QUIET."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = _new_logger(trt)
    return _LOGGERS[trt.__name__]


_LOGGERS: dict[str, object] = {}


# Dropped log lines: llama405 binds int64 ids on purpose ("Make sure input X has Int64 binding"), and a
# build cancelled by a signal (_cancel_monitor) says so in the command's own one line.
_QUIET = ("has Int64 binding", "BuildCanceled")


def _new_logger(trt):
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING) and not any(quiet in msg for quiet in _QUIET):
                print(f"[{trt.__name__} {str(severity).rsplit('.', 1)[-1]}] {' '.join(msg.split())}", file=sys.stderr)

    return Logger()


def _create_network(builder, trt):
    """Strongly typed network: TensorRT 11 and TensorRT-RTX have no other mode; 10.x needs the
    flag for FP8 Q/DQ graphs and weight streaming."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None and trt.__name__ == "tensorrt" and version_tuple(trt.__version__) < (11,):
        return builder.create_network(1 << int(flag))
    return builder.create_network(0)


def parser_errors(parser) -> str:
    """The parser's errors on one line (node index, name, operator and message)."""
    lines = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
    return "; ".join(lines) or "no details"


def parse_rank(trt, onnx_path: Path, logger):
    """(builder, network, parser) with the rank graph parsed; EngineBuildError when refused."""
    builder = trt.Builder(logger)
    network = _create_network(builder, trt)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file reads model.onnx.data beside the graph itself (external data).
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"{onnx_path}: {trt.__name__}'s ONNX parser rejected the graph: {parser_errors(parser)}")
    return builder, network, parser


def mark_attention_decomposable(trt, network) -> int:
    """Let every IAttention fall back to its decomposed form where TensorRT has no dedicated
    kernel (IAttention::setDecomposable): fp32 has none at all, nor do small head sizes (the
    tests' toy models). Shapes with a fused kernel (fp16/bf16/fp8, head_dim 64/128) still get it.
    Returns how many layers were marked."""
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if kind is not None and layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer
            layer.attention.decomposable = True
            marked += 1
    return marked


def _gpu_identity() -> BuildGpu:
    import torch
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return BuildGpu(torch.cuda.get_device_name(index), f"{major}.{minor}")


def _digest(data) -> tuple[memoryview, int, str]:
    try:
        view = memoryview(data).cast("B")  # IHostMemory exposes the buffer protocol (format "f", itemsize 1)
    except (TypeError, ValueError):
        view = memoryview(bytes(data))
    return view, view.nbytes, hashlib.sha256(view).hexdigest()


def _write_atomically(path: Path, view: memoryview) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as every other artifact file (mkstemp alone makes it 0600)
        with os.fdopen(fd, "wb") as f, naming(path):
            f.write(view)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flags(options: BuildOptions) -> list[str]:
    flags = ["WEIGHT_STREAMING"] if options.weight_streaming else []
    if options.strip_plan:
        flags += ["STRIP_PLAN", "REFIT_IDENTICAL"]  # small plan, weights refitted from the ONNX at load
    return flags


def _cancel_monitor(trt, signals: DeferredSignals):
    """A TensorRT progress monitor that cancels the build once a signal is pending (the build then
    returns None and `signals_deferred` raises the signal's exception)."""
    class CancelOnSignal(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            return not signals.pending

        def phase_finish(self, phase_name):
            pass

    return CancelOnSignal()


def build_rank_engine(artifact_dir: str | Path, rank: int, options: BuildOptions, trt_module,
                      timing_cache: bytes = b"", manifest: Manifest | None = None) -> tuple[RankEngine, bytes]:
    """Build rank{rank}/engine.plan; returns (its metadata for the manifest, grown timing cache).
    Signals are deferred while TensorRT runs (export/cli_run.py: its callbacks would swallow them)."""
    with signals_deferred() as signals:
        return _build_rank_engine(Path(artifact_dir), rank, options, trt_module, timing_cache, manifest, signals)


def _build_rank_engine(artifact_dir: Path, rank: int, options: BuildOptions, trt_module, timing_cache: bytes,
                       manifest: Manifest | None, signals: DeferredSignals) -> tuple[RankEngine, bytes]:
    trt, directory, chosen = trt_module, Path(artifact_dir), trt_flavour(options.flavour)
    manifest = manifest or load_manifest(directory, only=[])
    entry = manifest.rank(rank)
    onnx_path = directory / entry.onnx_path
    check_rank_identity(read_rank_identity(onnx_path), onnx_path, manifest, entry)
    logger = make_logger(trt)
    started = time.perf_counter()
    try:
        builder, network, _parser = parse_rank(trt, onnx_path, logger)
    except EngineBuildError as err:
        raise EngineBuildError(f"rank {rank}: {err}") from None
    parse_s = time.perf_counter() - started
    decomposable = mark_attention_decomposable(trt, network)

    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    for name in _flags(options):
        config.set_flag(getattr(trt.BuilderFlag, name))
    if chosen.targets:
        config.num_compute_capabilities = len(options.targets)
        for i, target in enumerate(options.targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), i)

    profiles = optimization_profiles(entry, manifest.cache_layout, options.max_seq_len, options)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for shapes in profiles:
        unknown = set(shapes) - network_inputs
        if unknown:
            raise EngineBuildError(f"{onnx_path}: profile names inputs the parsed network lacks: {sorted(unknown)}")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    if hasattr(trt, "IProgressMonitor"):
        monitor = _cancel_monitor(trt, signals)
        config.progress_monitor = monitor  # kept alive by the local until the build returns
    uses_timing_cache = not chosen.builds_without_gpu
    if uses_timing_cache:
        config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False)
    built = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"rank {rank}: {chosen.title} could not build an engine from {onnx_path} (see its log "
                               "above; a larger --workspace or lower --max-input-len may help)")
    build_s = time.perf_counter() - built
    view, size, sha = _digest(serialized)
    grown = bytes(memoryview(config.get_timing_cache().serialize())) if uses_timing_cache else timing_cache
    metadata = RankEngine(
        file=entry.engine_path, size=size, sha256=sha, onnx_sha256=manifest.files.get(entry.onnx_path, {}).get("sha256"),
        parse_s=round(parse_s, 3), build_s=round(build_s, 3), seconds=round(time.perf_counter() - started, 3),
        decomposable_attention=decomposable,
        gpu=None if chosen.targets else _gpu_identity())  # the GPU the engine was built (and tuned) on
    _write_atomically(directory / entry.engine_path, view)
    return metadata, grown


# -- all ranks -------------------------------------------------------------------------------

def _pool_init(devices) -> None:
    """Runs first in every pool process: pin it to one GPU before CUDA or TensorRT load."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())


def _pool_build(job: tuple[str, int, BuildOptions, bytes]) -> tuple[int, RankEngine, bytes]:
    directory, rank, options, cache = job
    trt = trt_flavour(options.flavour).import_module()
    if trt is None:
        raise EngineBuildError(f"rank {rank}: {options.flavour} is not importable in the build worker process")
    metadata, grown = build_rank_engine(directory, rank, options, trt, cache)
    return rank, metadata, grown


def _visible_devices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(len(cuda_devices()))]


def merge_timing_caches(trt, base: bytes, parts: Sequence[bytes]) -> bytes:
    """One cache holding the entries of all (ITimingCache.combine skips conflicting ones)."""
    config = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()
    merged = config.create_timing_cache(base)
    for part in parts:
        if part:
            merged.combine(config.create_timing_cache(part), False)
    return bytes(memoryview(merged.serialize()))


def host_memory_warning(manifest: Manifest, ranks: Sequence[int], workers: int) -> str | None:
    """Building a rank holds a fixed part plus ~BUILDER_HOST_BYTES_PER_WEIGHT_BYTE x its weights in
    host memory (engines/plan.py, measured); warn when the parallel set will not fit."""
    import psutil
    sizes = sorted((manifest.files.get(manifest.rank(r).data_path, {}).get("size", 0) for r in ranks), reverse=True)
    needed = sum(builder_host_bytes(size) for size in sizes[:workers])
    available = psutil.virtual_memory().available
    if needed > available:
        return (f"warning: {workers} parallel build(s) need ~{needed / 2**30:.1f} GiB of host memory "
                f"({BUILDER_HOST_BYTES_PER_WEIGHT_BYTE:g}x the weights) but {available / 2**30:.1f} GiB is available; "
                "lower --workers")
    return None


def build_engines(artifact_dir: str | Path, options: BuildOptions, log: Callable[[str], None] = print,
                  trt_module=None) -> dict:
    """Build every requested rank's engine and record them in the manifest; returns the
    manifest's new "engines" section as written (export/engines_record.py reads it typed)."""
    directory = Path(artifact_dir)
    manifest = load_manifest(directory, only=[])
    chosen = trt_flavour(options.flavour)
    trt = trt_module or chosen.import_module()
    if trt is None:
        raise EnginesNotBuilt([f"{chosen.title} is not importable"], directory, options.flavour)
    options.validate()
    ranks = list(options.ranks) if options.ranks is not None else [e.rank for e in manifest.ranks]
    for r in ranks:
        manifest.rank(r)  # raises for a rank the artifact lacks
    cache_path = Path(options.timing_cache) if options.timing_cache else directory / TIMING_CACHE
    cache = b""
    if chosen.builds_without_gpu:
        if options.timing_cache:
            log(f"--timing-cache: not used by {chosen.title}, whose ahead-of-time builds time no kernels")
    elif cache_path.is_file():
        cache = cache_path.read_bytes()
    workers = min(options.workers, len(ranks))
    warning = host_memory_warning(manifest, ranks, workers)
    if warning:
        log(warning)
    results: dict[int, RankEngine] = {}
    if workers <= 1:
        for r in ranks:
            log(f"building rank {r} engine ({len(results) + 1}/{len(ranks)})")
            results[r], cache = build_rank_engine(directory, r, options, trt, cache, manifest)
            if not chosen.builds_without_gpu:
                _write_atomically(cache_path, memoryview(cache))  # a later failure keeps what earlier ranks learned
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        ctx = multiprocessing.get_context("spawn")
        devices = None
        if not chosen.builds_without_gpu:
            devices = ctx.Queue()
            for device in _visible_devices()[:workers]:
                devices.put(device)
        log(f"building {len(ranks)} rank engines, {workers} in parallel")
        grown = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pool_init,
                                 initargs=(devices,)) as pool:
            for r, metadata, part in pool.map(_pool_build, [(str(directory), r, options, cache) for r in ranks]):
                results[r] = metadata
                grown.append(part)
                log(f"rank {r} engine built in {metadata.seconds:.1f} s")
        if not chosen.builds_without_gpu:
            cache = merge_timing_caches(trt, cache, grown)
    if not chosen.builds_without_gpu:
        _write_atomically(cache_path, memoryview(cache))
    return record_engines(directory, manifest, results, options, trt.__version__, log)


def engines_header(options: BuildOptions, version: str) -> EnginesSection:
    """What every engine of one build shares: a later build of other ranks joins the section only
    when its header is the same."""
    return EnginesSection(format=ENGINES_FORMAT, flavour=options.flavour, version=version, targets=tuple(options.targets),
                          flags=tuple(_flags(options)), builder_optimization_level=options.optimization_level,
                          workspace_bytes=options.workspace_bytes, max_batch=options.max_batch,
                          max_input_len=options.max_input_len, max_seq_len=options.max_seq_len,
                          opt_batch=options.batch_opt, opt_input_len=options.opt_input_len)


def record_engines(directory: Path, manifest: Manifest, results: dict[int, RankEngine], options: BuildOptions,
                   version: str, log: Callable[[str], None] = print) -> dict:
    """Merge engine metadata into manifest.json ("engines" section + the engine files); returns
    the section as written."""
    header = engines_header(options, version)
    files = dict(manifest.files)
    kept: dict[int, RankEngine] = {}
    try:
        previous = engines_section(manifest, str(directory / MANIFEST))
        stale = {} if previous is None else {r: m.file for r, m in previous.ranks.items()}
    except ArtifactError as err:  # an older or damaged section: this build replaces it whole
        log(f"replacing the engines section: {err}")
        previous, stale = None, {e.rank: e.engine_path for e in manifest.ranks if e.engine_path in manifest.files}
    if previous is not None and previous.header() == header.header():
        kept, stale = dict(previous.ranks), {}
    for r, file in stale.items():  # engines of another build of the other ranks would not work with these
        if r not in results:
            files.pop(file, None)
            (directory / file).unlink(missing_ok=True)
            log(f"removed {file}: built with other engine options than this build")
    built = {}
    for r, meta in results.items():
        points = optimization_profiles(manifest.rank(r), manifest.cache_layout, options.max_seq_len, options)
        profiles = tuple({name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.items()}
                         for p in points)
        built[r] = dataclasses.replace(meta, profiles=profiles)
        files[meta.file] = {"sha256": meta.sha256, "size": meta.size}
    section = header.with_ranks({**kept, **built}, record_gpus=not trt_flavour(options.flavour).targets)
    raw = section.to_dict()
    updated = dataclasses.replace(manifest, files=dict(sorted(files.items())), extra={**manifest.extra, "engines": raw})
    write_manifest(directory, updated)
    return raw
