"""Per-GPU memory planner: weights, KV cache and activations of every rank, as pure functions.

Every figure is computed from the same sharding plan the exporter uses (export/sharding.py), so
the weights of a rank are the tensors that rank really holds: the vocab-parallel embedding slice
on the first pipeline stage, lm_head's hidden slice and the final norm on the last, and the
stage's decoder layers in between.

Formulas (B = max_batch, S = max_input_len = tokens per step, L = max_seq_len, c = bytes of the
compute dtype, h = hidden, f = intermediate / tp, Hq / Hkv = query / KV heads on the rank,
d = head_dim, V = vocab, n = layers of the stage):

weights       sum over the rank's tensors of elements x bytes. quant=fp8: q/k/v/o/gate/up/down
              weights take 1 byte per element plus one per-output-channel scale each (c bytes)
              and one per-tensor activation scale per linear (c bytes) — the exporter's layout,
              honouring its recipe/exclusions (export/quantization.py); embedding, lm_head and norms stay
              in the compute dtype; the rotary table is fp32 [d/2].
kv_cache      static: B x L x n x Hkv x d x 2 (key and value) x bytes(kv dtype).
              concat: twice that (past and present are separate tensors: no aliasing).
activations   an upper bound on one step's live set — TensorRT reuses activation memory
              across layers, so one layer's largest tensors plus the logits are summed:
                hidden    4 x B x S x h x c            (residual, normed input, attention and
                                                        MLP outputs)
                q/k/v/ctx B x S x (2 Hq + 2 Hkv) x d x c
                rotary    2 x B x S x d x c            (cos, sin)
                scores    B x Hq x S x L x (4 + 4 + c) (fp32 scores, fp32 softmax, probabilities
                                                        in c) — the unfused graph; dropped with
                                                        attention="fused"
                mask      B x S x L x 4                (fp32 additive mask; dropped when fused)
                mlp       3 x B x S x f x c            (gate, up, gate*up)
                fp8 only  B x S x (2h + Hq d + f) x 1  (quantized copies of the linear inputs)
                logits    B x S' x V x (c + 4)         (last stage; partial logits in c plus the
                                                        fp32 copy; S' = S, or 1 for logits="last")
total         weights + kv_cache + activations; fits when total + reserve <= gpu_bytes on every
              rank (reserve: CUDA context, NCCL buffers, cuBLAS/TensorRT workspaces).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from collections.abc import Callable

from export.config import LlamaConfig
from export.errors import ConfigError
from export.dtypes import COMPUTE_DTYPE_NAMES, dtype
from export.kv_cache import KV_CACHE_LAYOUTS
from export.logits import logits_named
from export.options import ExportOptions
from export.quantization import DEFAULT_RECIPE, Quantization, quantization_named
from export.rank_layout import checkpoint_name, expected_shape, rank_layout, stored_tensor_names, tensor_slice
from export.sharding import RankSpec, all_ranks, heads_local, kv_heads_local, stage_layers, validate_parallelism

GiB = 1 << 30
DEFAULT_GPU_BYTES = 80 * GiB  # H100 80 GB (SXM/PCIe)
DEFAULT_RESERVE_BYTES = 2 * GiB
DEFAULT_MAX_INPUT_LEN = 2048  # prefill chunk: the profile's largest tokens-per-step
# Host memory the TensorRT builder holds while building one rank: a fixed part plus, per byte of
# the rank's weights, the parsed weights, the builder's copy and the serialized plan. Measured
# with TensorRT-RTX 1.7 on a 405B-width TP8 rank: 3.30 GB for 0.93 GB of fp16 weights, 2.11 GB for
# 0.53 GB FP8, 0.54 GB for 12 MB (docs/engines.md; `make bench` --only engines re-measures it).
BUILDER_HOST_BYTES_PER_WEIGHT_BYTE = 3.0
BUILDER_HOST_FIXED_BYTES = 512 << 20


def builder_host_bytes(weight_bytes: int) -> int:
    """Host memory to build one rank's engine from `weight_bytes` of weights."""
    return int(BUILDER_HOST_FIXED_BYTES + BUILDER_HOST_BYTES_PER_WEIGHT_BYTE * weight_bytes)

