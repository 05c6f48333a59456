"""Artifact -> one TensorRT engine per rank (DESIGN §7), written against TensorRT 11's Python API.

The flow (`build`): export the ONNX artifact if needed (or reuse one whose manifest matches the
request and whose hashes verify), then check for TensorRT and a GPU (`preflight`). When something
is missing the ONNX stage is done and `MissingRequirement` says what is missing and how to go on
(the CLI turns it into one line and exit code 3); otherwise every rank's graph is built:

  parse_from_file (never an in-memory ModelProto: 405B ranks are far beyond protobuf's 2 GiB)
  -> strongly typed network (TensorRT 11: the only mode; 10.x: NetworkDefinitionCreationFlag
     .STRONGLY_TYPED) — no FP8/FP16/BF16/INT8 builder flags: precision comes from the graph
  -> optimization profile(s) from max-batch / max-input-len / max-seq-len (`optimization_profiles`)
  -> builder optimization level, workspace limit, optional WEIGHT_STREAMING, STRIP_PLAN +
     REFIT_IDENTICAL, timing cache shared across ranks and runs (ART/timing.cache)
  -> build_serialized_network -> rank{r}/engine.plan, written atomically
  -> the manifest gains an "engines" section and the engine files in "files".

Ranks build in parallel with `workers` > 1: a spawn process pool, one GPU per worker process
(CUDA_VISIBLE_DEVICES set before TensorRT loads). Each parallel worker starts from the timing
cache on disk and hands back its grown cache; the parent merges them (ITimingCache.combine).

TensorRT API names used here were checked against NVIDIA/TensorRT at commit a892d222 (11.1.0,
python/src/infer/pyCore.cpp, python/src/parsers/pyOnnx.cpp, include/NvInfer.h). None of this runs
on a machine without TensorRT and a GPU; the pure parts (profiles, option checks, the export /
reuse flow, preflight) are tested everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

from export.errors import ArtifactError, InputError, Llama405Error
from export.manifest import MANIFEST, Manifest, RankEntry, load_manifest, write_manifest

ENGINE_FILE = "engine.plan"
TIMING_CACHE = "timing.cache"
ENGINES_FORMAT = 1
# TensorRT 10.15 maps TensorScatter onto its KV-cache update layer; 10.16 parses DistCollective.
# One floor for every artifact (pyproject's gpu extra pins the same): tensorrt >= 10.16.
MIN_TRT = (10, 16)
FP8_MIN_SM = (9, 0)     # Hopper: DESIGN §6 targets H100


class MissingRequirement(Llama405Error):
    """TensorRT or a suitable GPU is missing; the ONNX artifact is finished (exit code 3)."""

    def __init__(self, missing: Sequence[str], artifact: Path):
        self.missing, self.artifact = list(missing), Path(artifact)
        super().__init__(
            f"engine stage not run: {'; '.join(self.missing)}. The ONNX artifact is complete at "
            f"{self.artifact} — continue on a machine with an NVIDIA GPU and TensorRT >= "
            f"{MIN_TRT[0]}.{MIN_TRT[1]} (pip install '.[gpu]') with "
            f"`build-engine --artifact {self.artifact}`")


class EngineBuildError(Llama405Error):
    """TensorRT refused the graph or the build failed; the message carries TensorRT's errors."""


