"""How a rank graph keeps each layer's keys and values between steps: one layout object per
artifact, chosen once from `--kv-cache` (the manifest's `kv_cache` names it), and asked by the
model, the exporter, the engine builder and every backend instead of branching on the name.

- `static`: one [batch, kv_heads, max_seq_len, head_dim] buffer per layer and K/V, written in
  place (TensorScatter, `present.*` aliases `past_key_values.*`). Each row writes at its own
  slot: row b's `seq` new keys/values go to slots [s_b, s_b + seq), s_b = max(0, last_b + 1 - seq),
  last_b = the last nonzero slot of attention_mask row b ([batch, W], this step included), so
  one step can carry rows at different lengths (continuous batching). Attention reads slots
  [0, W), masked per row; W is the runner's choice (the longest live row, or max_seq_len for
  fixed decode shapes: docs/batching.md). A request must fit max_seq_len.
- `concat`: the past grows by the step (`present = Concat(past, new)`); the runner hands each
  step's present back as the next past. Every row writes at W - seq (lockstep). Its length is
  bounded by the engines' profiles only.

Right-padded rows at their own lengths and onnxruntime-genai's left-padded lockstep batches
both satisfy the static rule (genai's new tokens are always the mask's last columns).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING

from export.errors import ConfigError, InputError

if TYPE_CHECKING:  # torch is imported by the updates only: manifest readers and the planner stay light
    import torch


PAST = "past_key_values."  # graph inputs:  past_key_values.{layer}.key / .value
PRESENT = "present."  # graph outputs: present.{layer}.key / .value (onnxruntime-genai's names too)
PARTS = ("key", "value")


def past_name(layer: int | str, part: str) -> str:
    return f"{PAST}{layer}.{part}"


def present_name(layer: int | str, part: str) -> str:
    return f"{PRESENT}{layer}.{part}"


def is_past(name: str) -> bool:
    return name.startswith(PAST)


def past_of(present: str) -> str | None:
    """present.{i}.key -> past_key_values.{i}.key (the input it replaces); None for other names."""
    return PAST + present[len(PRESENT):] if present.startswith(PRESENT) else None


def present_of(past: str) -> str:
    return PRESENT + past[len(PAST):]


Range = tuple[int, int, int]  # (min, opt, max)

# How a layout's graph places a step's keys/values, as the manifest records it
# (`Manifest.cache_writes`): artifacts from before per-sequence slots record nothing = lockstep.
PER_SEQUENCE = "per_sequence"  # row b at max(0, last_b + 1 - seq): rows at different lengths
LOCKSTEP = "lockstep"  # every row at the mask's width less the step: rows advance together


# The attention mask's width W of a static-cache decode step: the runner's choice each step
# (docs/batching.md has the measurements behind the choice per device).
DECODE_WIDTHS = ("live", "buckets", "max")
MIN_WIDTH_BUCKET = 128


def decode_width(policy: str, longest: int, max_seq_len: int) -> int:
    """W for a step after which the longest live row holds `longest` slots: "live" = longest
    (reads the fewest slots: onnxruntime on CPUs), "max" = max_seq_len (every decode step one
    shape: CUDA graphs), "buckets" = longest rounded up to a power of two, at least
    MIN_WIDTH_BUCKET, at most max_seq_len (a few shapes, each capturable, at most twice the
    live read: GPUs whose full cache is large next to the weights)."""
    if policy not in DECODE_WIDTHS:
        raise ConfigError(f"decode width {policy!r}: choose one of {', '.join(DECODE_WIDTHS)}")
    if not 1 <= longest <= max_seq_len:
        raise InputError(f"a row holding {longest} cache slots does not fit max_seq_len={max_seq_len}")
    if policy == "live":
        return longest
    if policy == "max":
        return max_seq_len
    return min(max_seq_len, max(MIN_WIDTH_BUCKET, 1 << (longest - 1).bit_length()))


def lockstep_slots(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Every row's step at the mask's last `seq` slots: [batch] of W - seq."""
    import torch
    return torch.zeros_like(attention_mask[:, 0]) + (attention_mask.shape[1] - seq)  # [batch]