# compute dtypes, and the --kv-cache-dtype "fp8" (float8_e4m3fn): bytes per element
DTYPE_BYTES = {**{n: dtype(n).itemsize for n in COMPUTE_DTYPE_NAMES}, "fp8": dtype("float8_e4m3fn").itemsize}
_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(ExportOptions))


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """A what-if over a geometry: the export options an artifact would have (`ExportOptions`, the
    one definition of those fields, their choices and defaults) plus the planner's own knobs."""

    config: LlamaConfig
    options: ExportOptions = ExportOptions()
    max_input_len: int | None = None  # None: min(max_seq_len, DEFAULT_MAX_INPUT_LEN)
    kv_cache_dtype: str | None = None  # None: the compute dtype
    attention: str = "unfused"  # "fused": assume TensorRT never materialises the scores
    gpu_bytes: int = DEFAULT_GPU_BYTES
    reserve_bytes: int = DEFAULT_RESERVE_BYTES

    # The export options the planner reads, from the one options object (as Manifest does).
    tp = property(lambda self: self.options.tp)
    pp = property(lambda self: self.options.pp)
    dtype = property(lambda self: self.options.dtype)
    quant = property(lambda self: self.options.quant)
    kv_cache = property(lambda self: self.options.kv_cache)
    max_batch = property(lambda self: self.options.max_batch)
    max_seq_len = property(lambda self: self.options.max_seq_len)
    logits = property(lambda self: self.options.logits)
    fp8_recipe = property(lambda self: self.options.fp8_recipe)
    fp8_exclude = property(lambda self: self.options.fp8_exclude)
    quantization = property(lambda self: self.options.quantization)

    @classmethod
    def of(cls, config: LlamaConfig, **fields: Any) -> PlanRequest:
        """Export-option fields (tp=, quant=, max_seq_len=, ...) and planner knobs in one call."""
        options = {k: fields.pop(k) for k in list(fields) if k in _OPTION_FIELDS}
        return cls(config, ExportOptions(**options), **fields)

    def replace(self, **changes: Any) -> PlanRequest:
        """This request with export-option fields and/or planner knobs changed."""
        options = {k: changes.pop(k) for k in list(changes) if k in _OPTION_FIELDS}
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **options), **changes)

    @property
    def input_len(self) -> int:
        chosen = self.max_input_len if self.max_input_len is not None else DEFAULT_MAX_INPUT_LEN
        return min(chosen, self.max_seq_len)

    @property
    def kv_dtype(self) -> str:
        return self.kv_cache_dtype or self.dtype

    def validate(self) -> None:
        # The options' own field checks (not the export's shortest traceable cache: the planner's
        # searches try any length), then the knobs.
        self.options.validate_fields()
        validate_parallelism(self.config, self.tp, self.pp)
        checks = [("--kv-cache-dtype", self.kv_dtype, tuple(DTYPE_BYTES)),
                  ("--attention", self.attention, ("unfused", "fused"))]
        for flag, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
        if not isinstance(self.input_len, int) or self.input_len < 1:
            raise ConfigError(f"--max-input-len {self.input_len!r} must be a positive integer")
        if self.gpu_bytes <= 0 or self.reserve_bytes < 0:
            raise ConfigError(f"GPU memory {self.gpu_bytes} and reserve {self.reserve_bytes} must be positive")


@dataclasses.dataclass(frozen=True)
class RankMemory:
    rank: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def build_host_bytes(self) -> int:
        """Host memory TensorRT's builder needs to build this rank's engine."""
        return builder_host_bytes(self.weights_bytes)

    def as_dict(self) -> dict[str, int]:
        return {"rank": self.rank, "weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "activation_bytes": self.activation_bytes, "total_bytes": self.total_bytes}


@dataclasses.dataclass(frozen=True)
class Plan:
    request: PlanRequest
    ranks: tuple[RankMemory, ...]

    @property
    def fits(self) -> bool:
        return all(fits_gpu(r, self.request) for r in self.ranks)

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total_bytes)