# -- options ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 8
    max_input_len: int = 2048  # largest tokens per step (prefill chunk); the runner chunks longer prompts
    max_seq_len: int = 4096
    opt_batch: int | None = None  # None: max_batch
    opt_input_len: int = 1  # decode steps dominate generation time
    optimization_level: int = 3
    workspace_bytes: int | None = None
    weight_streaming: bool = False
    strip_plan: bool = False
    workers: int = 1
    timing_cache: Path | None = None  # None: ART/timing.cache
    ranks: tuple[int, ...] | None = None  # None: every rank of the artifact

    @property
    def batch_opt(self) -> int:
        return self.opt_batch if self.opt_batch is not None else self.max_batch

    def validate(self) -> None:
        for name in ("max_batch", "max_input_len", "max_seq_len", "opt_input_len", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if not 1 <= self.batch_opt <= self.max_batch:
            raise InputError(f"--opt-batch {self.batch_opt} must be between 1 and --max-batch {self.max_batch}")
        if self.max_input_len > self.max_seq_len:
            raise InputError(f"--max-input-len {self.max_input_len} exceeds --max-seq-len {self.max_seq_len}")
        if self.opt_input_len > self.max_input_len:
            raise InputError(f"--opt-input-len {self.opt_input_len} exceeds --max-input-len {self.max_input_len}")
        if not 0 <= self.optimization_level <= 5:
            raise InputError(f"--builder-opt-level {self.optimization_level} must be 0..5")
        if self.workspace_bytes is not None and self.workspace_bytes < 1:
            raise InputError(f"--workspace {self.workspace_bytes} must be a positive size")

    @classmethod
    def for_artifact(cls, manifest: Manifest, **given: Any) -> BuildOptions:
        """Options for an artifact: the manifest's max_batch / max_seq_len unless given; the
        static cache's length is fixed in the graph, so a different max_seq_len is refused."""
        given = {k: v for k, v in given.items() if v is not None}
        seq = given.setdefault("max_seq_len", manifest.max_seq_len)
        if manifest.kv_cache == "static" and seq != manifest.max_seq_len:
            raise InputError(f"--max-seq-len {seq}: the artifact's static KV cache holds {manifest.max_seq_len} "
                             "slots (fixed in the graph); re-export with that --max-seq-len or omit the flag")
        if seq > manifest.max_seq_len:
            raise InputError(f"--max-seq-len {seq} exceeds the artifact's {manifest.max_seq_len}")
        given.setdefault("max_batch", manifest.max_batch)
        given.setdefault("max_input_len", min(2048, seq))
        options = cls(**given)
        options.validate()
        return options


def parse_size(text: str) -> int:
    """'16GiB', '512MiB', '2G', '1000000' -> bytes (binary units for K/M/G/T with or without 'iB')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise InputError(f"--workspace {text!r}: expected a size like 16GiB, 512MiB or a byte count")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match[2].upper()]
    return int(float(match[1]) * scale)


# -- optimization profiles (pure) ------------------------------------------------------------

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def _points(kv_cache: str, options: BuildOptions, max_seq_len: int) -> list[tuple[dict, dict, dict]]:
    """(min, opt, max) values of the symbolic dims, one triple per optimization profile.

    static: one profile; past is fixed at max_seq_len, only batch and seq vary.
    concat: each profile point must be self-consistent (attention_mask = past + seq), so a
    context profile (seq up to max_input_len, past up to max_seq_len - max_input_len) and a
    decode profile (seq 1, past up to max_seq_len - 1) cover every step of a generation.
    """
    b_max, b_opt = options.max_batch, options.batch_opt
    s_max, s_opt = options.max_input_len, options.opt_input_len
    if kv_cache == "static":
        return [({"batch": 1, "seq": 1}, {"batch": b_opt, "seq": s_opt}, {"batch": b_max, "seq": s_max})]
    L = max_seq_len
    ctx_past_max = L - s_max
    ctx_past_opt = min(ctx_past_max, L // 2)
    decode_past_opt = L // 2
    context = ({"batch": 1, "seq": 1, "past_seq": 0},
               {"batch": b_opt, "seq": s_opt, "past_seq": ctx_past_opt},
               {"batch": b_max, "seq": s_max, "past_seq": ctx_past_max})
    decode = ({"batch": 1, "seq": 1, "past_seq": 0},
              {"batch": b_opt, "seq": 1, "past_seq": decode_past_opt},
              {"batch": b_max, "seq": 1, "past_seq": L - 1})
    return [context, decode] if s_max > 1 else [decode]


def _dim_value(dim: Any, values: dict[str, int], tensor: str) -> int:
    if isinstance(dim, int):
        return dim
    total = 0
    for term in str(dim).split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in values:
            total += values[term]
        else:
            raise ArtifactError(f"input {tensor!r} has a dimension {dim!r} that llama405 does not know how to "
                                "bound (expected batch, seq, past_seq or sums of them); re-export the artifact")
    return total


def optimization_profiles(entry: RankEntry, kv_cache: str, max_seq_len: int,
                          options: BuildOptions) -> list[Profile]:
    """{input: (min, opt, max)} for every input with a symbolic dimension, per profile."""
    profiles = []
    for points in _points(kv_cache, options, max_seq_len):
        profile: Profile = {}
        for spec in entry.inputs:
            if all(isinstance(d, int) for d in spec.shape):
                continue  # static input: no profile entry needed
            profile[spec.name] = tuple(tuple(_dim_value(d, p, spec.name) for d in spec.shape)  # type: ignore
                                       for p in points)
        profiles.append(profile)
    return profiles


def profile_shapes(entry: RankEntry, kv_cache: str, max_seq_len: int, options: BuildOptions) -> Profile:
    """The first (for static artifacts: the only) optimization profile."""
    return optimization_profiles(entry, kv_cache, max_seq_len, options)[0]


# -- preflight -------------------------------------------------------------------------------

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def import_tensorrt():
    """`tensorrt` or None; a stub or broken install counts as absent."""
    try:
        import tensorrt  # optional, heavy, GPU-only
    except Exception:  # noqa: BLE001 — ImportError, or a stub package failing at import
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


def preflight(quant: str, tp: int = 1, workers: int = 1) -> list[str]:
    """What the engine stage lacks here, one phrase each; empty when it can run."""
    missing: list[str] = []
    trt = import_tensorrt()
    need = MIN_TRT
    why = "DistCollective parsing" if tp > 1 else "the TensorScatter KV-cache update and DistCollective"
    if trt is None:
        found = importlib.util.find_spec("tensorrt") is not None
        missing.append("TensorRT is not importable (`import tensorrt` " +
                       ("fails: a stub or broken install" if found else "finds no module") +
                       f"; need >= {need[0]}.{need[1]} for {why})")
    elif _version_tuple(getattr(trt, "__version__", "0")) < need:
        missing.append(f"TensorRT {trt.__version__} is older than {need[0]}.{need[1]} (needed for {why})")
    try:
        import torch
    except ImportError:  # pragma: no cover — torch is a hard dependency
        return missing + ["PyTorch is not installed (used to find the GPU)"]
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            gpu_note = "no CUDA GPU: this PyTorch is a CPU-only build"
            if shutil.which("nvidia-smi"):
                gpu_note += " (nvidia-smi exists: install a CUDA build of torch)"
        else:
            gpu_note = "no CUDA GPU visible (torch.cuda.is_available() is False)"
        missing.append(gpu_note)
        return missing
    count = torch.cuda.device_count()
    if workers > count:
        missing.append(f"--workers {workers} needs {workers} GPUs but {count} are visible")
    if quant == "fp8":
        caps = [torch.cuda.get_device_capability(i) for i in range(min(count, max(workers, 1)))]
        old = [f"GPU {i} is SM{a}{b}" for i, (a, b) in enumerate(caps) if (a, b) < FP8_MIN_SM]
        if old:
            missing.append(f"FP8 engines need SM{FP8_MIN_SM[0]}{FP8_MIN_SM[1]} (Hopper) or newer; " + ", ".join(old))
    return missing


# -- one rank --------------------------------------------------------------------------------

def _create_network(builder, trt):
    """Strongly typed network: TensorRT 11 has no other mode (its STRONGLY_TYPED flag is kept for
    compatibility and ignored); 10.x needs the flag for FP8 Q/DQ graphs and weight streaming."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None and _version_tuple(trt.__version__) < (11,):
        return builder.create_network(1 << int(flag))
    return builder.create_network(0)


def _parser_errors(parser) -> str:
    return "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"


def _gpu_identity() -> dict[str, str]:
    import torch
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "sm": f"{major}.{minor}"}


