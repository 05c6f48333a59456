"""TensorRT backend: the artifact's rank{r}/engine.plan files, run through the Backend interface.

Reads the engines and the manifest's "engines" section (written by `llama405 build`) and never
imports the builder (engines/). TensorRT, a CUDA build of PyTorch and — for tp > 1 — nccl4py
are imported lazily, so this module imports everywhere and fails with one clear line where they
are missing.

- Static KV cache: one CUDA tensor per `past_key_values.*` input, bound as that input *and* as
  the matching `present.*` output. TensorRT's KV-cache update layer (IKVCacheUpdateLayer, what
  TensorScatter becomes) writes in place and requires the two to share one device address
  (include/NvInfer.h, INetworkDefinition::addKVCacheUpdate). Concat mode allocates each step's
  present and keeps it as the next past.
- Shapes are set per step (IExecutionContext.set_input_shape); prompts longer than the engine's
  largest tokens-per-step (its profile's max seq, `--max-input-len`) are prefilled in chunks.
- tp > 1: the DistCollective layers need an NCCL communicator per TP group:
  `nccl.core.get_unique_id()` on the group's first rank, its bytes sent to the others over
  torch.distributed (`bytes(uid)` / `nccl.core.UniqueId.from_bytes`, nccl4py's documented
  serialization), `nccl.core.Communicator.init(nranks=, rank=, unique_id=)`, then
  `IExecutionContext.set_communicator(capsule)` with a PyCapsule named "ncclComm_t" around
  `Communicator.ptr` — the pattern of NVIDIA/TensorRT samples/python/attention_mdtrt. Ranks run
  one per process under torchrun; a single process runs tp == 1 engines only (every pipeline
  stage in turn, each on its own GPU when there are enough).
- Optional CUDA-graph capture of decode steps (static cache, seq == 1): the first decode step
  of a batch size runs normally, then is captured once and replayed from then on.

Nothing here can run on a machine without TensorRT and a GPU; tests that need it are marked
`gpu` and skip elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ArtifactError, InputError, InternalError, MissingRequirement
from export.kv_cache import is_past, past_of, present_of
from export.manifest import Manifest, load_manifest, rank_folder
from export.trt_flavours import flavour as trt_flavour
from export.trt_flavours import why_engines_cannot_run
from export.sharding import kv_heads_local
from runner.backends.base import Backend

_CAPSULE_NAME = b"ncclComm_t"  # module-level: the capsule keeps a pointer to this name


def _require_runtime(directory: Path, section: dict):
    """(TensorRT module of the engines' flavour, torch), or MissingRequirement saying why this
    machine cannot run them (flavour not installed, no GPU, another GPU architecture)."""
    chosen = trt_flavour(section.get("flavour", "tensorrt"))
    trt = chosen.import_module()
    if trt is None or not hasattr(trt, "Runtime"):
        raise MissingRequirement(f"--backend trt: {directory}'s engines were built with {chosen.title}, which is not "
                         f"importable here; install {chosen.pip}, or use --backend ort on the same artifact")
    why = why_engines_cannot_run(section)
    if why is not None:
        raise MissingRequirement(f"--backend trt: {why}; run them on such a GPU, rebuild them here with "
                         f"`llama405 build --artifact {directory}`, or use --backend ort on the same artifact")
    import torch
    return trt, torch


def _torch_dtype(trt, torch, dtype) -> Any:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
             "FP8": torch.float8_e4m3fn}
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise ArtifactError(f"the engine uses tensor type {dtype}, which llama405's TensorRT runner does not handle")


def communicator_capsule(comm) -> object:
    """PyCapsule "ncclComm_t" around an nccl4py Communicator's ncclComm_t (Communicator.ptr)."""
    if not getattr(comm, "ptr", 0):
        raise InternalError("the NCCL communicator is not initialised (ptr 0)")
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.c_void_p(comm.ptr), _CAPSULE_NAME, None)


