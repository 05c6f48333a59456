"""Tensor- and pipeline-parallel layout as pure functions of (config, tp, pp, rank).

Megatron split: q/k/v and gate/up are column-parallel (split the output rows of the
HF [out, in] weight), o_proj and down_proj are row-parallel (split the input columns), the
embedding is vocab-parallel and lm_head is split over hidden, so every partial result is
combined with one all-reduce(sum). KV heads are partitioned when tp <= n_kv_heads and replicated
when tp is a multiple of n_kv_heads (405B at TP16).
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


def kv_head_range(cfg: LlamaConfig, spec: RankSpec) -> range:
    """Indices of the (deduplicated) KV heads this rank holds."""
    n_kv, tp = cfg.num_key_value_heads, spec.tp_size
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


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def rank_tensor_names(cfg: LlamaConfig, spec: RankSpec) -> list[str]:
    """HF state-dict names a rank's module holds, in a fixed order (the export's file order)."""
    names: list[str] = []
    if spec.is_first_stage:
        names.append("model.embed_tokens.weight")
    for layer in stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank):
        prefix = f"model.layers.{layer}."
        names += [prefix + n for n in (
            "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
    if spec.is_last_stage:
        names += ["model.norm.weight", "lm_head.weight"]
    return names


def shares_tied_head(cfg: LlamaConfig, spec: RankSpec) -> bool:
    """A tied lm_head is the embedding matrix itself on a rank holding both whole (TP1, one stage
    for both ends): its graph reads one initializer for both and stores vocab x hidden once. Under
    TP the embedding is split over vocab rows and lm_head over hidden columns: two slices."""
    return cfg.tie_word_embeddings and spec.tp_size == 1 and spec.is_first_stage and spec.is_last_stage


def stored_tensor_names(cfg: LlamaConfig, spec: RankSpec) -> list[str]:
    """The rank_tensor_names a rank's data file holds (a shared tied head is the embedding's)."""
    names = rank_tensor_names(cfg, spec)
    return [n for n in names if n != "lm_head.weight"] if shares_tied_head(cfg, spec) else names


def checkpoint_name(cfg: LlamaConfig, name: str) -> str:
    """Where a module tensor lives in the checkpoint (tied lm_head reads the embedding)."""
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def tensor_slice(cfg: LlamaConfig, spec: RankSpec, name: str, kv_dup_factor: int = 1) -> TensorSlice:
    """The part of checkpoint tensor `name` (HF layout [out, in]) that `spec` holds.

    kv_dup_factor > 1 describes checkpoints that repeat each KV head that many times in a row
    (405B published with num_key_value_heads 16): the slice then picks one copy per head.
    """
    tp, r = spec.tp_size, spec.tp_rank
    if tp == 1 and kv_dup_factor == 1:
        return TensorSlice(None)
    if name == "model.embed_tokens.weight":
        rows = cfg.vocab_size // tp
        return TensorSlice(0, ((r * rows, (r + 1) * rows),))
    if name == "lm_head.weight":
        cols = cfg.hidden_size // tp
        return TensorSlice(1, ((r * cols, (r + 1) * cols),))
    match = _LAYER_KEY.fullmatch(name)
    if not match:
        if name == "model.norm.weight":
            return TensorSlice(None)
        raise ShardingError(f"tensor {name!r} is not part of a Llama model")
    leaf, d = match[2], cfg.head_dim
    hq = heads_local(cfg, tp)
    if leaf == "self_attn.q_proj.weight":
        return TensorSlice(0, ((r * hq * d, (r + 1) * hq * d),))
    if leaf == "self_attn.o_proj.weight":
        return TensorSlice(1, ((r * hq * d, (r + 1) * hq * d),))
    if leaf in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        heads = kv_head_range(cfg, spec)
        if kv_dup_factor == 1:
            return TensorSlice(0, ((heads.start * d, heads.stop * d),))
        return TensorSlice(0, tuple((h * kv_dup_factor * d, (h * kv_dup_factor + 1) * d) for h in heads))
    ffn = cfg.intermediate_size // tp
    if leaf in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return TensorSlice(0, ((r * ffn, (r + 1) * ffn),))
    if leaf == "mlp.down_proj.weight":
        return TensorSlice(1, ((r * ffn, (r + 1) * ffn),))
    if leaf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return TensorSlice(None)
    raise ShardingError(f"tensor {name!r} is not part of a Llama model")


def expected_shape(cfg: LlamaConfig, name: str, kv_dup_factor: int = 1) -> tuple[int, ...]:
    """Full (unsharded) shape of a checkpoint tensor as config.json describes it."""
    h, d = cfg.hidden_size, cfg.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    if name == "model.norm.weight":
        return (h,)
    leaf = _LAYER_KEY.fullmatch(name)[2]
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (cfg.num_key_value_heads * kv_dup_factor * d, h),
        "self_attn.v_proj.weight": (cfg.num_key_value_heads * kv_dup_factor * d, h),
        "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        "mlp.gate_proj.weight": (cfg.intermediate_size, h),
        "mlp.up_proj.weight": (cfg.intermediate_size, h),
        "mlp.down_proj.weight": (h, cfg.intermediate_size),
    }[leaf]
