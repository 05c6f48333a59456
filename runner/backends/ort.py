"""onnxruntime backend: the artifact's rank graphs, cut at their DistCollective nodes.

onnxruntime has no DistCollective kernel, so each rank graph runs as a chain of segments
(runner/backends/graph_split.py) and the all-reduce between two segments is done here: summed
in-process across simulated ranks, or with torch.distributed when each process is one rank.
The file that runs is the exact file TensorRT builds.

Static KV cache: each cache tensor lives in one OrtValue that is bound both as the segment's
`past_key_values.*` input and its `present.*` output, so TensorScatter updates it in place
instead of copying max_seq_len slots every step.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from export.errors import ArtifactError
from export.kv_cache import is_past, past_of, present_of
from export.manifest import Manifest, load_manifest
from export.sharding import kv_heads_local
from runner.backends.base import Backend
from runner.backends.ort_threads import OrtThreads
from runner.backends.graph_split import Segment, make_session, split_at_collectives

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def sum_in_rank_order(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


class RankRunner:
    """One rank's segments and sessions, each with one IO binding kept for the whole run.

    Tensors stay OrtValues between segments and between steps: a segment's outputs are bound
    straight into the next segment (no numpy round trip), a concat cache's presents become the
    next step's pasts as they are, and a static cache is bound once per `start` as both the
    `past_key_values.*` input and the `present.*` output of its segment (TensorScatter writes in
    place). A decode step's other graph outputs ([batch, 1, ...] logits or hidden states) are
    written into numpy arrays allocated for that step and handed to the caller as they are, so
    a static-cache decode step reads no output list back and copies nothing. Each Python call
    right after a run costs several times its warm price (the run has just streamed the weights
    through the caches): with every output read back by `get_outputs()` a 125M model's decode
    step spent 0.48 ms outside the run, now 0.37 ms (docs/genai.md). Prefill outputs come from
    onnxruntime's arena (writing a 512 x 128256 prefill's logits into fresh numpy memory instead
    was ~2 % slower).
    """

    def __init__(self, manifest: Manifest, directory: Path, rank: int, providers: Sequence, threads: OrtThreads):
        self.entry = manifest.rank(rank)
        self.cache_layout = manifest.cache_layout
        onnx_path = directory / self.entry.onnx_path
        self.segments: list[Segment] = split_at_collectives(onnx_path)
        options = threads.session_options(len(self.segments))
        rank_dir = onnx_path.parent
        self.sessions = [make_session(s, rank_dir, providers, options) for s in self.segments]
        self.bindings = [session.io_binding() for session in self.sessions]
        self.cache_names = [t.name for t in self.entry.inputs if is_past(t.name)]
        self.cache: dict[str, ort.OrtValue] = {}  # past_key_values.* -> [batch, kv_local, len, head_dim]
        self.decode_shapes: dict[str, tuple[tuple[int, ...], type]] = {}  # graph output -> decode (shape, dtype)
        # Per segment, fixed by start():
        self.step_inputs: list[list[str]] = []  # bound anew each step (all but an in-place cache)
        self.arena_outputs: list[list[str]] = []  # onnxruntime allocates them every step
        self.decode_outputs: list[list[str]] = []  # into fresh numpy on decode steps, the arena otherwise
        self.output_order: list[list[str]] = []  # binding order, which get_outputs() follows

    def start(self, batch: int, kv_heads: int, cache_len: int, head_dim: int, dtype) -> None:
        self.cache = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, kv_heads, cache_len, head_dim), dtype=dtype))
                      for name in self.cache_names}
        self.decode_shapes = {t.name: (shape, NP_DTYPES[t.dtype]) for t in self.entry.outputs
                              if past_of(t.name) is None and t.dtype in NP_DTYPES
                              and (shape := decode_shape(t.shape, batch)) is not None}
        in_place = self.cache_layout.in_place
        self.step_inputs, self.arena_outputs, self.decode_outputs, self.output_order = [], [], [], []
        for segment, binding in zip(self.segments, self.bindings):
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            aliased = [name for name in segment.outputs if in_place and past_of(name) in self.cache]
            for name in aliased:  # bound once: every step reads and writes the same buffers
                binding.bind_ortvalue_input(past_of(name), self.cache[past_of(name)])
                binding.bind_ortvalue_output(name, self.cache[past_of(name)])
            fresh = [name for name in segment.outputs if name not in aliased]
            for name in fresh:  # fixes the binding order; a rebound name keeps its place
                binding.bind_output(name, "cpu")
            bound = {past_of(name) for name in aliased}
            self.step_inputs.append([name for name in segment.inputs if name not in bound])
            self.decode_outputs.append([name for name in fresh if name in self.decode_shapes])
            self.arena_outputs.append([name for name in fresh if name not in self.decode_shapes])
            self.output_order.append(aliased + fresh)

    def run_segment(self, k: int, env: dict[str, np.ndarray | ort.OrtValue], decode: bool) -> None:
        """Run segment k on env's tensors; its fresh outputs land in env, as OrtValues or (a
        decode step's graph outputs) numpy arrays. decode: this step's sequence length is 1."""
        session, binding = self.sessions[k], self.bindings[k]
        for name in self.step_inputs[k]:
            value = self.cache[name] if name in self.cache else env[name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        owned: dict[str, np.ndarray] = {}
        for name in self.decode_outputs[k]:
            if decode:  # the caller keeps it: nothing of ours writes it again
                owned[name] = np.empty(*self.decode_shapes[name])
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(owned[name]))
            else:
                binding.bind_output(name, "cpu")
        for name in self.arena_outputs[k]:
            binding.bind_output(name, "cpu")  # onnxruntime's arena: reused across steps
        session.run_with_iobinding(binding)
        if self.arena_outputs[k] or not decode:  # else everything it wrote is bound: nothing to read back
            env.update(zip(self.output_order[k], binding.get_outputs()))
        env.update(owned)

    def absorb_presents(self, env: dict[str, np.ndarray | ort.OrtValue]) -> None:
        if not self.cache_layout.in_place:  # the presents are the next step's pasts
            for name in self.cache_names:
                self.cache[name] = env[present_of(name)]

    def read_cache(self, name: str) -> np.ndarray:
        return self.cache[name].numpy().astype(np.float32)


def decode_shape(shape: tuple, batch: int) -> tuple[int, ...] | None:
    """A graph output's shape on a decode step (seq 1), or None if other symbolic dims leave it open."""
    dims = tuple(batch if d == "batch" else 1 if d == "seq" else d for d in shape)
    return dims if all(isinstance(d, int) for d in dims) else None