def per_sequence_slots(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Row b's first slot of the step, max(0, last_b + 1 - seq), last_b = its last nonzero slot
    (an all-zero row, an idle one, writes at 0): [batch]."""
    import torch
    width = attention_mask.shape[1]
    slot_ends = torch.arange(1, width + 1, device=attention_mask.device)  # [W]: slot + 1
    # ReduceMax over a constant axis (TensorRT needs reduce axes at build time) of slot + 1
    # where the mask is set: last_b + 1, or 0 for an empty row.
    ends = torch.where(attention_mask != 0, slot_ends, 0).amax(dim=1)  # [batch]
    # Max, not clamp: TensorRT's Clip takes float types only.
    return torch.maximum(ends - seq, torch.zeros_like(ends))  # [batch]


@dataclasses.dataclass(frozen=True)
class KVCacheLayout(abc.ABC):
    name: str
    in_place: bool  # present.* is past_key_values.* updated in place: bind both to one buffer
    past_dim_name: str | None  # the symbolic dim of the past's length in the graph (None: fixed)
    copies_per_step: int  # full-length caches alive during a step (concat: the past and its present)
    bounded: bool  # a request must fit max_seq_len slots (concat: only TensorRT's profiles bound it)
    writes: str  # PER_SEQUENCE or LOCKSTEP: where each row's step lands (the manifest records it)

    @abc.abstractmethod
    def buffer_len(self, max_seq_len: int) -> int:
        """Slots of each past buffer when a batch starts."""

    @abc.abstractmethod
    def write_slots(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """Each row's first cache slot of this step, [batch], computed once per rank from the
        mask [batch, W]: where the update writes the step and where its queries sit (the
        causal part of the attention mask)."""

    @abc.abstractmethod
    def update(self, past: torch.Tensor, new: torch.Tensor, slots: torch.Tensor,
               total) -> tuple[torch.Tensor, torch.Tensor]:
        """(present, the keys/values attention reads) for past [batch, kv, len, d] and this
        step's new [batch, kv, seq, d] written from slots [batch] (write_slots); total = W,
        the slots attention reads."""

    @abc.abstractmethod
    def profile_points(self, batch: Range, seq: Range, max_seq_len: int) -> list[tuple[dict, dict, dict]]:
        """(min, opt, max) values of the graph's symbolic dims, one triple per TensorRT
        optimization profile, for batch and seq (tokens per step) given as (min, opt, max)."""

    def check_fits(self, needed: int, max_seq_len: int) -> None:
        """Refuse a request that needs more cache slots than a bounded layout holds."""
        if self.bounded and needed > max_seq_len:
            raise InputError(f"the request needs {needed} cache slots but the model was built for "
                             f"max_seq_len={max_seq_len}; shorten the prompt/--max-new-tokens or "
                             "re-export with a larger --max-seq-len")


@dataclasses.dataclass(frozen=True)
class StaticCache(KVCacheLayout):
    name: str = "static"
    in_place: bool = True
    past_dim_name: str | None = None
    copies_per_step: int = 1
    bounded: bool = True
    writes: str = PER_SEQUENCE

    def buffer_len(self, max_seq_len: int) -> int:
        return max_seq_len

    def write_slots(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        return per_sequence_slots(attention_mask, seq)  # [batch]

    def update(self, past, new, slots, total):
        from export.cache_ops import kv_cache_write
        present = kv_cache_write(past, new, slots)  # [batch, kv_heads, max_seq_len, head_dim]
        # Attend slots [0, W) only: the runner picks W (the longest live row reads less than all
        # max_seq_len slots; W = max_seq_len keeps decode shapes fixed).
        return present, present[:, :, :total]  # [batch, kv_heads, total, head_dim]

    def profile_points(self, batch, seq, max_seq_len):
        # One profile: the buffers are fixed at max_seq_len; batch, seq and total_seq (the
        # attention mask's width W) vary: a newcomer's prefill (batch 1, W = its prompt), a
        # decode step over every row at the longest live row's width or at max_seq_len. The
        # tuned point is a full-batch fixed-width decode step (W = max_seq_len, the GPU choice
        # when the cache is small next to the weights: docs/batching.md).
        return [tuple({"batch": b, "seq": s, "total_seq": t}
                      for b, s, t in zip(batch, seq, (1, max_seq_len, max_seq_len)))]


@dataclasses.dataclass(frozen=True)
class ConcatCache(KVCacheLayout):
    name: str = "concat"
    in_place: bool = False
    past_dim_name: str | None = "past_seq"
    copies_per_step: int = 2
    bounded: bool = False
    writes: str = LOCKSTEP

    def buffer_len(self, max_seq_len: int) -> int:
        return 0

    def write_slots(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        return lockstep_slots(attention_mask, seq)  # [batch]; the update appends, ignoring them

    def update(self, past, new, slots, total):
        import torch
        keys = torch.cat((past, new), dim=2)  # [batch, kv_heads, past + seq, head_dim]
        return keys, keys

    def profile_points(self, batch, seq, max_seq_len):
        # Each point must be self-consistent (attention_mask = past + seq): a context profile
        # (seq up to its max, past up to max_seq_len - that) and a decode profile (seq 1, past up
        # to max_seq_len - 1) cover every step of a generation.
        length, s_max = max_seq_len, seq[2]
        ctx_past_max = length - s_max
        context = tuple({"batch": b, "seq": s, "past_seq": past}
                        for b, s, past in zip(batch, seq, (0, min(ctx_past_max, length // 2), ctx_past_max)))
        decode = tuple({"batch": b, "seq": 1, "past_seq": past}
                       for b, past in zip(batch, (0, length // 2, length - 1)))
        return [context, decode] if s_max > 1 else [decode]


KV_CACHE_LAYOUTS: dict[str, KVCacheLayout] = {layout.name: layout for layout in (StaticCache(), ConcatCache())}


def kv_cache_layout(name: str) -> KVCacheLayout:
    try:
        return KV_CACHE_LAYOUTS[name]
    except KeyError:
        raise ConfigError(f"--kv-cache {name!r}: choose {' or '.join(KV_CACHE_LAYOUTS)}") from None