def _write_atomically(path: Path, data) -> tuple[int, str]:
    """Write a buffer to path via a temporary sibling; returns (size, sha256)."""
    try:
        view = memoryview(data).cast("B")  # IHostMemory exposes the buffer protocol (format "f", itemsize 1)
    except (TypeError, ValueError):
        view = memoryview(bytes(data))
    digest = hashlib.sha256(view).hexdigest()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(view)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return view.nbytes, digest


def build_rank_engine(artifact_dir: str | Path, rank: int, options: BuildOptions, trt_module,
                      timing_cache: bytes = b"", manifest: Manifest | None = None) -> tuple[dict, bytes]:
    """Build rank{rank}/engine.plan; returns (metadata for the manifest, grown timing cache)."""
    trt, directory = trt_module, Path(artifact_dir)
    manifest = manifest or load_manifest(directory, only=[])
    entry = manifest.rank(rank)
    onnx_path = directory / entry.onnx_path
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _create_network(builder, trt)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file reads model.onnx.data beside the graph itself (external data).
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph: {_parser_errors(parser)}")

    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    flags = []
    if options.weight_streaming:
        flags.append("WEIGHT_STREAMING")
    if options.strip_plan:
        flags += ["STRIP_PLAN", "REFIT_IDENTICAL"]  # small plan, weights refitted from the ONNX at load
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))

    profiles = optimization_profiles(entry, manifest.kv_cache, options.max_seq_len, options)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for shapes in profiles:
        unknown = set(shapes) - network_inputs
        if unknown:
            raise EngineBuildError(f"{onnx_path}: profile names inputs the parsed network lacks: {sorted(unknown)}")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"rank {rank}: TensorRT could not build an engine from {onnx_path} (see the "
                               "TensorRT log above; a larger --workspace or lower --max-input-len may help)")
    engine_path = directory / f"rank{rank}" / ENGINE_FILE
    size, sha = _write_atomically(engine_path, serialized)
    grown = bytes(memoryview(config.get_timing_cache().serialize()))
    metadata = {
        "file": f"rank{rank}/{ENGINE_FILE}", "size": size, "sha256": sha,
        "onnx_sha256": manifest.files.get(entry.onnx_path, {}).get("sha256"),
        "tensorrt": trt.__version__, **_gpu_identity(), "flags": flags,
        "builder_optimization_level": options.optimization_level, "workspace_bytes": options.workspace_bytes,
        "profiles": [{name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                      for name, (lo, opt, hi) in p.items()} for p in profiles],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return metadata, grown


# -- all ranks -------------------------------------------------------------------------------

def _pool_init(devices) -> None:
    """Runs first in every pool process: pin it to one GPU before CUDA or TensorRT load."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())


def _pool_build(job: tuple[str, int, BuildOptions, bytes]) -> tuple[int, dict, bytes]:
    directory, rank, options, cache = job
    trt = import_tensorrt()
    if trt is None:
        raise EngineBuildError(f"rank {rank}: TensorRT is not importable in the build worker process")
    metadata, grown = build_rank_engine(directory, rank, options, trt, cache)
    return rank, metadata, grown


def _visible_devices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def merge_timing_caches(trt, base: bytes, parts: Sequence[bytes]) -> bytes:
    """One cache holding the entries of all (ITimingCache.combine skips conflicting ones)."""
    config = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()
    merged = config.create_timing_cache(base)
    for part in parts:
        if part:
            merged.combine(config.create_timing_cache(part), False)
    return bytes(memoryview(merged.serialize()))


def _host_memory_warning(manifest: Manifest, directory: Path, ranks: Sequence[int], workers: int) -> str | None:
    """Parsing a rank holds its weights in host memory; warn when the parallel set will not fit."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    sizes = sorted((manifest.files.get(f"rank{r}/model.onnx.data", {}).get("size", 0) for r in ranks), reverse=True)
    needed = sum(sizes[:workers])
    available = psutil.virtual_memory().available
    if needed > available:
        return (f"warning: {workers} parallel builds parse ~{needed / 2**30:.1f} GiB of weights but "
                f"{available / 2**30:.1f} GiB of host memory is available; lower --workers")
    return None


def build_engines(artifact_dir: str | Path, options: BuildOptions, log: Callable[[str], None] = print,
                  trt_module=None) -> dict:
    """Build every requested rank's engine and record them in the manifest; returns the
    manifest's new "engines" section."""
    directory = Path(artifact_dir)
    manifest = load_manifest(directory, only=[])
    trt = trt_module or import_tensorrt()
    if trt is None:
        raise MissingRequirement(["TensorRT is not importable"], directory)
    options.validate()
    ranks = list(options.ranks) if options.ranks is not None else [e.rank for e in manifest.ranks]
    for r in ranks:
        manifest.rank(r)  # raises for a rank the artifact lacks
    cache_path = Path(options.timing_cache) if options.timing_cache else directory / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    workers = min(options.workers, len(ranks))
    warning = _host_memory_warning(manifest, directory, ranks, workers)
    if warning:
        log(warning)
    results: dict[int, dict] = {}
    if workers <= 1:
        for r in ranks:
            log(f"building rank {r} engine ({len(results) + 1}/{len(ranks)})")
            results[r], cache = build_rank_engine(directory, r, options, trt, cache, manifest)
            _write_atomically(cache_path, cache)  # a later failure keeps what earlier ranks learned
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        ctx = multiprocessing.get_context("spawn")
        devices = ctx.Queue()
        for device in _visible_devices()[:workers]:
            devices.put(device)
        log(f"building {len(ranks)} rank engines on {workers} GPUs in parallel")
        grown = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pool_init,
                                 initargs=(devices,)) as pool:
            for r, metadata, part in pool.map(_pool_build, [(str(directory), r, options, cache) for r in ranks]):
                results[r] = metadata
                grown.append(part)
                log(f"rank {r} engine built in {metadata['seconds']:.1f} s")
        cache = merge_timing_caches(trt, cache, grown)
    _write_atomically(cache_path, cache)
    return record_engines(directory, manifest, results, options)


