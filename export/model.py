"""Llama 3.1 decoder for one tensor/pipeline-parallel rank — the single source of the graph.

The module a rank builds holds only that rank's shard: every weight's owner carries its
tensor-parallel style (export/parallel.py), which sizes it here and tells export/rank_layout.py
which checkpoint slice fills it. The module calls `reduce` wherever Megatron-style partial sums
must be added across the tensor-parallel group. Eager runs pass a real reducer (in-process sum,
torch.distributed); the ONNX export passes a placeholder op that becomes TensorRT's
DistCollective. State-dict names are Hugging Face's, so the exporter can name every initializer
after the checkpoint tensor it comes from.

Written to be traced by torch.export: real-valued RoPE, no data-dependent Python control flow,
KV cache as explicit inputs/outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from export.attention_op import gqa_attention
from export.rotary_op import rotary_embedding
from export.config import LlamaConfig
from export.errors import InternalError
from export.kv_cache import KVCacheLayout, kv_cache_layout
from export.logits import Logits, logits_named
from export.quantization import Quantization, Unquantized
from export.parallel import (ParallelStyle, Replicated, column_parallel, kv_head_parallel, row_parallel,
                             vocab_parallel)
from export.sharding import RankSpec, heads_local, kv_heads_local, stage_layers

Reducer = Callable[[torch.Tensor], torch.Tensor]
LinearFactory = Callable[..., nn.Module]  # (module path, style, quantizable=True) -> the rank's linear


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Run-time shape of the graph, beyond the checkpoint's geometry."""

    kv_cache: str = "static"  # the layout's name (export/kv_cache.py): "static" or "concat"
    max_seq_len: int = 4096
    logits: str = "all"  # which positions' logits: the name of an export/logits.py kind
    quant: Quantization = Unquantized()  # which linears leave the compute dtype (export/quantization.py)

    @property
    def cache_layout(self) -> KVCacheLayout:
        return kv_cache_layout(self.kv_cache)

    @property
    def logits_rows(self) -> Logits:
        return logits_named(self.logits)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse rotary frequencies with Llama 3.1's wavelength-dependent stretch (fp32)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq  # [head_dim / 2]
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept,
    # and the band between is interpolated smoothly.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)  # [head_dim / 2]


