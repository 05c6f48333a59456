"""What every backend offers the generation loop and the parity harness, and the one pipeline loop.

A backend is a stateful session over one model (all its ranks): `start(batch)` allocates
`batch` cache rows, `infer(feed, rows=None)` runs one forward step through every pipeline stage
and keeps the cache, `cache()` returns the cache in the model's logical layout so two backends
can be compared tensor by tensor.

feed:    input_ids int64 [batch, seq]; position_ids int64 [batch, seq];
         attention_mask int64 [batch, W] (1 = a real token in that cache slot, this step's included)
rows:    a slice of the cache rows the feed's batch maps to (None = all rows; the static layout
         only): a newcomer's prefill is a batch-1 infer on its row, written in place
outputs: logits float32 [batch, seq, vocab] ([batch, 1, vocab] for a logits="last" artifact)

`Backend` owns everything the backends share (Polygraphy's BaseRunner): the feed checks, the
cache lifecycle (allocated once per start, every rank, in the layout's buffer length, on each
rank's device), the pipeline/TP lockstep (`_run_stage`, `_step`: hidden states to the next
stage, the last stage's logits to every process, the in-process or torchrun all-reduce), the
finite check of every step, and the split of a step into pieces a backend can take. A backend
implements one `RankSession` per rank: a zeroed buffer on its device, one stage-rank run given
a reduce callable, and reading its cache back.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from export.config import LlamaConfig
from export.dtypes import Dtype
from export.errors import ArtifactError, InputError, Llama405Error
from export.kv_cache import PARTS, KVCacheLayout, is_past, past_name
from export.logits import logits_named
from export.onnx_export import io_names
from export.sharding import RankSpec, all_ranks, kv_heads_local, stage_layers
from runner.dist import LocalAllReduce, Reduce, run_in_lockstep

FEED_NAMES = ("input_ids", "position_ids", "attention_mask")


class NonFiniteOutput(Llama405Error):
    """A step produced NaN/Inf (weights hit by bad bytes, or an overflow): the run stops there."""


def logits_positions(logits: str, seq: int) -> int:
    """Positions of logits a step returns (export/logits.py owns the kinds)."""
    return logits_named(logits).rows(seq)


class RankSession(abc.ABC):
    """One rank's part of a step, on its device: what a backend implements.

    `cache` (past_key_values.* -> buffer, in the rank graph's input order) is set by
    Backend.start from buffers this session's `zeros` made; `run` reads and writes it."""

    rank: int
    cache: dict[str, Any]

    @abc.abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: Dtype) -> Any:
        """A zero-filled cache buffer on this rank's device."""

    def start(self, batch: int) -> None:  # noqa: B027 (an optional hook: most sessions bind nothing per batch)
        """Called once the cache is allocated for `batch` rows (bindings that depend on it)."""

    @abc.abstractmethod
    def run(self, first: Any, feed: dict[str, np.ndarray], rows: slice | None,
            reduce: Reduce) -> tuple[Any, dict[str, Any]]:
        """This rank's stage: `first` is input_ids (the first stage) or the previous stage's
        hidden states (numpy or torch); feed holds position_ids and attention_mask; rows selects
        the cache rows (None: all). `reduce` is the TP all-reduce(sum), called by every rank of
        the stage in the same order. Returns (the stage's output: hidden states or logits,
        {past name: buffer} for cache tensors this step replaced — the concat layout's presents,
        which become the next step's pasts; empty when the step wrote the cache in place)."""

    @abc.abstractmethod
    def read_cache(self, name: str) -> np.ndarray:
        """float32 [batch, kv_local, len, head_dim] of past_key_values.{i}.{part}."""


