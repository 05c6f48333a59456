"""What every backend offers the generation loop and the parity harness.

A backend is a stateful session over one model (all its ranks): `start(batch)` clears the KV
cache, `infer(feed)` runs one forward step and keeps the cache, `cache()` returns the cache in
the model's logical layout so two backends can be compared tensor by tensor.

feed:    input_ids int64 [batch, seq]; position_ids int64 [batch, seq];
         attention_mask int64 [batch, past + seq] (1 = real token in that cache slot), both cache
         modes: the step occupies the last `seq` slots of every sequence
outputs: logits float32 [batch, seq, vocab] ([batch, 1, vocab] for a logits="last" artifact)
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np

from export.config import LlamaConfig
from export.errors import ArtifactError, InputError
from export.kv_cache import PARTS, KVCacheLayout, past_name
from export.sharding import stage_layers


FEED_NAMES = ("input_ids", "position_ids", "attention_mask")


class Backend(abc.ABC):
    """The lifecycle every backend shares (Polygraphy's BaseRunner): `start(batch)`, then one
    `infer(feed)` per step, `cache()` to compare, `close()` (or `with backend:`).

    `infer` checks the feed once, here — token ids and positions in range, the cache large
    enough, the batch the one `start` prepared — and hands the subclass's `infer_impl`
    contiguous int64 arrays; `cache` gathers every layer through the subclass's `read_cache`.
    Subclasses set config, tp, pp, cache_layout, max_seq_len (and world, for torchrun) and write
    start_impl, infer_impl and read_cache.
    """

    name: str
    config: LlamaConfig
    tp: int
    pp: int
    cache_layout: KVCacheLayout
    max_seq_len: int
    world = None  # a runner.dist.ProcessWorld when each process serves one rank
    batch: int | None = None  # set by start()

    def start(self, batch: int) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch {batch!r} must be a positive integer")
        self.start_impl(batch)
        self.batch = batch

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """feed: FEED_NAMES (module docstring); returns {"logits": float32}."""
        if self.batch is None:
            raise InputError(f"{self.name} backend: call start(batch) before infer()")
        missing = [n for n in FEED_NAMES if n not in feed]
        if missing:
            raise InputError(f"the feed lacks {', '.join(missing)} (make it with runner.backends.base.make_feed)")
        check_feed(feed, self.config, self.max_seq_len, self.cache_layout)
        if feed["input_ids"].shape[0] != self.batch:
            raise InputError(f"a batch of {feed['input_ids'].shape[0]} but start() prepared the KV cache for "
                             f"{self.batch}; call start() again for a new batch")
        feed = {n: np.ascontiguousarray(feed[n], dtype=np.int64) for n in FEED_NAMES}
        return {"logits": self.infer_impl(feed).astype(np.float32, copy=False)}

    def cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return gather_cache(self.config, self.tp, self.pp, self.read_cache, multi_process=self.world is not None)

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

    # -- what a backend implements ---------------------------------------------------------

    @abc.abstractmethod
    def start_impl(self, batch: int) -> None:
        """Empty caches for `batch` sequences (every cache layout's buffer_len slots)."""

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One step over checked, contiguous int64 FEED_NAMES; the logits [batch, seq or 1, vocab]."""

    @abc.abstractmethod
    def read_cache(self, rank: int, name: str) -> np.ndarray:
        """float32 [batch, kv_local, len, head_dim] of one rank's cache tensor past_key_values.{i}.{part}."""


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