def record_engines(directory: Path, manifest: Manifest, results: dict[int, dict], options: BuildOptions) -> dict:
    """Merge engine metadata into manifest.json ("engines" section + the engine files)."""
    previous = manifest.extra.get("engines", {}) or {}
    by_rank = {**previous.get("ranks", {}), **{str(r): m for r, m in sorted(results.items())}}
    versions = sorted({m["tensorrt"] for m in by_rank.values()})
    section = {
        "format": ENGINES_FORMAT,
        "tensorrt": versions[0] if len(versions) == 1 else versions,
        "max_batch": options.max_batch, "max_input_len": options.max_input_len,
        "max_seq_len": options.max_seq_len, "opt_batch": options.batch_opt, "opt_input_len": options.opt_input_len,
        "weight_streaming": options.weight_streaming, "strip_plan": options.strip_plan,
        "ranks": dict(sorted(by_rank.items(), key=lambda kv: int(kv[0]))),
    }
    files = dict(manifest.files)
    for metadata in results.values():
        files[metadata["file"]] = {"sha256": metadata["sha256"], "size": metadata["size"]}
    updated = dataclasses.replace(manifest, files=dict(sorted(files.items())),
                                  extra={**manifest.extra, "engines": section})
    write_manifest(directory, updated)
    return section