def _as_numpy(value: np.ndarray | ort.OrtValue) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else value


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, artifact: str | Path, providers: Sequence = ("CPUExecutionProvider",),
                 verify_hashes: bool = False, world=None, threads: OrtThreads = OrtThreads()):
        """world: a runner.dist.ProcessWorld when each process serves one rank (torchrun);
        None simulates every rank in this process."""
        self.directory = Path(artifact)
        self.manifest = load_manifest(self.directory, verify_hashes=verify_hashes)
        m = self.manifest
        if m.dtype not in NP_DTYPES:
            raise ArtifactError(f"{self.directory}: a {m.dtype} artifact cannot run on onnxruntime's CPU "
                                "build (no bfloat16 MatMul); export with --dtype float16 or float32")
        self.config, self.tp, self.pp = m.config, m.tp, m.pp
        self.cache_layout, self.max_seq_len = m.cache_layout, m.max_seq_len
        self.dtype = NP_DTYPES[m.dtype]
        self.world = world
        wanted = [world.rank] if world is not None else list(range(m.tp * m.pp))
        self.runners = {r: RankRunner(m, self.directory, r, providers, threads) for r in wanted}

    def start_impl(self, batch: int) -> None:
        cfg = self.config
        length = self.cache_layout.buffer_len(self.max_seq_len)
        for runner in self.runners.values():
            runner.start(batch, kv_heads_local(cfg, self.tp), length, cfg.head_dim, self.dtype)

    def _reduce(self, parts: list[np.ndarray], stage: int) -> np.ndarray:
        if self.world is None:
            return sum_in_rank_order(parts)
        return self.world.all_reduce(parts[0], stage)

    def run_stage(self, stage: int, feed: dict[str, np.ndarray], first: np.ndarray) -> np.ndarray:
        """Run this process's TP ranks of one stage in lockstep; returns the stage's output."""
        ranks = [r for r in self.stage_ranks(stage) if r in self.runners]
        base = {k: v for k, v in feed.items() if k != "input_ids"}
        first_name = "input_ids" if stage == 0 else "hidden_states"
        envs = {r: {**base, first_name: first} for r in ranks}
        n_segments = len(self.runners[ranks[0]].segments)
        decode = first.shape[1] == 1
        for k in range(n_segments):
            for r in ranks:
                self.runners[r].run_segment(k, envs[r], decode)
            segment = self.runners[ranks[0]].segments[k]
            if segment.collective_input is not None:
                total = self._reduce([_as_numpy(envs[r][segment.collective_input]) for r in ranks], stage)
                for r in ranks:
                    envs[r][segment.collective_output] = total
        for r in ranks:
            self.runners[r].absorb_presents(envs[r])
        out_name = "logits" if stage == self.pp - 1 else "hidden_states"
        return _as_numpy(envs[ranks[0]][out_name])

    def infer_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {"position_ids": feed["position_ids"], "attention_mask": feed["attention_mask"]}
        x = feed["input_ids"]
        if self.world is None:
            for stage in range(self.pp):
                x = self.run_stage(stage, inputs, x)
            return x
        return self._infer_distributed(inputs, x)

    def _infer_distributed(self, inputs: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
        """This process's stage; hidden states travel down the pipeline, logits back to all."""
        world, cfg = self.world, self.config
        batch, seq = ids.shape
        hidden_shape = (batch, seq, cfg.hidden_size)
        x = ids if world.stage == 0 else world.recv(hidden_shape, self.dtype, src=world.rank - self.tp)
        out = self.run_stage(world.stage, inputs, x)
        if world.stage < self.pp - 1:
            world.send(out, dst=world.rank + self.tp)
            out = None
        rows = seq if self.manifest.logits == "all" else 1
        return world.broadcast(out, (batch, rows, cfg.vocab_size), self.dtype, src=(self.pp - 1) * self.tp)

    def read_cache(self, rank: int, name: str) -> np.ndarray:
        return self.runners[rank].read_cache(name)
