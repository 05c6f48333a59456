"""onnxruntime backend: the artifact's rank graphs, cut at their DistCollective nodes, on the CPU
or a CUDA GPU.

onnxruntime has no DistCollective kernel, so each rank graph runs as a chain of segments
(runner/backends/graph_split.py) and the all-reduce between two segments is the reduce callable
the pipeline loop (runner/backends/base.py) hands the rank: summed in-process across simulated
ranks, or over torch.distributed when each process is one rank. The file that runs is the exact
file TensorRT builds.

Every cache lives on the device of the session that writes it. A host OrtValue bound as the
in-place past/present pair of a CUDA session loses every slot but the last one written
(measured on an H200, docs/deployment.md), so on CUDA the static cache is device OrtValues bound
in place and the concat cache's presents stay device OrtValues handed over as the next pasts;
per step only ids, positions and the mask go in and the stage's output comes out. A provider
set that cannot keep caches where the session writes them is refused (MissingRequirement).
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.dtypes import dtype
from export.errors import ArtifactError, MissingRequirement
from export.kv_cache import past_of, present_of
from export.manifest import Manifest, TensorSpec, check_rank_identity, load_manifest, read_rank_identity
from export.onnx_export import io_names
from export.sharding import all_ranks
from runner.backends.base import Backend, RankSession
from runner.backends.graph_split import Segment, make_session, split_at_collectives
from runner.backends.options import OrtOptions
from runner.backends.ort_threads import OrtThreads
from runner.device import CPU, Placement, local_rank
from runner.dist import Reduce

CUDA_PROVIDER = "CUDAExecutionProvider"


def require_cuda_provider(device) -> None:
    """MissingRequirement (one line) where this onnxruntime build has no CUDA provider."""
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise MissingRequirement(f"--device {device}: onnxruntime {ort.__version__} here has no {CUDA_PROVIDER}"
                                 f"{_builds_installed()}; install the GPU build in its place (pip uninstall "
                                 "onnxruntime; pip install '.[gpu]', i.e. `make setup-gpu`), or use --device cpu")


def execution_providers(placement: Placement, tf32: bool) -> list:
    """onnxruntime's providers for one rank's sessions (CUDA first, the CPU for shape arithmetic)."""
    if placement.kind == "cpu":
        return ["CPUExecutionProvider"]
    require_cuda_provider(placement)
    # use_tf32: onnxruntime computes float32 MatMul in TF32 unless told not to (4.7e-4 off fp32 CPU
    # on the H200, docs/deployment.md); off unless --tf32, so fp32 parity holds.
    return [(CUDA_PROVIDER, {"device_id": str(placement.index), "use_tf32": "1" if tf32 else "0"}),
            "CPUExecutionProvider"]


def _builds_installed() -> str:
    """' (both onnxruntime and onnxruntime-gpu are installed ...)' where that is why, else ''."""
    names = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            names.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if len(names) < 2:
        return ""
    return f" (both {' and '.join(names)} are installed: one module, the last installed wins)"


def _host(value: Any) -> np.ndarray:
    """An OrtValue (any device), a torch tensor or an array as a host array."""
    if isinstance(value, ort.OrtValue):
        return value.numpy()
    if isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    return value


def decode_shape(shape: tuple, batch: int) -> tuple[int, ...] | None:
    """A graph output's shape on a decode step (seq 1), or None if other symbolic dims leave it open."""
    dims = tuple(batch if d == "batch" else 1 if d == "seq" else d for d in shape)
    return dims if all(isinstance(d, int) for d in dims) else None


@dataclasses.dataclass
class _SegmentIO:
    """How one segment's tensors are bound, fixed by start()."""

    step_inputs: list[str]  # bound anew each step (all but an in-place cache)
    aliased: list[str]  # present.* written in place into the past buffer (static cache)
    to_host: list[str]  # graph outputs (logits, hidden states): host memory
    on_device: list[str]  # what the next segment or step reads (concat presents, boundary tensors)
    order: list[str]  # binding order, which get_outputs() follows