# -- checkpoint/artifact -> engines ----------------------------------------------------------

@dataclasses.dataclass
class BuildResult:
    artifact: Path
    exported: bool
    reused: bool
    stage: str
    engines: dict | None = None

    def summary(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "exported": self.exported, "reused": self.reused,
                "stage": self.stage, "engines": self.engines}


def artifact_differences(manifest: Manifest, config, options,
                         calibration: CalibrationRequest | None = None) -> list[str]:
    """How an existing artifact differs from what `options` (ExportOptions) would export."""
    diffs = []
    if manifest.config != config:
        diffs.append("the model config differs from the checkpoint's")
    for field in ("tp", "pp", "dtype", "quant", "kv_cache", "max_batch", "max_seq_len", "logits"):
        have, want = getattr(manifest, field), getattr(options, field)
        if have != want:
            diffs.append(f"{field.replace('_', '-')} {have} (requested {want})")
    wanted_ranks = sorted(options.ranks) if options.ranks is not None else list(range(options.tp * options.pp))
    have_ranks = sorted(e.rank for e in manifest.ranks)
    if have_ranks != wanted_ranks:
        diffs.append(f"ranks {have_ranks} (requested {wanted_ranks})")
    if manifest.quant == "fp8" and options.quant == "fp8":
        diffs += _fp8_differences(manifest, config, options, calibration)
    return diffs


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    """FP8 activation calibration as requested on the command line.

    source/samples/seq_len are compared with an existing artifact's manifest; `tokens` produces
    the [samples, seq_len] token windows (the Llama 3 tokenizer lives in runner/, which engines/
    does not import, so `llama405 build` hands its tokenizing function in). None: this command
    cannot tokenize.
    """

    source: str
    samples: int
    seq_len: int
    tokens: Callable[[], tuple[Any, str]] | None = None