class Backend(abc.ABC):
    """The lifecycle every backend shares: `start(batch)`, then one `infer(feed, rows)` per step,
    `cache()` to compare, `close()` (or `with backend:`)."""

    name: str
    world = None  # a runner.dist.ProcessWorld when each process serves one rank
    batch: int | None = None  # set by start()
    max_input_len: int | None = None  # tokens per step a rank takes at most (TensorRT profiles); None: any

    def __init__(self, *, config: LlamaConfig, tp: int, pp: int, cache_layout: KVCacheLayout, max_seq_len: int,
                 logits: str, dtype: Dtype, runners: dict[int, RankSession], world=None,
                 logits_dtype: Dtype | None = None):
        """dtype: the compute dtype (caches, hidden states); runners: the ranks this process serves."""
        self.config, self.tp, self.pp = config, tp, pp
        self.cache_layout, self.max_seq_len, self.logits = cache_layout, max_seq_len, logits
        self.dtype, self.logits_dtype = dtype, logits_dtype or dtype
        self.runners, self.world = runners, world
        self.specs = {spec.rank: spec for spec in all_ranks(tp, pp)}
        self._groups = [LocalAllReduce(tp) for _ in range(pp)]  # in-process TP all-reduce per stage
        self.step = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, batch: int) -> None:
        """Allocate `batch` zeroed cache rows on every rank (the layout's buffer length)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch {batch!r} must be a positive integer")
        cfg = self.config
        shape = (batch, kv_heads_local(cfg, self.tp), self.cache_layout.buffer_len(self.max_seq_len), cfg.head_dim)
        self.batch = None
        for rank, session in self.runners.items():
            session.cache = {}  # the previous batch's buffers go before the new ones are made
            session.cache = {name: session.zeros(shape, self.dtype) for name in cache_names(cfg, self.specs[rank])}
            session.start(batch)
        self.batch, self.step = batch, 0

    def infer(self, feed: dict[str, np.ndarray], rows: slice | None = None) -> dict[str, np.ndarray]:
        """feed: FEED_NAMES (module docstring); returns {"logits": float32}."""
        if self.batch is None:
            raise InputError(f"{self.name} backend: call start(batch) before infer()")
        missing = [n for n in FEED_NAMES if n not in feed]
        if missing:
            raise InputError(f"the feed lacks {', '.join(missing)} (make it with runner.backends.base.make_feed)")
        check_feed(feed, self.config, self.max_seq_len, self.cache_layout)
        rows = self._check_rows(rows, feed["input_ids"].shape[0])
        feed = {n: np.ascontiguousarray(feed[n], dtype=np.int64) for n in FEED_NAMES}
        pieces = [self._step(piece, rows) for piece in self._pieces(feed)]
        seq = feed["input_ids"].shape[1]
        every = logits_positions(self.logits, seq) == seq  # each piece returned its positions' logits
        logits = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1) if every else pieces[-1]
        self.step += 1
        return {"logits": logits}

    def cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return gather_cache(self.config, self.tp, self.pp, lambda r, name: self.runners[r].read_cache(name),
                            multi_process=self.world is not None)

    def stage_ranks(self, stage: int) -> list[int]:
        return [stage * self.tp + t for t in range(self.tp)]

    def close(self) -> None:
        """End the session: a later infer() needs start() again. Backends holding more than
        memory (TensorRT's NCCL communicator) release it too; idempotent."""
        self.batch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # -- the pipeline ----------------------------------------------------------------------------

    def _check_rows(self, rows: slice | None, batch: int) -> slice | None:
        if rows is None:
            if batch != self.batch:
                raise InputError(f"a batch of {batch} but start() prepared the KV cache for {self.batch}; "
                                 "call start() again for a new batch, or pass rows=")
            return None
        if not self.cache_layout.in_place:  # concat: presents = concat(past, new) over every row in lockstep
            raise InputError(f"rows={rows}: the {self.cache_layout.name} KV cache steps every row together; "
                             "writing some rows needs a static-cache artifact (--kv-cache static)")
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise InputError(f"rows={rows!r}: pass a slice of consecutive cache rows, e.g. slice(r, r + 1)")
        start, stop = rows.start, rows.stop
        if start is None or stop is None or not 0 <= start < stop <= self.batch:
            raise InputError(f"rows={rows}: the cache holds rows 0..{self.batch - 1} (start() made {self.batch})")
        if stop - start != batch:
            raise InputError(f"a batch of {batch} for rows {start}..{stop - 1} ({stop - start} rows)")
        return slice(start, stop)

    def _step(self, feed: dict[str, np.ndarray], rows: slice | None) -> np.ndarray:
        """One step through every stage this process serves; the logits on every process."""
        batch, seq = feed["input_ids"].shape
        world, x = self.world, feed["input_ids"]
        stages = range(self.pp) if world is None else (world.stage,)
        for stage in stages:
            if world is not None and stage > 0:  # the previous stage's hidden states
                x = world.recv_tensor((batch, seq, self.config.hidden_size), self.dtype.torch,
                                      src=world.rank - self.tp)
            x = self._run_stage(stage, x, feed, rows)
            if world is None:
                self._check_finite(x, stage)
            elif stage < self.pp - 1:
                world.send_tensor(as_tensor(x), dst=world.rank + self.tp)
                x = None
        if world is not None and self.pp > 1:  # the last stage's logits to every process
            shape = (batch, logits_positions(self.logits, seq), self.config.vocab_size)
            x = world.broadcast_tensor(None if x is None else as_tensor(x), shape, self.logits_dtype.torch,
                                       src=(self.pp - 1) * self.tp)
        if world is not None:  # every process holds the same logits: every one stops alike
            self._check_finite(x, self.pp - 1)
        return host_float32(x)

    def _run_stage(self, stage: int, x: Any, feed: dict[str, np.ndarray], rows: slice | None) -> Any:
        """This process's ranks of one stage in lockstep; the stage's output (identical on every
        TP rank after its last all-reduce)."""
        ranks = [r for r in self.stage_ranks(stage) if r in self.runners]
        if self.world is not None:
            reducers, group = [self.world.reducer(stage)], None
        else:
            group = self._groups[stage]
            reducers = [group.for_rank(self.specs[r].tp_rank) for r in ranks]
        results = run_in_lockstep([lambda s=self.runners[r], reduce=reduce: s.run(x, feed, rows, reduce)
                                   for r, reduce in zip(ranks, reducers)], group)
        for r, (_, replaced) in zip(ranks, results):
            self.runners[r].cache.update(replaced)
        return results[0][0]

    def _check_finite(self, x: Any, stage: int) -> None:
        finite = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
        if not finite:
            ranks = self.stage_ranks(stage)
            who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
            what = "logits" if stage == self.pp - 1 else "hidden states"
            raise NonFiniteOutput(f"{who} (stage {stage}) returned non-finite {what} (NaN/Inf) at step {self.step} "
                                  "(step 0 = the first after start); the weights hold NaN/Inf or the values "
                                  "overflow the dtype: run `llama405 verify` on the artifact, or re-export")

    def _pieces(self, feed: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The step split into pieces of at most max_input_len tokens (TensorRT's profiles)."""
        seq = feed["input_ids"].shape[1]
        if self.max_input_len is None or seq <= self.max_input_len:
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
            yield {"input_ids": feed["input_ids"][:, start:end], "position_ids": feed["position_ids"][:, start:end],
                   "attention_mask": feed["attention_mask"][:, :past + end]}
            start = end


def cache_names(cfg: LlamaConfig, spec: RankSpec) -> list[str]:
    """The rank graph's cache inputs past_key_values.{i}.key/value, in input order."""
    return [name for name in io_names(cfg, spec)[0] if is_past(name)]


def as_tensor(x: Any) -> torch.Tensor:
    """A stage output as a torch tensor (arrays copied: onnxruntime's may be read-only)."""
    return torch.tensor(x) if isinstance(x, np.ndarray) else x


def host_float32(x: Any) -> np.ndarray:
    """A stage output (numpy or torch, any device) as float32 numpy."""
    if isinstance(x, torch.Tensor):
        return x.float().cpu().numpy()
    return np.asarray(x).astype(np.float32, copy=False)


def check_feed(feed: dict[str, np.ndarray], cfg: LlamaConfig, max_seq_len: int, cache: KVCacheLayout) -> None:
    """Reject requests the graph would silently get wrong (ids past the vocab or the RoPE tables,
    cache overflow)."""
    vocab_size, positions_end = cfg.vocab_size, cfg.max_position_embeddings
    ids, positions = feed["input_ids"], feed["position_ids"]
    if ids.ndim != 2 or ids.shape != positions.shape:
        raise InputError(f"input_ids {ids.shape} and position_ids {positions.shape} must both be [batch, seq]")
    _check_range(ids, vocab_size, lambda bad: f"token id {bad} is outside the vocabulary 0..{vocab_size - 1}; "
                 "check the tokenizer matches the checkpoint")
    _check_range(positions, positions_end, lambda bad: f"position id {bad} is outside 0..{positions_end - 1}, the "
                 "positions this checkpoint supports (max_position_embeddings in config.json)")
    cache.check_fits(past_len(feed), max_seq_len)


def _check_range(values: np.ndarray, end: int, message: Callable[[int], str]) -> None:
    """values all in 0..end-1, or InputError(message(the value furthest out))."""
    if not values.size:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= end:
        raise InputError(message(high if high >= end else low))


def past_len(feed: dict[str, np.ndarray]) -> int:
    """Cache slots in use once this step has run."""
    return feed["attention_mask"].shape[1]


def make_feed(input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": input_ids.astype(np.int64), "position_ids": position_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64)}


def logical_kv(per_rank: list[np.ndarray], cfg: LlamaConfig, tp: int) -> np.ndarray:
    """Join one layer's rank caches [batch, kv_local, len, dim] into [batch, kv_heads, len, dim]."""
    if tp > cfg.num_key_value_heads:
        per_rank = per_rank[:: tp // cfg.num_key_value_heads]  # replicated heads: one copy each
    return np.concatenate(per_rank, axis=1)


def gather_cache(cfg: LlamaConfig, tp: int, pp: int, read: Callable[[int, str], np.ndarray],
                 multi_process: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every layer's (key, value) in logical layout; read(rank, "past_key_values.{i}.key") gives
    that rank's float32 cache tensor."""
    if multi_process:
        raise ArtifactError("the KV cache of a multi-process run is spread over the processes; "
                            "compare caches in a single-process (simulated) run")
    layers = []
    for stage in range(pp):
        ranks = [stage * tp + t for t in range(tp)]
        for layer in stage_layers(cfg.num_hidden_layers, pp, stage):
            layers.append(tuple(logical_kv([read(r, past_name(layer, part)) for r in ranks], cfg, tp)
                                for part in PARTS))
    return layers