def rope_tables(cfg: LlamaConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x inverse frequency for every position the checkpoint supports
    (0..max_position_embeddings-1), the values RotaryEmbedding rotates by (export/rotary_op.py)."""
    # Angles in fp32: positions reach 131072, far past what fp16 can multiply exactly.
    positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
    angles = positions[:, None] * rope_inv_freq(cfg)  # [positions, head_dim / 2]
    return angles.cos().to(dtype), angles.sin().to(dtype)  # [positions, head_dim / 2] each


def rope_at(cos_table: torch.Tensor, sin_table: torch.Tensor, position_ids: torch.Tensor):
    """The tables' rows for this step's positions, gathered once per rank (not once per layer:
    the ONNX backend's per-all-reduce segments would each hold a copy of the tables)."""
    return F.embedding(position_ids, cos_table), F.embedding(position_ids, sin_table)  # [batch, seq, head_dim / 2]


def linear_factory(cfg: LlamaConfig, spec: RankSpec, quant: Quantization) -> LinearFactory:
    """The rank's share of a linear (sized by its style): nn.Linear, or the quantization's linear
    where the scheme selects a `quantizable` one (a decoder layer's projections; never lm_head).
    The module keeps `parallel` and `quantizable` for export/rank_layout.py to read."""
    def make(name: str, style: ParallelStyle, quantizable: bool = True) -> nn.Module:
        out_features, in_features = style.local_shape(spec)
        if quantizable and quant.quantizes(name, cfg.num_hidden_layers):
            module = quant.linear(in_features, out_features)
        else:
            module = nn.Linear(in_features, out_features, bias=False)
        module.parallel, module.quantizable = style, quantizable
        return module
    return make


class RMSNorm(nn.Module):
    quantizable = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.parallel = Replicated((dim,))
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: a 16384-wide fp16 sum of squares overflows otherwise.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, spec: RankSpec, reduce: Reducer, linear: LinearFactory, prefix: str,
                 cache: KVCacheLayout):
        super().__init__()
        self.cache = cache  # how past K/V become present K/V (export/kv_cache.py)
        d, h = cfg.head_dim, cfg.hidden_size
        self.n_heads = heads_local(cfg, spec.tp_size)
        self.n_kv = kv_heads_local(cfg, spec.tp_size)
        self.head_dim = d
        self.reduce = reduce
        self.q_proj = linear(prefix + "q_proj", column_parallel(cfg.num_attention_heads * d, h))
        self.k_proj = linear(prefix + "k_proj", kv_head_parallel(cfg.num_key_value_heads, d, h))
        self.v_proj = linear(prefix + "v_proj", kv_head_parallel(cfg.num_key_value_heads, d, h))
        self.o_proj = linear(prefix + "o_proj", row_parallel(h, cfg.num_attention_heads * d))

    def forward(self, x, rope, mask, past_k, past_v, slots):
        """rope: (cos, sin) [batch, seq, head_dim / 2] (rope_at); slots: the cache layout's
        write_slots; mask [batch, 1, seq, total]."""
        batch, seq, _ = x.shape
        d, n_kv = self.head_dim, self.n_kv
        q = self.q_proj(x).view(batch, seq, self.n_heads, d).transpose(1, 2)  # [batch, heads, seq, head_dim]
        k = self.k_proj(x).view(batch, seq, n_kv, d).transpose(1, 2)  # [batch, kv_heads, seq, head_dim]
        v = self.v_proj(x).view(batch, seq, n_kv, d).transpose(1, 2)  # [batch, kv_heads, seq, head_dim]
        q, k = rotary_embedding(q, *rope), rotary_embedding(k, *rope)  # one RotaryEmbedding node each
        total = mask.shape[-1]
        present_k, k_all = self.cache.update(past_k, k, slots, total)  # k_all [batch, kv_heads, total, head_dim]
        present_v, v_all = self.cache.update(past_v, v, slots, total)
        # Grouped-query attention without repeated KV heads, one op (export/attention_op.py).
        out = gqa_attention(q, k_all, v_all, mask)  # [batch, heads, seq, head_dim]
        out = out.reshape(batch, self.n_heads, seq, d).transpose(1, 2).reshape(batch, seq, self.n_heads * d)
        return self.reduce(self.o_proj(out)), present_k, present_v  # [batch, seq, hidden]


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, spec: RankSpec, reduce: Reducer, linear: LinearFactory, prefix: str):
        super().__init__()
        h, ffn = cfg.hidden_size, cfg.intermediate_size
        self.reduce = reduce
        self.gate_proj = linear(prefix + "gate_proj", column_parallel(ffn, h))
        self.up_proj = linear(prefix + "up_proj", column_parallel(ffn, h))
        self.down_proj = linear(prefix + "down_proj", row_parallel(h, ffn))

    def forward(self, x):
        return self.reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))  # [batch, seq, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, spec: RankSpec, reduce: Reducer, layer_id: int, cache: KVCacheLayout,
                 quant: Quantization = Unquantized()):
        super().__init__()
        linear = linear_factory(cfg, spec, quant)
        prefix = f"model.layers.{layer_id}."
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, spec, reduce, linear, prefix + "self_attn.", cache)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, spec, reduce, linear, prefix + "mlp.")

    def forward(self, h, rope, mask, past_k, past_v, slots):
        attn, k, v = self.self_attn(self.input_layernorm(h), rope, mask, past_k, past_v, slots)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), k, v  # [batch, seq, hidden]


def embedding_style(cfg: LlamaConfig) -> ParallelStyle:
    return vocab_parallel(cfg.vocab_size, cfg.hidden_size)