def _fp8_differences(manifest: Manifest, config, options, calibration: CalibrationRequest | None) -> list[str]:
    info = manifest.extra.get("fp8") or {}
    diffs = []
    if info.get("recipe", "default") != options.fp8_recipe:
        diffs.append(f"fp8-recipe {info.get('recipe')} (requested {options.fp8_recipe})")
    wanted = list(options.quant_config.patterns(config.num_hidden_layers))
    if list(info.get("exclude", [])) != wanted:
        diffs.append(f"fp8 exclusions {info.get('exclude')} (requested {wanted})")
    if info.get("scales_from") == "calibration":
        had = info.get("calibration") or {}
        if calibration is None:
            diffs.append("activation scales from calibration (requested --calib-text none)")
        else:
            for key in ("source", "samples", "seq_len"):
                if had.get(key) != getattr(calibration, key):
                    diffs.append(f"calibration {key} {had.get(key)!r} (requested {getattr(calibration, key)!r})")
    return diffs


def prepare_artifact(checkpoint: Path, out: Path, export_options, force: bool = False, progress: bool = False,
                     log: Callable[[str], None] = print,
                     calibration: CalibrationRequest | None = None) -> tuple[Path, bool]:
    """Export `checkpoint` to `out`, or reuse `out` when its manifest matches the request and
    every file's sha256 verifies. Returns (artifact, exported)."""
    from export.checkpoint import Checkpoint
    from export.onnx_export import export_artifact
    out = Path(out)
    if out.exists() and not force:
        if not (out / MANIFEST).is_file():
            raise ArtifactError(f"{out}: exists but is not a finished artifact (no {MANIFEST}); pass --force to "
                                "replace it or choose another --out")
        manifest = load_manifest(out, only=[])
        diffs = artifact_differences(manifest, Checkpoint(checkpoint).config, export_options, calibration)
        if diffs:
            raise ArtifactError(f"{out}: an artifact from other export options is there ({'; '.join(diffs)}); "
                                "pass --force to re-export it or choose another --out")
        try:
            load_manifest(out, verify_hashes=True, only=_onnx_files(manifest))
        except ArtifactError as err:
            raise ArtifactError(f"{err} (or pass --force to re-export)") from None
        log(f"reusing {out}: its manifest matches the requested export options and every ONNX file's "
            "sha256 verifies (pass --force to re-export)")
        return out, False
    log(f"exporting {checkpoint} -> {out} (tp {export_options.tp} x pp {export_options.pp}, "
        f"{export_options.dtype}, {export_options.kv_cache} KV cache)")
    tokens, source = _calibration_tokens(Checkpoint(checkpoint), export_options, calibration)
    export_artifact(checkpoint, out, export_options, force=force, progress=progress,
                    calibration_tokens=tokens, calibration_source=source)
    return out, True