class OrtRankSession(RankSession):
    """One rank's segments and sessions, each with one IO binding kept for the whole run.

    Tensors stay OrtValues between segments and between steps: a segment's outputs are bound
    straight into the next segment (no numpy round trip), a concat cache's presents become the
    next step's pasts as they are, and a static cache is bound as both the `past_key_values.*`
    input and the `present.*` output of its segment (TensorScatter writes in place) — the whole
    buffer, or the rows a step names (bind_input/bind_output at the rows' address, so a batch-1
    prefill writes its row of the batch cache in place on the CPU and on CUDA alike). A decode
    step's graph outputs ([batch, 1, ...] logits or hidden states) are written into numpy arrays
    allocated for that step and handed to the caller as they are, so a static-cache decode step
    reads no output list back and copies nothing. Each Python call right after a run costs
    several times its warm price (the run has just streamed the weights through the caches): with
    every output read back by `get_outputs()` a 125M model's decode step spent 0.48 ms outside
    the run, now 0.37 ms (docs/genai.md). Prefill outputs come from onnxruntime's arena (writing a
    512 x 128256 prefill's logits into fresh numpy memory instead was ~2 % slower).
    """

    def __init__(self, manifest: Manifest, directory: Path, rank: int, placement: Placement, options: OrtOptions):
        self.rank, self.placement = rank, placement
        self.entry = manifest.rank(rank)
        self.in_place = manifest.cache_layout.in_place
        spec = all_ranks(manifest.tp, manifest.pp)[rank]
        inputs, outputs = io_names(manifest.config, spec)
        self.first_name, self.output_name = inputs[0], outputs[0]
        onnx_path = directory / self.entry.onnx_path
        check_rank_identity(read_rank_identity(onnx_path), onnx_path, manifest, self.entry)
        self.segments: list[Segment] = split_at_collectives(onnx_path)
        providers = execution_providers(placement, options.tf32)
        # One SessionOptions per session: make_session adds the external-data folder to it, and a
        # reused one makes onnxruntime warn once per segment that the key already exists.
        self.sessions = [make_session(s, onnx_path.parent, providers, options.threads.session_options(len(self.segments)))
                         for s in self.segments]
        if placement.kind == "cuda":
            for session in self.sessions:
                if session.get_providers()[0] != CUDA_PROVIDER:  # onnxruntime falls back to the CPU silently
                    raise MissingRequirement(f"--device {placement}: onnxruntime could not start {CUDA_PROVIDER} for "
                                             f"rank {rank} (it fell back to {session.get_providers()}; see its log "
                                             "for the CUDA/cuDNN library it missed); fix the CUDA install or use "
                                             "--device cpu")
        self.bindings = [session.io_binding() for session in self.sessions]
        self.output_specs: dict[str, TensorSpec] = {t.name: t for t in self.entry.outputs if past_of(t.name) is None}
        self.io: list[_SegmentIO] = []
        self._bound_rows: tuple | None = None  # the cache rows bound in place now
        self.cache: dict[str, ort.OrtValue] = {}

    # -- cache ------------------------------------------------------------------------------------

    def zeros(self, shape, dtype_):
        self.cache_dtype = dtype_
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype_.numpy), self.placement.kind,
                                                self.placement.index)

    def start(self, batch: int) -> None:
        self.io = []
        for segment, binding in zip(self.segments, self.bindings):
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            aliased = [name for name in segment.outputs if self.in_place and past_of(name) in self.cache]
            for name in aliased:  # bound first: their place in get_outputs() never changes
                binding.bind_ortvalue_input(past_of(name), self.cache[past_of(name)])
                binding.bind_ortvalue_output(name, self.cache[past_of(name)])
            fresh = [name for name in segment.outputs if name not in aliased]
            for name in fresh:  # fixes the binding order; a rebound name keeps its place
                binding.bind_output(name, "cpu")
            bound = {past_of(name) for name in aliased}
            self.io.append(_SegmentIO(
                step_inputs=[name for name in segment.inputs if name not in bound], aliased=aliased,
                to_host=[name for name in fresh if name in self.output_specs],
                on_device=[name for name in fresh if name not in self.output_specs], order=aliased + fresh))
        self._bound_rows = (None, None)

    def _bind_rows(self, rows: slice | None) -> None:
        """Bind the static cache in place: whole buffers (rows None) or the rows' part of each."""
        key = (None, None) if rows is None else (rows.start, rows.stop)
        if key == self._bound_rows:
            return
        kind, index = self.placement.kind, self.placement.index
        for io, binding in zip(self.io, self.bindings):
            for present in io.aliased:
                past = past_of(present)
                buffer = self.cache[past]
                if rows is None:
                    binding.bind_ortvalue_input(past, buffer)
                    binding.bind_ortvalue_output(present, buffer)
                    continue
                shape = buffer.shape()
                row_bytes = buffer.tensor_size_in_bytes() // shape[0]
                address = buffer.data_ptr() + rows.start * row_bytes  # rows are the outermost dim: contiguous
                part = [rows.stop - rows.start, *shape[1:]]
                binding.bind_input(past, kind, index, self.cache_dtype.numpy, part, address)
                binding.bind_output(present, kind, index, self.cache_dtype.numpy, part, address)
        self._bound_rows = key

    def read_cache(self, name: str) -> np.ndarray:
        return self.cache[name].numpy().astype(np.float32)

    # -- one step ---------------------------------------------------------------------------------

    def run(self, first, feed, rows, reduce: Reduce):
        batch, seq = feed["position_ids"].shape
        env: dict[str, Any] = {"position_ids": feed["position_ids"], "attention_mask": feed["attention_mask"],
                               self.first_name: _host(first)}
        if self.in_place:
            self._bind_rows(rows)
        for k, segment in enumerate(self.segments):
            self._run_segment(k, env, batch, decode=seq == 1)
            if segment.collective_input is not None:
                env[segment.collective_output] = reduce(_host(env[segment.collective_input]))
        replaced = {} if self.in_place else {past: env[present_of(past)] for past in self.cache}
        return _host(env[self.output_name]), replaced

    def _run_segment(self, k: int, env: dict[str, Any], batch: int, decode: bool) -> None:
        """Run segment k on env's tensors; its fresh outputs land in env, as OrtValues or (a
        decode step's graph outputs) numpy arrays."""
        session, binding, io = self.sessions[k], self.bindings[k], self.io[k]
        for name in io.step_inputs:
            value = self.cache[name] if name in self.cache else env[name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        owned: dict[str, np.ndarray] = {}
        for name in io.to_host:
            spec = self.output_specs[name]
            shape = decode_shape(spec.shape, batch) if decode else None
            if shape is not None:  # the caller keeps it: nothing of ours writes it again
                owned[name] = np.empty(shape, dtype=dtype(spec.dtype).numpy)
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(owned[name]))
            else:
                binding.bind_output(name, "cpu")  # onnxruntime's arena, copied to the host on CUDA
        for name in io.on_device:
            binding.bind_output(name, self.placement.kind, self.placement.index)  # the arena, on the device
        session.run_with_iobinding(binding)
        if len(owned) < len(io.to_host) or io.on_device:  # else everything it wrote is bound: nothing to read
            env.update(zip(io.order, binding.get_outputs()))
        env.update(owned)


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, artifact: str | Path, verify_hashes: bool = False, world=None,
                 options: OrtOptions | None = None, threads: OrtThreads | None = None):
        """world: a runner.dist.ProcessWorld when each process serves one rank (torchrun);
        None simulates every rank in this process. threads: shorthand for options.threads."""
        options = options or OrtOptions()
        if threads is not None:
            options = dataclasses.replace(options, threads=threads)
        self.directory = Path(artifact)
        self.manifest = m = load_manifest(self.directory, verify_hashes=verify_hashes)
        device = options.device or CPU
        compute = dtype(m.dtype)
        if device.is_cuda:
            require_cuda_provider(device)
        if not device.is_cuda and not compute.ort_runs_on_cpu:
            raise ArtifactError(f"{self.directory}: a {m.dtype} artifact cannot run on onnxruntime's CPU "
                                "provider (no bfloat16 MatMul); export with --dtype float16 or float32, or "
                                "run it with --device cuda")
        wanted = [world.rank] if world is not None else [s.rank for s in all_ranks(m.tp, m.pp)]
        local = local_rank() if world is not None else None
        runners = {r: OrtRankSession(m, self.directory, r, device.for_rank(r, local), options) for r in wanted}
        logits = next((t for e in m.ranks for t in e.outputs if t.name == "logits"), None)
        super().__init__(config=m.config, tp=m.tp, pp=m.pp, cache_layout=m.cache_layout, max_seq_len=m.max_seq_len,
                         logits=m.logits, dtype=compute, runners=runners, world=world,
                         logits_dtype=dtype(logits.dtype) if logits is not None else None)
        self.device = device