def lm_head_style(cfg: LlamaConfig) -> ParallelStyle:
    """Split over hidden: a rank multiplies its hidden columns, the logits are all-reduced."""
    return row_parallel(cfg.vocab_size, cfg.hidden_size)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + local) of the embedding; other ids contribute zeros."""

    quantizable = False

    def __init__(self, cfg: LlamaConfig, spec: RankSpec, reduce: Reducer):
        super().__init__()
        self.parallel = embedding_style(cfg)
        shape = self.parallel.local_shape(spec)  # [vocab / tp, hidden]
        self.local = shape[0]
        self.sharded = spec.tp_size > 1
        self.reduce = reduce
        self.weight = nn.Parameter(torch.empty(shape))
        if self.sharded:  # a tensor, not an int: every TP rank of a stage traces to one graph
            (start, _), = self.parallel.tensor_slice(spec).blocks
            self.register_buffer("vocab_start", torch.tensor(start), persistent=False)

    def forward(self, input_ids):
        if not self.sharded:
            return F.embedding(input_ids, self.weight)  # [batch, seq, hidden]
        local_ids = input_ids - self.vocab_start
        mine = (local_ids >= 0) & (local_ids < self.local)  # [batch, seq]
        # Where, not clamp: TensorRT's Clip takes float types only.
        rows = F.embedding(torch.where(mine, local_ids, 0), self.weight)  # [batch, seq, hidden]
        return self.reduce(rows * mine[..., None].to(rows.dtype))


class Body(nn.Module):
    """`model.*` of the HF state dict: embedding, this stage's layers, final norm."""

    def __init__(self, cfg: LlamaConfig, spec: RankSpec, reduce: Reducer, cache: KVCacheLayout,
                 quant: Quantization):
        super().__init__()
        self.layer_ids = list(stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank))
        if spec.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(cfg, spec, reduce)
        # Keyed by global index so names match the checkpoint (model.layers.40.* on stage 2).
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, spec, reduce, i, cache, quant) for i in self.layer_ids})
        if spec.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def additive_mask(attention_mask: torch.Tensor, seq: int, slots: torch.Tensor | None = None):
    """Additive attention mask [batch, 1, seq, total] in fp32 from attention_mask [batch, total]
    (1 = a real token in that cache slot). Row b's queries sit at slots[b] .. slots[b] + seq - 1
    (the cache layout's write_slots; None: every row's in the last `seq` slots); each sees every
    real slot up to its own (slots are positions in the cache, and padding slots stay masked)."""
    total = attention_mask.shape[1]
    key_slots = torch.arange(total, device=attention_mask.device)  # [total]
    step = torch.arange(seq, device=attention_mask.device)  # [seq]
    starts = slots if slots is not None else torch.zeros_like(attention_mask[:, 0]) + (total - seq)  # [batch]
    query_slots = starts[:, None] + step  # [batch, seq]
    causal = key_slots <= query_slots[:, :, None]  # [batch, seq, total]
    allowed = causal & (attention_mask[:, None, :] != 0)  # [batch, seq, total]
    # finfo.min rather than -inf: a fully padded query row must give zeros, not NaN.
    neg = torch.finfo(torch.float32).min
    return torch.where(allowed, 0.0, neg)[:, None]  # [batch, 1, seq, total]