def _calibration_tokens(checkpoint, export_options, calibration: CalibrationRequest | None) -> tuple[Any, str]:
    if export_options.quant != "fp8" or calibration is None:
        return None, ""
    from export.rank_tensors import checkpoint_input_scales
    if checkpoint_input_scales(checkpoint):
        return None, ""  # a pre-quantized checkpoint carries its own input_scale tensors
    if calibration.tokens is None:
        raise InputError("--quant fp8 needs activation calibration, and build-engine cannot tokenize --calib-text "
                         "(the tokenizer lives in runner/): run `llama405 build` with the same flags, or "
                         "`llama405 export --quant fp8` first and then `build-engine --artifact ART`")
    return calibration.tokens()


def _onnx_files(manifest: Manifest) -> list[str]:
    """Files the export wrote (engines are verified separately, against their own metadata)."""
    engines = {m.get("file") for m in (manifest.extra.get("engines") or {}).get("ranks", {}).values()}
    return [rel for rel in manifest.files if rel not in engines]


def build(*, checkpoint: Path | None = None, artifact: Path | None = None, out: Path | None = None,
          export_options=None, build_overrides: dict[str, Any] | None = None, stage: str = "engine",
          force: bool = False, progress: bool = False, log: Callable[[str], None] = print,
          calibration: CalibrationRequest | None = None) -> BuildResult:
    """Checkpoint or artifact -> artifact (+ engines). Raises MissingRequirement after the ONNX
    stage when TensorRT or the GPU is missing."""
    if (checkpoint is None) == (artifact is None):
        raise InputError("pass exactly one of --checkpoint CKPT (with --out ART) or --artifact ART")
    if stage not in ("onnx", "engine"):
        raise InputError(f"--stage {stage!r}: choose onnx or engine")
    if checkpoint is not None:
        if out is None:
            raise InputError("--checkpoint needs --out ART (the artifact directory to create or reuse)")
        directory, exported = prepare_artifact(Path(checkpoint), Path(out), export_options, force, progress, log,
                                               calibration)
    else:
        directory, exported = Path(artifact), False
    result = BuildResult(directory, exported=exported, reused=not exported, stage="onnx")
    if stage == "onnx":
        if artifact is not None:
            _verify(directory, log)
        return result
    manifest = load_manifest(directory, only=[])
    options = BuildOptions.for_artifact(manifest, **(build_overrides or {}))
    missing = preflight(manifest.quant, manifest.tp, options.workers)
    if missing:
        raise MissingRequirement(missing, directory)
    if artifact is not None:
        _verify(directory, log)  # here, not earlier: hashing a 405B artifact reads every byte
    result.engines = build_engines(directory, options, log=log)
    result.stage = "engine"
    return result


def _verify(directory: Path, log: Callable[[str], None]) -> None:
    load_manifest(directory, verify_hashes=True, only=_onnx_files(load_manifest(directory, only=[])))
    log(f"using {directory}: every ONNX file's sha256 verifies")


def describe(result: BuildResult) -> str:
    if result.engines is None:
        return f"ONNX artifact ready at {result.artifact} ({'exported' if result.exported else 'reused'})"
    ranks = result.engines["ranks"]
    total = sum(m["size"] for m in ranks.values())
    return (f"built {len(ranks)} engine(s) in {result.artifact} with TensorRT {result.engines['tensorrt']}: "
            f"{total / 2**30:.2f} GiB")


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps({"missing": preflight(sys.argv[1] if len(sys.argv) > 1 else "none")}))
