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
- Optional CUDA-graph capture of decode steps over every row (static cache, seq == 1,
  `--trt-cuda-graph`): the first decode step of a batch size runs normally, then is captured
  once and replayed from then on.
- The pipeline loop, the cache allocation (torch tensors on each rank's GPU) and the split of a
  long prompt into the engine's tokens-per-step are runner/backends/base.py's; a step on some
  cache rows binds those rows' address (static cache).

Nothing here can run on a machine without TensorRT and a GPU; tests that need it are marked
`gpu` and skip elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from export.dtypes import dtype, dtype_of_trt
from export.errors import ArtifactError, InputError, InternalError, MissingRequirement
from export.kv_cache import past_of, present_of
from export.engines_record import EnginesSection, engines_section
from export.manifest import MANIFEST, Manifest, load_manifest, rank_folder
from export.onnx_export import io_names
from export.sharding import all_ranks
from export.trt_flavours import flavour as trt_flavour
from export.trt_flavours import why_engines_cannot_run
from runner.backends.base import Backend, RankSession
from runner.backends.options import TrtOptions
from runner.device import Device, Placement, local_rank

_CAPSULE_NAME = b"ncclComm_t"  # module-level: the capsule keeps a pointer to this name


def _require_runtime(directory: Path, section: EnginesSection):
    """(TensorRT module of the engines' flavour, torch), or MissingRequirement saying why this
    machine cannot run them (flavour not installed, no GPU, another GPU architecture)."""
    chosen = trt_flavour(section.flavour)
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


def communicator_capsule(comm) -> object:
    """PyCapsule "ncclComm_t" around an nccl4py Communicator's ncclComm_t (Communicator.ptr)."""
    if not getattr(comm, "ptr", 0):
        raise InternalError("the NCCL communicator is not initialised (ptr 0)")
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.c_void_p(comm.ptr), _CAPSULE_NAME, None)