class LlamaRank(nn.Module):
    """One rank's share of Llama 3.1.

    forward(first, position_ids, attention_mask, *past) -> (logits or hidden_states, *presents)
      first           input_ids int64 [batch, seq] on the first stage, else hidden_states
                      [batch, seq, hidden] from the previous stage
      position_ids    int64 [batch, seq]
      attention_mask  int64 [batch, total]: 1 for a real token in each cache slot so far, this
                      step's included. Static mode writes row b's step at its own slots
                      s_b .. s_b + seq - 1, s_b = max(0, last_b + 1 - seq), last_b = the row's
                      last nonzero slot, and attends slots [0, total) (export/kv_cache.py);
                      concat appends at total - seq (total = past + seq).
      past            key, value per local layer: [batch, kv_heads_local, cache_len, head_dim]
    """

    def __init__(self, cfg: LlamaConfig, spec: RankSpec, options: ModelOptions = ModelOptions(),
                 reduce: Reducer = no_reduce):
        super().__init__()
        self.cfg, self.spec, self.options = cfg, spec, options
        self.cache = options.cache_layout  # chosen once: every layer's update follows it
        self.model = Body(cfg, spec, reduce, self.cache, options.quant)
        if spec.is_last_stage:
            # Split over hidden: each rank multiplies its hidden columns, the logits all-reduced.
            self.lm_head = linear_factory(cfg, spec, options.quant)("lm_head", lm_head_style(cfg), quantizable=False)
        self.reduce = reduce
        for name, value in rank_constants(cfg, spec, torch.float32).items():
            if "." not in name:
                self.register_buffer(name, value, persistent=False)

    @property
    def layer_ids(self) -> list[int]:
        return self.model.layer_ids

    def forward(self, first, position_ids, attention_mask, *past):
        spec = self.spec
        h = self.model.embed_tokens(first) if spec.is_first_stage else first  # [batch, seq, hidden]
        seq = position_ids.shape[1]
        rope = rope_at(self.rope_cos, self.rope_sin, position_ids)
        slots = self.cache.write_slots(attention_mask, seq)  # [batch]: each row's first slot of the step
        mask = additive_mask(attention_mask, seq, slots)  # [batch, 1, seq, total]
        presents = []
        for n, layer_id in enumerate(self.layer_ids):
            h, k, v = self.model.layers[str(layer_id)](
                h, rope, mask, past[2 * n], past[2 * n + 1], slots)
            presents += [k, v]
        if not spec.is_last_stage:
            return (h, *presents)
        h = self.model.norm(self.options.logits_rows.select(h))  # [batch, rows, hidden]
        if spec.tp_size > 1:
            h = h.index_select(-1, self.hidden_index)  # [batch, seq, hidden / tp]
        logits = self.reduce(self.lm_head(h))  # [batch, seq, vocab]
        return (logits, *presents)


def build_rank_module(cfg: LlamaConfig, spec: RankSpec, options: ModelOptions = ModelOptions(),
                      reduce: Reducer = no_reduce, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "meta") -> LlamaRank:
    """An empty rank module (meta by default: no memory until weights are assigned)."""
    with torch.device(device):
        module = LlamaRank(cfg, spec, options, reduce)
    module.to(dtype)
    # Computed from the config, never loaded: real values even on a meta module.
    for name, value in rank_constants(cfg, spec, dtype).items():
        owner, leaf = _owner(module, name)
        setattr(owner, leaf, value)
    return module.eval().requires_grad_(False)


def rank_constants(cfg: LlamaConfig, spec: RankSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Buffers derived from the config and the rank, not the checkpoint (the exporter writes
    them as initializers, so all TP ranks of a stage share one traced graph). The RoPE tables
    are in the compute dtype, as RotaryEmbedding wants them."""
    cos, sin = rope_tables(cfg, dtype)
    constants = {"rope_cos": cos, "rope_sin": sin}  # [max_position_embeddings, head_dim / 2]
    if spec.tp_size > 1 and spec.is_first_stage:
        (start, _), = embedding_style(cfg).tensor_slice(spec).blocks  # the vocabulary rows this rank holds
        constants["model.embed_tokens.vocab_start"] = torch.tensor(start)
    if spec.tp_size > 1 and spec.is_last_stage:
        (start, stop), = lm_head_style(cfg).tensor_slice(spec).blocks  # the hidden columns its lm_head multiplies
        constants["hidden_index"] = torch.arange(start, stop)
    return constants


def load_rank_weights(module: LlamaRank, tensors, dtype: torch.dtype) -> None:
    """Assign (name, tensor) pairs into a meta-built module, checking every name and shape.

    The sources check the user's files first (Checkpoint.validate, the artifact reader), so a
    mismatch here is a llama405 bug."""
    expected = dict(module.state_dict())
    seen = set()
    for name, tensor in tensors:
        if name not in expected:
            raise InternalError(f"tensor {name!r} has no place in the rank module")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InternalError(f"{name}: shape {list(tensor.shape)} != module {list(expected[name].shape)}")
        owner, leaf = _owner(module, name)
        # The module decides each tensor's dtype: compute dtype, or FP8 for quantized weights.
        setattr(owner, leaf, nn.Parameter(tensor.to(expected[name].dtype), requires_grad=False))
        seen.add(name)
    missing = set(expected) - seen
    if missing:
        raise InternalError(f"rank module tensors not provided: {sorted(missing)[:5]}")


def _owner(module: nn.Module, name: str):
    path, _, leaf = name.rpartition(".")
    return module.get_submodule(path), leaf