class RankEngine:
    """One rank's deserialized engine, execution context, stream and (static) KV cache."""

    def __init__(self, trt, torch, directory: Path, manifest: Manifest, rank: int, device: int,
                 communicator=None, weight_streaming_budget: int | None = None, cuda_graph: bool = False):
        self.trt, self.torch, self.rank, self.device = trt, torch, rank, torch.device("cuda", device)
        self.entry = manifest.rank(rank)
        self.cache_layout = manifest.cache_layout
        section = manifest.extra.get("engines") or {}
        meta = (section.get("ranks") or {}).get(str(rank))
        path = directory / self.entry.engine_path
        if meta is None or not path.is_file():
            raise ArtifactError(f"{path}: no TensorRT engine for rank {rank}; build it with `llama405 build "
                                f"--artifact {directory}` on a GPU machine with TensorRT")
        onnx_sha = manifest.files.get(self.entry.onnx_path, {}).get("sha256")
        if meta.get("onnx_sha256") and meta["onnx_sha256"] != onnx_sha:
            raise ArtifactError(f"{path}: built from another rank{rank}/model.onnx than the artifact holds now; "
                                f"rebuild with `llama405 build --artifact {directory}`")
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self.runtime = trt.Runtime(self.logger)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
                self.engine = self.runtime.deserialize_cuda_engine(plan)  # py::buffer: no copy of the plan
            if self.engine is None:
                built_for = section.get("targets") or section.get("gpu")
                raise ArtifactError(f"{path}: {trt.__name__} {trt.__version__} could not deserialize it (built with "
                                    f"{section.get('flavour')} {section.get('version')} for {built_for}); "
                                    f"rebuild with `llama405 build --artifact {directory}` on this machine")
            flags = section.get("flags", [])
            if "STRIP_PLAN" in flags:
                self._refit_from_onnx(directory / self.entry.onnx_path)
            if "WEIGHT_STREAMING" in flags:
                budget = weight_streaming_budget
                if budget is None:
                    budget = self.engine.get_weight_streaming_automatic_budget()
                self.engine.weight_streaming_budget_v2 = budget
            self.context = self.engine.create_execution_context()
            if communicator is not None and not self.context.set_communicator(communicator_capsule(communicator)):
                raise ArtifactError(f"rank {rank}: TensorRT refused the NCCL communicator (set_communicator)")
        mode = trt.TensorIOMode.INPUT
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.num_profiles = self.engine.num_optimization_profiles
        self.first = "input_ids" if "input_ids" in self.inputs else "hidden_states"  # [batch, seq(, hidden)]
        _, _, hi = self.engine.get_tensor_profile_shape(self.first, 0)
        self.max_batch, self.max_input_len = int(hi[0]), int(hi[1])
        self.profile = 0
        self.cache: dict[str, Any] = {}
        self.cuda_graph = cuda_graph and self.cache_layout.in_place  # graphs capture fixed cache addresses
        self._graphs: dict[int, tuple[Any, dict, dict]] = {}
        self._empty = torch.empty(64, dtype=torch.uint8, device=self.device)  # address for 0-size tensors

    def _refit_from_onnx(self, onnx_path: Path) -> None:
        """A STRIP_PLAN engine carries no weights: refit them from the rank's ONNX (external data)."""
        refitter = self.trt.Refitter(self.engine, self.logger)
        parser = self.trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ArtifactError(f"{onnx_path}: refitting the stripped engine failed: {errors or 'see the log'}")

    # -- cache ------------------------------------------------------------------------------

    def start(self, batch: int, kv_heads: int, head_dim: int, max_seq_len: int) -> None:
        torch = self.torch
        if batch > self.max_batch:
            raise InputError(f"batch {batch} exceeds the engine's max batch {self.max_batch}; rebuild with a larger "
                             "--max-batch")
        length = self.cache_layout.buffer_len(max_seq_len)
        self.cache = {}
        for name in self.inputs:
            if is_past(name):
                self.cache[name] = torch.zeros((batch, kv_heads, length, head_dim), dtype=self.dtypes[name],
                                               device=self.device)
        self._graphs.clear()  # captured graphs point at the previous cache buffers
        if self.cache_layout.in_place and hasattr(self.engine, "get_aliased_input_tensor"):
            for name in self.outputs:
                expected = past_of(name)
                if expected is not None:
                    aliased = self.engine.get_aliased_input_tensor(name)
                    if aliased not in (None, expected):
                        raise ArtifactError(f"engine output {name} aliases {aliased}, expected {expected}")

    def _alias(self, output: str) -> str | None:
        return past_of(output) if self.cache_layout.in_place else None

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._empty.data_ptr()

    # -- one step ---------------------------------------------------------------------------

    def select_profile(self, seq: int) -> None:
        """Concat engines hold a context profile (0) and a decode profile (1)."""
        wanted = 1 if (self.num_profiles > 1 and seq == 1) else 0
        if wanted != self.profile:
            if not self.context.set_optimization_profile_async(wanted, self.stream.cuda_stream):
                raise ArtifactError(f"rank {self.rank}: could not switch to optimization profile {wanted}")
            self.profile = wanted

    def _bind(self, inputs: dict[str, Any]) -> dict[str, Any]:
        torch, context = self.torch, self.context
        for name in self.inputs:
            tensor = self.cache[name] if name in self.cache else inputs[name]
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InputError(f"rank {self.rank}: shape {tuple(tensor.shape)} of {name} is outside the engine's "
                                 "optimization profile (rebuild with larger --max-batch / --max-input-len)")
            context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in self.outputs:
            alias = self._alias(name)
            if alias is not None:
                outputs[name] = self.cache[alias]  # present aliases past: same device address
            else:
                shape = tuple(context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, self._address(outputs[name]))
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError(f"rank {self.rank}: TensorRT execution failed (see the TensorRT log)")

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """inputs: device tensors of this rank's non-cache inputs; returns output tensors."""
        torch = self.torch
        inputs = {n: t.to(self.device, self.dtypes[n]).contiguous() for n, t in inputs.items()}
        batch, seq = inputs[self.first].shape[:2]
        cached = next(iter(self.cache.values()), None)
        if cached is not None and cached.shape[0] != batch:
            raise InputError(f"a batch of {batch} but start() prepared the KV cache for {cached.shape[0]}")
        graph_key = batch if (self.cuda_graph and seq == 1) else None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if graph_key is not None and graph_key in self._graphs:
            graph, static_in, static_out = self._graphs[graph_key]
            with torch.cuda.stream(self.stream):
                for name, tensor in inputs.items():
                    static_in[name].copy_(tensor)
                graph.replay()
            outputs = static_out
        else:
            self.select_profile(seq)
            outputs = self._bind(inputs)
            self._execute()
            if graph_key is not None:
                outputs = self._capture(graph_key, inputs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if not self.cache_layout.in_place:  # the presents are the next step's pasts
            for name in list(self.cache):
                self.cache[name] = outputs[present_of(name)]
        return outputs

    def _capture(self, key: int, inputs: dict[str, Any]) -> dict[str, Any]:
        """Capture this decode shape into a CUDA graph (static buffers; the step is idempotent:
        the same tokens are written to the same cache slots) and replay it once."""
        torch = self.torch
        static_in = {n: t.clone() for n, t in inputs.items()}
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the clones are written there
        static_out = self._bind(static_in)
        self._execute()  # an uncaptured run after binding new addresses, before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._execute()
        graph.replay()
        self._graphs[key] = (graph, static_in, static_out)
        return static_out

    def synchronize(self) -> None:
        self.stream.synchronize()


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, artifact: str | Path, world=None, verify_hashes: bool = False, cuda_graph: bool = False,
                 weight_streaming_budget: int | None = None):
        """world: a runner.dist.ProcessWorld when each process serves one rank (torchrun, required for
        tp > 1); None runs every rank of a tp == 1 artifact in this process."""
        self.directory = Path(artifact)
        manifest = load_manifest(self.directory, only=[])
        section = manifest.extra.get("engines")
        if not section:
            raise ArtifactError(f"{self.directory}: no TensorRT engines in this artifact; build them with "
                                f"`llama405 build --artifact {self.directory}` (--trt tensorrt on the GPU they are for)")
        trt, torch = _require_runtime(self.directory, section)
        self.trt, self.torch = trt, torch
        ranks = [world.rank] if world is not None else [e.rank for e in manifest.ranks]
        mine = [f for r in ranks for f in manifest.files if f.startswith(rank_folder(r) + "/")]
        self.manifest = load_manifest(self.directory, verify_hashes=verify_hashes, only=mine)
        m = self.manifest
        if world is None and m.tp > 1:
            raise InputError(f"a tp {m.tp} TensorRT artifact runs one process per rank (its all-reduces are NCCL "
                             f"collectives inside the engines): torchrun --nproc-per-node {m.tp * m.pp} -m runner.cli "
                             "generate --backend trt ...")
        self.config, self.tp, self.pp = m.config, m.tp, m.pp
        self.cache_layout, self.max_seq_len = m.cache_layout, m.max_seq_len
        self.world = world
        self._nccl = None
        count = torch.cuda.device_count()
        if world is not None:
            device = int(os.environ.get("LOCAL_RANK", world.rank)) % count
            torch.cuda.set_device(device)
            if m.tp > 1:
                self._nccl = self._tp_communicator(device)
            devices = {world.rank: device}
        else:
            devices = {r: r % count for r in ranks}
        self.runners = {r: RankEngine(trt, torch, self.directory, m, r, devices[r], self._nccl,
                                      weight_streaming_budget, cuda_graph) for r in ranks}
        self.max_input_len = min(r.max_input_len for r in self.runners.values())

    # -- distributed plumbing ----------------------------------------------------------------

    def _tp_communicator(self, device: int):
        """One NCCL communicator per TP group (this process's stage)."""
        try:
            import nccl.core as nccl  # nccl4py (PyPI `nccl4py`)
        except ImportError as err:
            raise MissingRequirement(f"--backend trt with tp {self.tp} needs nccl4py for the engines' NCCL communicator "
                             f"({err}); pip install nccl4py") from None
        world, dist = self.world, self.world.dist
        root = world.stage * self.tp
        payload = [bytes(nccl.get_unique_id()) if world.rank == root else None]
        dist.broadcast_object_list(payload, src=root, group=world.tp_groups[world.stage])
        unique_id = nccl.UniqueId.from_bytes(payload[0])
        with self.torch.cuda.device(device):
            return nccl.Communicator.init(nranks=self.tp, rank=world.rank % self.tp, unique_id=unique_id)

    # -- Backend -----------------------------------------------------------------------------

    def start_impl(self, batch: int) -> None:
        cfg = self.config
        for runner in self.runners.values():
            runner.start(batch, kv_heads_local(cfg, self.tp), cfg.head_dim, self.max_seq_len)

    def _device_inputs(self, runner: RankEngine, feed: dict[str, np.ndarray], first) -> dict[str, Any]:
        torch = self.torch
        inputs = {}
        for name in runner.inputs:
            if name in runner.cache:
                continue
            if name in ("input_ids", "hidden_states"):
                inputs[name] = first
            else:
                inputs[name] = torch.from_numpy(np.ascontiguousarray(feed[name]))
        return inputs

    def _my_stage_ranks(self, stage: int) -> list[int]:
        return [r for r in self.stage_ranks(stage) if r in self.runners]

    def _step(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(feed["input_ids"]))
        if self.world is None:
            for stage in range(self.pp):
                (rank,) = self._my_stage_ranks(stage)
                runner = self.runners[rank]
                x = runner.run(self._device_inputs(runner, feed, x))[_output_name(stage, self.pp)]
            self.runners[rank].synchronize()
            return x.float().cpu().numpy()
        world, (rank,) = self.world, list(self.runners)
        runner = self.runners[rank]
        batch, seq = feed["input_ids"].shape
        if world.stage > 0:
            x = world.recv_tensor((batch, seq, self.config.hidden_size), runner.dtypes["hidden_states"], src=rank - self.tp)
        out = runner.run(self._device_inputs(runner, feed, x))[_output_name(world.stage, self.pp)]
        runner.synchronize()
        if world.stage < self.pp - 1:
            world.send_tensor(out, dst=rank + self.tp)
            out = None
        if self.pp > 1:
            rows = seq if self.manifest.logits == "all" else 1
            out = world.broadcast_tensor(out, (batch, rows, self.config.vocab_size), _logits_dtype(self.manifest, torch),
                                  src=(self.pp - 1) * self.tp)
        return out.float().cpu().numpy()

    def _chunks(self, feed: dict[str, np.ndarray]):
        """Split a step into pieces of at most the engine's tokens-per-step."""
        seq = feed["input_ids"].shape[1]
        if seq <= self.max_input_len:
            yield feed
            return
        past = feed["attention_mask"].shape[1] - seq
        start = 0
        while start < seq:
            size = self.max_input_len
            # A growing past is a profile dim: the context profile's past range ends there.
            if self.cache_layout.past_dim_name and past + start > self.max_seq_len - self.max_input_len:
                size = 1  # beyond the context profile's past range: the decode profile takes it
            end = min(seq, start + size)
            piece = {"input_ids": feed["input_ids"][:, start:end], "position_ids": feed["position_ids"][:, start:end],
                     "attention_mask": feed["attention_mask"][:, :past + end]}
            yield piece
            start = end

    def infer_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        pieces = [self._step(piece) for piece in self._chunks(feed)]
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces, axis=1) if self.manifest.logits == "all" else pieces[-1]

    def read_cache(self, rank: int, name: str) -> np.ndarray:
        return self.runners[rank].cache[name].float().cpu().numpy()

    def close(self) -> None:
        """Release the NCCL communicator (collective: every rank calls it)."""
        super().close()
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None


def _output_name(stage: int, pp: int) -> str:
    return "logits" if stage == pp - 1 else "hidden_states"


def _logits_dtype(manifest: Manifest, torch) -> Any:
    """The logits' element type from the manifest's IO spec (every process holds all entries)."""
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    for entry in manifest.ranks:
        for spec in entry.outputs:
            if spec.name == "logits":
                return names[spec.dtype]
    return names[manifest.dtype]