class TrtRankSession(RankSession):
    """One rank's deserialized engine, execution context and stream on its GPU."""

    def __init__(self, trt, torch, directory: Path, manifest: Manifest, section: EnginesSection, rank: int,
                 placement: Placement, communicator=None, options: TrtOptions = TrtOptions()):
        self.trt, self.torch, self.rank, self.device = trt, torch, rank, torch.device(placement.torch)
        self.entry = manifest.rank(rank)
        self.in_place = manifest.cache_layout.in_place
        spec = all_ranks(manifest.tp, manifest.pp)[rank]
        graph_inputs, graph_outputs = io_names(manifest.config, spec)
        self.first, self.output_name = graph_inputs[0], graph_outputs[0]
        meta = section.ranks.get(rank)
        path = directory / self.entry.engine_path
        if meta is None or not path.is_file():
            raise ArtifactError(f"{path}: no TensorRT engine for rank {rank}; build it with `llama405 build "
                                f"--artifact {directory}` on a GPU machine with TensorRT")
        onnx_sha = manifest.files.get(self.entry.onnx_path, {}).get("sha256")
        if meta.onnx_sha256 and meta.onnx_sha256 != onnx_sha:
            raise ArtifactError(f"{path}: built from another rank{rank}/model.onnx than the artifact holds now; "
                                f"rebuild with `llama405 build --artifact {directory}`")
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self.runtime = trt.Runtime(self.logger)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
                self.engine = self.runtime.deserialize_cuda_engine(plan)  # py::buffer: no copy of the plan
            if self.engine is None:
                built_for = ", ".join(section.targets or [f"{g.name} (SM{g.sm})" for g in section.gpu])
                raise ArtifactError(f"{path}: {trt.__name__} {trt.__version__} could not deserialize it (built with "
                                    f"{section.flavour} {section.version} for {built_for}); "
                                    f"rebuild with `llama405 build --artifact {directory}` on this machine")
            flags = section.flags
            if "STRIP_PLAN" in flags:
                self._refit_from_onnx(directory / self.entry.onnx_path)
            if "WEIGHT_STREAMING" in flags:
                budget = options.weight_streaming_budget
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
        self.dtypes = {n: dtype_of_trt(self.engine.get_tensor_dtype(n)).torch for n in names}
        self.num_profiles = self.engine.num_optimization_profiles
        _, _, hi = self.engine.get_tensor_profile_shape(self.first, 0)  # [batch, seq(, hidden)]
        self.max_batch, self.max_input_len = int(hi[0]), int(hi[1])
        self.profile = 0
        self.cache: dict[str, Any] = {}
        self.cuda_graph = options.cuda_graph and self.in_place  # graphs capture fixed cache addresses
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

    def zeros(self, shape, dtype_):
        return self.torch.zeros(shape, dtype=dtype_.torch, device=self.device)

    def start(self, batch: int) -> None:
        if batch > self.max_batch:
            raise InputError(f"batch {batch} exceeds the engine's max batch {self.max_batch}; rebuild with a larger "
                             "--max-batch")
        for name, buffer in self.cache.items():
            if buffer.dtype != self.dtypes[name]:
                raise ArtifactError(f"rank {self.rank}: the engine's {name} is {self.dtypes[name]}, the manifest's "
                                    f"compute dtype {buffer.dtype}; rebuild the engines from this artifact")
        self._graphs.clear()  # captured graphs point at the previous cache buffers
        if self.in_place:
            for name in self.outputs:
                expected = past_of(name)
                if expected is not None:
                    aliased = self.engine.get_aliased_input_tensor(name)
                    if aliased not in (None, expected):
                        raise ArtifactError(f"engine output {name} aliases {aliased}, expected {expected}")

    def read_cache(self, name: str) -> np.ndarray:
        return self.cache[name].float().cpu().numpy()

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._empty.data_ptr()

    # -- one step ---------------------------------------------------------------------------

    def run(self, first, feed, rows, reduce):
        """reduce is unused: the engine's all-reduces are its own NCCL collectives."""
        torch = self.torch
        inputs = {}
        for name in self.inputs:
            if name in self.cache:
                continue
            value = first if name == self.first else feed[name]
            inputs[name] = torch.as_tensor(value).to(self.device, self.dtypes[name]).contiguous()
        cache = self.cache if rows is None else {name: buffer[rows] for name, buffer in self.cache.items()}
        outputs = self._run(inputs, cache, graph=rows is None)
        replaced = {} if self.in_place else {past: outputs[present_of(past)] for past in self.cache}
        return outputs[self.output_name], replaced

    def select_profile(self, seq: int) -> None:
        """Concat engines hold a context profile (0) and a decode profile (1)."""
        wanted = 1 if (self.num_profiles > 1 and seq == 1) else 0
        if wanted != self.profile:
            if not self.context.set_optimization_profile_async(wanted, self.stream.cuda_stream):
                raise ArtifactError(f"rank {self.rank}: could not switch to optimization profile {wanted}")
            self.profile = wanted

    def _bind(self, inputs: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
        torch, context = self.torch, self.context
        for name in self.inputs:
            tensor = cache[name] if name in cache else inputs[name]
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InputError(f"rank {self.rank}: shape {tuple(tensor.shape)} of {name} is outside the engine's "
                                 "optimization profile (rebuild with larger --max-batch / --max-input-len)")
            context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in self.outputs:
            alias = past_of(name) if self.in_place else None
            if alias is not None:
                outputs[name] = cache[alias]  # present aliases past: same device address (the rows' part)
            else:
                shape = tuple(context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, self._address(outputs[name]))
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError(f"rank {self.rank}: TensorRT execution failed (see the TensorRT log)")

    def _run(self, inputs: dict[str, Any], cache: dict[str, Any], graph: bool) -> dict[str, Any]:
        """inputs: device tensors of this rank's non-cache inputs; returns output tensors."""
        torch = self.torch
        batch, seq = inputs[self.first].shape[:2]
        graph_key = batch if (graph and self.cuda_graph and seq == 1) else None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if graph_key is not None and graph_key in self._graphs:
            captured, static_in, static_out = self._graphs[graph_key]
            with torch.cuda.stream(self.stream):
                for name, tensor in inputs.items():
                    static_in[name].copy_(tensor)
                captured.replay()
            outputs = static_out
        else:
            self.select_profile(seq)
            outputs = self._bind(inputs, cache)
            self._execute()
            if graph_key is not None:
                outputs = self._capture(graph_key, inputs, cache)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outputs

    def _capture(self, key: int, inputs: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
        """Capture this decode shape into a CUDA graph (static buffers; the step is idempotent:
        the same tokens are written to the same cache slots) and replay it once."""
        torch = self.torch
        static_in = {n: t.clone() for n, t in inputs.items()}
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the clones are written there
        static_out = self._bind(static_in, cache)
        self._execute()  # an uncaptured run after binding new addresses, before capture
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured, stream=self.stream):
            self._execute()
        captured.replay()
        self._graphs[key] = (captured, static_in, static_out)
        return static_out


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, artifact: str | Path, world=None, verify_hashes: bool = False, options: TrtOptions | None = None):
        """world: a runner.dist.ProcessWorld when each process serves one rank (torchrun, required for
        tp > 1); None runs every rank of a tp == 1 artifact in this process."""
        options = options or TrtOptions()
        self.directory = Path(artifact)
        manifest = load_manifest(self.directory, only=[])
        section = engines_section(manifest, str(self.directory / MANIFEST))
        if section is None:
            raise ArtifactError(f"{self.directory}: no TensorRT engines in this artifact; build them with "
                                f"`llama405 build --artifact {self.directory}` (--trt tensorrt on the GPU they are for)")
        trt, torch = _require_runtime(self.directory, section)
        self.trt, self.torch = trt, torch
        ranks = [world.rank] if world is not None else [e.rank for e in manifest.ranks]
        mine = [f for r in ranks for f in manifest.files if f.startswith(rank_folder(r) + "/")]
        self.manifest = m = load_manifest(self.directory, verify_hashes=verify_hashes, only=mine)
        if world is None and m.tp > 1:
            raise InputError(f"a tp {m.tp} TensorRT artifact runs one process per rank (its all-reduces are NCCL "
                             f"collectives inside the engines): torchrun --nproc-per-node {m.tp * m.pp} -m runner.cli "
                             "generate --backend trt ...")
        self._nccl = None
        self.world = world
        device = options.device or Device("cuda")
        local = local_rank() if world is not None else None
        placements = {r: device.for_rank(r, local) for r in ranks}
        if world is not None and m.tp > 1:
            self._nccl = self._tp_communicator(m.tp, placements[world.rank])
        runners = {r: TrtRankSession(trt, torch, self.directory, m, section, r, placements[r], self._nccl, options)
                   for r in ranks}
        logits = next((t for e in m.ranks for t in e.outputs if t.name == "logits"), None)
        super().__init__(config=m.config, tp=m.tp, pp=m.pp, cache_layout=m.cache_layout, max_seq_len=m.max_seq_len,
                         logits=m.logits, dtype=dtype(m.dtype), runners=runners, world=world,
                         logits_dtype=dtype(logits.dtype) if logits is not None else None)
        self.max_input_len = min(r.max_input_len for r in runners.values())

    def _tp_communicator(self, tp: int, placement: Placement):
        """One NCCL communicator per TP group (this process's stage)."""
        try:
            import nccl.core as nccl  # nccl4py (PyPI `nccl4py`)
        except ImportError as err:
            raise MissingRequirement(f"--backend trt with tp {tp} needs nccl4py for the engines' NCCL communicator "
                                     f"({err}); pip install nccl4py") from None
        world, dist = self.world, self.world.dist
        root = world.stage * tp
        payload = [bytes(nccl.get_unique_id()) if world.rank == root else None]
        dist.broadcast_object_list(payload, src=root, group=world.tp_groups[world.stage])
        unique_id = nccl.UniqueId.from_bytes(payload[0])
        with self.torch.cuda.device(placement.index):
            return nccl.Communicator.init(nranks=tp, rank=world.rank % tp, unique_id=unique_id)

    def close(self) -> None:
        """Release the NCCL communicator (collective: every rank calls it)."""
        super().close()
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None