def fits_gpu(memory: RankMemory, request: PlanRequest) -> bool:
    return memory.total_bytes + request.reserve_bytes <= request.gpu_bytes


# A GPU decodes at the attention mask width W = max_seq_len (every step one shape: CUDA graphs)
# while reading every cache slot adds at most this share to the bytes a step reads anyway (the
# weights); past it, W goes in power-of-two buckets (export/kv_cache.py:decode_width, the
# measurements in docs/batching.md).
FIXED_WIDTH_MAX_KV_SHARE = 0.10


def gpu_decode_width(result: Plan) -> dict[str, Any] | None:
    """{"policy": "max" | "buckets", "kv_read_share": full-width KV bytes / weight bytes on the
    rank where that share is largest} for a static cache (its whole buffer is what a step at
    W = max_seq_len reads); None for concat, whose width is its past (no choice)."""
    if KV_CACHE_LAYOUTS[result.request.kv_cache].past_dim_name is not None:
        return None
    share = max(m.kv_cache_bytes / m.weights_bytes for m in result.ranks)
    return {"policy": "max" if share <= FIXED_WIDTH_MAX_KV_SHARE else "buckets", "kv_read_share": share}


# -- the three terms -------------------------------------------------------------------------

def _local_shape(cfg: LlamaConfig, spec: RankSpec, name: str) -> tuple[int, ...]:
    return tensor_slice(cfg, spec, name).local_shape(expected_shape(cfg, checkpoint_name(cfg, name)))


@functools.lru_cache(maxsize=4096)  # independent of batch and context: the suggestion searches reuse it
def weights_bytes(cfg: LlamaConfig, spec: RankSpec, quant: str | Quantization = "none", dtype: str = "float16",
                  fp8_recipe: str = DEFAULT_RECIPE, fp8_exclude: tuple[str, ...] = ()) -> int:
    """Bytes of the tensors rank `spec` holds (its real, sharded shapes); a quantized linear as
    its scheme stores it (the exporter's own selection: export/quantization.py)."""
    c = DTYPE_BYTES[dtype]
    scheme = _scheme(quant, fp8_recipe, fp8_exclude)
    total = rope_table_bytes(cfg, dtype)
    quantized = rank_layout(cfg, spec).quantized_linears(scheme)
    for name in stored_tensor_names(cfg, spec):  # a tied head the graph shares is counted once
        shape = _local_shape(cfg, spec, name)  # HF layout [out, in]
        elements = math.prod(shape)
        if name.endswith(".weight") and name.rpartition(".")[0] in quantized:
            total += scheme.weight_bytes(elements, shape[0], c)
        else:
            total += elements * c
    return total


def _scheme(quant: str | Quantization, recipe: str = DEFAULT_RECIPE, exclude: tuple[str, ...] = ()) -> Quantization:
    return quant if isinstance(quant, Quantization) else quantization_named(quant, recipe, tuple(exclude))


def rope_table_bytes(cfg: LlamaConfig, dtype: str) -> int:
    """The RoPE cos and sin tables every rank holds: [max_position_embeddings, head_dim / 2] each."""
    return 2 * cfg.max_position_embeddings * (cfg.head_dim // 2) * DTYPE_BYTES[dtype]


def kv_cache_bytes(cfg: LlamaConfig, spec: RankSpec, max_batch: int, max_seq_len: int,
                   kv_dtype: str = "float16", kv_cache: str = "static") -> int:
    layers = len(stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank))
    per_token = layers * kv_heads_local(cfg, spec.tp_size) * cfg.head_dim * 2 * DTYPE_BYTES[kv_dtype]
    return KV_CACHE_LAYOUTS[kv_cache].copies_per_step * max_batch * max_seq_len * per_token


