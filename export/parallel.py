"""Tensor-parallel styles: how one weight splits over a TP group, carried by the module owning it.

Megatron's split: q/k/v and gate/up are column-parallel (each rank holds a block of the output
rows of the HF [out, in] weight), o_proj and down_proj are row-parallel (a block of the input
columns; the partial sums are all-reduced), the embedding is vocab-parallel (a block of rows;
ids outside it contribute zeros, all-reduced) and lm_head is split over hidden (row-parallel on
its [vocab, hidden] weight). KV heads split by whole heads: a share each when tp divides them,
each head replicated over tp / n_kv ranks when tp is a multiple (405B at TP16).

The modules of export/model.py are built from these styles (their local sizes are
`style.local_shape(spec)`), and export/rank_layout.py reads the checkpoint slices back off a
meta-device build of the same modules, so the split has one owner: the module's style (the
pattern of llama-models' ColumnParallelLinear, TensorRT-LLM's `tensor_parallel_mode`).
"""

from __future__ import annotations

import abc
import dataclasses

from export.sharding import RankSpec, TensorSlice, kv_head_range


@dataclasses.dataclass(frozen=True)
class ParallelStyle(abc.ABC):
    """`full`: the tensor's whole shape as the checkpoint stores it (HF layout, [out, in] for a
    linear), KV heads counted once."""

    full: tuple[int, ...]

    @abc.abstractmethod
    def tensor_slice(self, spec: RankSpec, kv_dup_factor: int = 1) -> TensorSlice:
        """The part of the checkpoint tensor rank `spec` holds."""

    def local_shape(self, spec: RankSpec) -> tuple[int, ...]:
        """The shape of the rank's share: the module's parameter shape."""
        return self.tensor_slice(spec).local_shape(self.full)

    def checkpoint_shape(self, kv_dup_factor: int = 1) -> tuple[int, ...]:
        """The shape config.json promises for the checkpoint tensor."""
        return self.full


@dataclasses.dataclass(frozen=True)
class Replicated(ParallelStyle):
    """Every rank holds the whole tensor (norm weights)."""

    def tensor_slice(self, spec, kv_dup_factor=1):
        return TensorSlice(None)


@dataclasses.dataclass(frozen=True)
class Split(ParallelStyle):
    """Equal contiguous blocks along `axis`, block r on TP rank r."""

    axis: int

    def tensor_slice(self, spec, kv_dup_factor=1):
        if spec.tp_size == 1:
            return TensorSlice(None)
        width = self.full[self.axis] // spec.tp_size
        return TensorSlice(self.axis, ((spec.tp_rank * width, (spec.tp_rank + 1) * width),))


def column_parallel(out_features: int, in_features: int) -> Split:
    """A linear whose output features are split: its rank computes a block of the outputs."""
    return Split((out_features, in_features), axis=0)


def row_parallel(out_features: int, in_features: int) -> Split:
    """A linear whose input features are split: its rank's output is a partial sum to all-reduce."""
    return Split((out_features, in_features), axis=1)


def vocab_parallel(vocab_size: int, hidden_size: int) -> Split:
    """An embedding whose vocabulary rows are split: ids outside a rank's block contribute zeros."""
    return Split((vocab_size, hidden_size), axis=0)


@dataclasses.dataclass(frozen=True)
class KVHeadParallel(ParallelStyle):
    """Column-parallel by whole KV heads (export/sharding.py kv_head_range). kv_dup_factor > 1
    describes a checkpoint that stores each KV head that many times in a row (405B published
    with num_key_value_heads 16 for 8 distinct heads): the slice picks one copy per head."""

    heads: int
    head_dim: int

    def tensor_slice(self, spec, kv_dup_factor=1):
        if spec.tp_size == 1 and kv_dup_factor == 1:
            return TensorSlice(None)
        heads, d = kv_head_range(self.heads, spec), self.head_dim
        if kv_dup_factor == 1:
            return TensorSlice(0, ((heads.start * d, heads.stop * d),))
        return TensorSlice(0, tuple((h * kv_dup_factor * d, (h * kv_dup_factor + 1) * d) for h in heads))

    def checkpoint_shape(self, kv_dup_factor=1):
        return (self.full[0] * kv_dup_factor, *self.full[1:])


def kv_head_parallel(heads: int, head_dim: int, in_features: int) -> KVHeadParallel:
    return KVHeadParallel((heads * head_dim, in_features), heads, head_dim)
