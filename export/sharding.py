"""Tensor- and pipeline-parallel ranks as pure functions of (config, tp, pp, rank): which ranks
exist, which layers a stage holds, how many heads a rank holds, what a slice of a checkpoint
tensor is. How each weight splits is its module's style (export/parallel.py); the rank's tensor
names, slices and shapes are read off the modules (export/rank_layout.py).
"""

from __future__ import annotations

import dataclasses
import re

from export.config import LlamaConfig
from export.errors import ShardingError


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """One process of a tp x pp deployment. Global rank = pp_rank * tp_size + tp_rank."""

    tp_rank: int
    tp_size: int
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def all_ranks(tp: int, pp: int = 1) -> list[RankSpec]:
    return [RankSpec(t, tp, p, pp) for p in range(pp) for t in range(tp)]


def parse_rank_list(text: str, world: int) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; every rank checked against the world size."""
    ranks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ShardingError(f"--ranks {text!r}: {part!r} is not a rank or a range like 0-7")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ShardingError(f"--ranks {text!r}: {part!r} is reversed; write the range low-high ({hi}-{lo})")
        if hi >= world:
            raise ShardingError(f"--ranks {text!r}: {part!r} is outside 0-{world - 1} (tp x pp = {world})")
        ranks.extend(range(lo, hi + 1))
    return sorted(set(ranks))


def validate_parallelism(cfg: LlamaConfig, tp: int, pp: int = 1, source: str = "--tp") -> None:
    if tp < 1 or pp < 1:
        raise ShardingError(f"{source}: tp={tp}, pp={pp} must both be >= 1")
    n_kv = cfg.num_key_value_heads
    if cfg.num_attention_heads % tp:
        raise ShardingError(f"{source}: tp={tp} does not divide num_attention_heads="
                            f"{cfg.num_attention_heads}; pick a tp that divides it")
    if n_kv % tp and tp % n_kv:
        raise ShardingError(f"{source}: tp={tp} neither divides num_key_value_heads={n_kv} nor is "
                            f"a multiple of it; use a tp that divides {n_kv} or a multiple of {n_kv}")
    for name in ("intermediate_size", "hidden_size", "vocab_size"):
        if getattr(cfg, name) % tp:
            raise ShardingError(f"{source}: tp={tp} does not divide {name}={getattr(cfg, name)}")
    if pp > cfg.num_hidden_layers:
        raise ShardingError(f"--pp {pp}: more pipeline stages than num_hidden_layers="
                            f"{cfg.num_hidden_layers}")


def heads_local(cfg: LlamaConfig, tp: int) -> int:
    return cfg.num_attention_heads // tp


def kv_heads_local(cfg: LlamaConfig, tp: int) -> int:
    """KV heads one rank holds: a share when tp divides them, one replicated head otherwise."""
    return max(cfg.num_key_value_heads // tp, 1)


def kv_head_range(n_kv: int, spec: RankSpec) -> range:
    """Indices of the (deduplicated) KV heads of n_kv this rank holds: a share when tp divides
    them, one head replicated over tp / n_kv ranks otherwise."""
    tp = spec.tp_size
    if tp <= n_kv:
        per = n_kv // tp
        return range(spec.tp_rank * per, (spec.tp_rank + 1) * per)
    head = spec.tp_rank // (tp // n_kv)
    return range(head, head + 1)


def stage_layers(n_layers: int, pp: int, pp_rank: int) -> range:
    """Contiguous, balanced layer ranges; the first n_layers % pp stages take one extra."""
    base, extra = divmod(n_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


@dataclasses.dataclass(frozen=True)
class TensorSlice:
    """Which part of a checkpoint tensor a rank holds: row or column blocks, concatenated.

    axis None means the whole tensor (replicated). Blocks are [start, stop) along `axis` of the
    tensor as stored in the checkpoint; several blocks appear only when duplicated KV heads are
    skipped.
    """

    axis: int | None
    blocks: tuple[tuple[int, int], ...] = ()

    def local_shape(self, file_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(file_shape)
        shape = list(file_shape)
        shape[self.axis] = sum(stop - start for start, stop in self.blocks)
        return tuple(shape)