def activation_bytes(cfg: LlamaConfig, spec: RankSpec, max_batch: int, max_input_len: int, max_seq_len: int,
                     dtype: str = "float16", quant: str | Quantization = "none", logits: str = "all",
                     attention: str = "unfused") -> int:
    """Upper bound on one forward step's live activations (see the module docstring)."""
    B, S, L, c = max_batch, max_input_len, max_seq_len, DTYPE_BYTES[dtype]
    h, d, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    hq, hkv, f = heads_local(cfg, spec.tp_size), kv_heads_local(cfg, spec.tp_size), cfg.intermediate_size // spec.tp_size
    total = 4 * B * S * h * c
    total += B * S * (2 * hq + 2 * hkv) * d * c
    total += 2 * B * S * d * c
    if attention == "unfused":
        total += B * hq * S * L * (4 + 4 + c)
        total += B * S * L * 4
    total += 3 * B * S * f * c
    total += _scheme(quant).activation_bytes(B * S, h, hq * d, f)
    if spec.is_last_stage:
        total += B * logits_named(logits).rows(S) * V * (c + 4)
    return total


def rank_memory(request: PlanRequest, spec: RankSpec) -> RankMemory:
    r, cfg = request, request.config
    return RankMemory(
        rank=spec.rank,
        weights_bytes=weights_bytes(cfg, spec, r.quantization, r.dtype),
        kv_cache_bytes=kv_cache_bytes(cfg, spec, r.max_batch, r.max_seq_len, r.kv_dtype, r.kv_cache),
        activation_bytes=activation_bytes(cfg, spec, r.max_batch, r.input_len, r.max_seq_len, r.dtype, r.quantization,
                                          r.logits, r.attention))


def plan(request: PlanRequest) -> Plan:
    request.validate()
    return Plan(request, tuple(rank_memory(request, s) for s in all_ranks(request.tp, request.pp)))


# -- what would fit --------------------------------------------------------------------------

def _largest(fits: Callable[[int], bool], hi: int) -> int | None:
    """Largest n in [1, hi] with fits(n), for fits monotone (true up to some n)."""
    if hi < 1 or not fits(1):
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fits_with(request: PlanRequest, **changes: Any) -> bool:
    return plan(request.replace(**changes)).fits


def largest_max_batch(request: PlanRequest, limit: int | None = None) -> int | None:
    """Largest max_batch that fits with everything else unchanged (up to `limit`; default: the
    requested max_batch when it does not fit, else open-ended)."""
    if limit is None:
        limit = request.max_batch
        if _fits_with(request, max_batch=limit):
            while limit < (1 << 24) and _fits_with(request, max_batch=limit * 2):
                limit *= 2
            limit *= 2
    return _largest(lambda b: _fits_with(request, max_batch=b), limit)


def largest_max_seq_len(request: PlanRequest) -> int | None:
    """Largest max_seq_len <= the requested one that fits (max_input_len clipped to it)."""
    return _largest(lambda n: _fits_with(request, max_seq_len=n), request.max_seq_len)


def largest_max_input_len(request: PlanRequest) -> int | None:
    """Largest tokens-per-step (prefill chunk) <= the requested one that fits."""
    return _largest(lambda n: _fits_with(request, max_input_len=n), request.input_len)


def suggestion(result: Plan) -> dict[str, Any] | None:
    """None when the plan fits; else the largest max_batch / max_seq_len / max_input_len that
    would fit with the other settings unchanged (None where even 1 does not fit)."""
    if result.fits:
        return None
    request = result.request
    worst_weights = max(r.weights_bytes for r in result.ranks)
    out: dict[str, Any] = {
        "max_batch": largest_max_batch(request, limit=request.max_batch),
        "max_seq_len": largest_max_seq_len(request),
        "max_input_len": largest_max_input_len(request),
    }
    if worst_weights + request.reserve_bytes > request.gpu_bytes:
        hint = ("use more ranks (--tp/--pp)" if request.quantization.quantized
                else "use --quant fp8 or more ranks (--tp/--pp)")
        rope = rope_table_bytes(request.config, request.dtype)  # every rank holds it whole: ranks do not help
        if 2 * rope > worst_weights:
            out["note"] = (f"the RoPE cos/sin tables alone need {rope / GiB:.2f} GiB per GPU, one row per position "
                           f"of max_position_embeddings={request.config.max_position_embeddings} (of "
                           f"{request.gpu_bytes / GiB:.2f} GiB); lower max_position_embeddings in config.json")
        else:
            out["note"] = (f"the weights alone need {worst_weights / GiB:.2f} GiB per GPU (+ "
                           f"{request.reserve_bytes / GiB:.2f} GiB reserve) of {request.gpu_bytes / GiB:.2f} GiB; "
                           f"{hint}")
    return out


def plan_json(result: Plan) -> dict[str, Any]:
    """The `llama405 plan --json` document: the documented keys plus the inputs and a suggestion."""
    r = result.request
    return {
        "ranks": [m.as_dict() for m in result.ranks],
        "gpu_bytes": r.gpu_bytes,
        "fits": result.fits,
        "reserve_bytes": r.reserve_bytes,
        "build_host_bytes": max(m.build_host_bytes for m in result.ranks),  # host memory per rank built at once
        "request": {"tp": r.tp, "pp": r.pp, "quant": r.quant, "dtype": r.dtype, "kv_cache": r.kv_cache,
                    "kv_cache_dtype": r.kv_dtype, "max_batch": r.max_batch, "max_seq_len": r.max_seq_len,
                    "max_input_len": r.input_len, "logits": r.logits, "attention": r.attention,
                    "fp8_recipe": r.fp8_recipe, "fp8_exclude": list(r.fp8_exclude),
                    "parameters": r.config.num_parameters()},
        "suggestion": suggestion(result),
        "gpu_decode_width": gpu_decode_width(result),
    }


def format_table(result: Plan) -> str:
    r = result.request
    weights = r.quantization.weights_label(r.dtype)
    title = (f"{r.tp} x {r.pp} ranks, {weights}, {r.kv_cache} KV cache ({r.kv_dtype}), "
             f"batch {r.max_batch}, context {r.max_seq_len}, {r.input_len} tokens/step, {r.attention} attention")
    lines = [title,
             f"{'rank':>4} {'weights':>11} {'kv cache':>11} {'activations':>11} {'total':>11}  (GiB)"]
    for m in result.ranks:
        lines.append(f"{m.rank:>4} {m.weights_bytes / GiB:>11.2f} {m.kv_cache_bytes / GiB:>11.2f} "
                     f"{m.activation_bytes / GiB:>11.2f} {m.total_bytes / GiB:>11.2f}")
    peak = result.peak
    verdict = "fits" if result.fits else "does NOT fit"
    lines.append(f"peak rank {peak.rank}: {peak.total_bytes / GiB:.2f} GiB + {r.reserve_bytes / GiB:.2f} GiB reserve "
                 f"-> {verdict} a {r.gpu_bytes / GiB:.2f} GiB GPU")
    biggest = max(result.ranks, key=lambda m: m.build_host_bytes)
    lines.append(f"engine build: ~{biggest.build_host_bytes / GiB:.1f} GiB of host memory per rank built at once "
                 f"({BUILDER_HOST_FIXED_BYTES / GiB:.1f} GiB + {BUILDER_HOST_BYTES_PER_WEIGHT_BYTE:g}x its weights; "
                 "--workers W needs W times that)")
    width = gpu_decode_width(result)
    if width is not None:
        why = (f"reading all {r.max_seq_len} slots of {r.max_batch} rows adds {100 * width['kv_read_share']:.1f} % "
               "to the weights' bytes")
        lines.append(f"GPU decode: attention over all max_seq_len slots every step (one shape: CUDA graphs); {why}"
                     if width["policy"] == "max" else
                     f"GPU decode: attention width in power-of-two buckets of the longest live row; {why}")
    hint = suggestion(result)
    if hint:
        parts = [f"--{k.replace('_', '-')} {v}" for k, v in hint.items() if k != "note" and v is not None]
        if parts:
            lines.append("would fit with (one change at a time): " + ", ".join(parts))
        if "note" in hint:
            lines.append(hint["note"])
    return "\n".join(lines)
