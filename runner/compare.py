"""Comparing two backends' outputs: tolerances, per-tensor error metrics, one step's verdict.

Modelled on Polygraphy's comparator split: the compare functions (`compare_logits`,
`compare_kv`: pure numpy, so tests and other tools can use them on saved arrays), the limits
they are judged against (`Tolerance`, `DEFAULT_TOLERANCES`) and the result of one step
(`StepRow`). The run loop is runner/parity.py, the whole-run report runner/parity_report.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from collections.abc import Sequence

import numpy as np

from export.errors import InputError
from export.quantization import Quantization, Unquantized


# -- tolerances ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Limits one comparison must stay within. Logit limits apply per step; top-1 agreement
    is judged over all compared positions together (one near-tie flipping one argmax in a
    decode step is noise, a low agreement rate over the run is not). Checked when made (also by
    `replace`), so a Tolerance that exists is a valid one."""

    max_abs: float  # largest |a - b| over all logits of a step
    rel_l2: float  # ||a - b|| / ||b|| over a step's logits (b = reference)
    min_cosine: float  # worst per-position cosine similarity of the logit vectors
    min_top1: float  # fraction of positions whose argmax agrees, over the whole run
    kv_max_abs: float  # largest |a - b| over the filled KV-cache slots, all layers

    def __post_init__(self) -> None:
        for name in ("max_abs", "rel_l2", "kv_max_abs"):
            value = getattr(self, name)
            if not value >= 0:
                raise InputError(f"tolerance {name}={value} must be a number >= 0")
        for name, low in (("min_cosine", -1.0), ("min_top1", 0.0)):
            value = getattr(self, name)
            if not low <= value <= 1:
                raise InputError(f"tolerance {name}={value} must lie in [{low:g}, 1]")

    def replace(self, **changes: float | None) -> Tolerance:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Why these numbers (measured: ORT CPU vs eager torch on the tests' tiny 2-layer model, logits
# of magnitude ~4):
# float32  measured max_abs 2e-6, rel_l2 5e-7, KV 1.5e-6 — pure summation-order noise (TP
#          all-reduce order, fused vs unfused kernels). The limits leave ~200x headroom for
#          126 layers and 128k-wide logits while a single wrong weight (rel_l2 >= 1e-2) fails
#          by orders of magnitude; the oracle bar is max_abs 1e-4 vs transformers, so
#          two runtimes over identical numbers must not be allowed to drift to 1e-2.
# float16  measured max_abs 9e-3, rel_l2 1.6e-3, KV 5e-3: every op rounds to 11 bits
#          (eps 9.8e-4) and error grows with depth. rel_l2 2e-2 gives ~12x headroom; max_abs
#          0.5 is a few fp16 ulps at the |logit| ~ 16-32 that trained Llamas reach (ulp 1/32
#          there) plus depth growth; keys after RoPE reach ~20 (ulp 1/64), so KV 0.25. A
#          perturbed layer gives rel_l2 ~0.1-1 and still fails. Top-1 >= 0.9: fp16 noise can flip
#          a near-tie argmax, a real defect flips most of them.
# bfloat16 8-bit mantissa, eps 7.8e-3 = 8x fp16's: limits scaled ~3-4x from float16 (errors
#          partly average out). Not measurable on ORT CPU (no bf16 MatMul); torch vs TensorRT.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(max_abs=1e-3, rel_l2=1e-4, min_cosine=0.99999, min_top1=0.99, kv_max_abs=1e-3),
    "float16": Tolerance(max_abs=0.5, rel_l2=2e-2, min_cosine=0.999, min_top1=0.9, kv_max_abs=0.25),
    "bfloat16": Tolerance(max_abs=2.0, rel_l2=6e-2, min_cosine=0.995, min_top1=0.8, kv_max_abs=1.0),
    # Same FP8 artifact, two runtimes. fp32 compute: both round x/scale identically, measured
    # 1e-6 on the tiny model, so float32's bounds hold. fp16 compute: a 1-ulp fp16 difference
    # can move an activation across an FP8 rounding step (6-12% of that element).
    "fp8-float32": Tolerance(max_abs=1e-3, rel_l2=1e-4, min_cosine=0.99999, min_top1=0.99, kv_max_abs=1e-3),
    # Measured across test artifacts up to rel_l2 0.16 / cosine 0.985 (onnxruntime divides
    # x/scale in fp16, the reference in fp32; 0.5% of activations land on another FP8 value).
    "fp8-float16": Tolerance(max_abs=2.0, rel_l2=0.2, min_cosine=0.98, min_top1=0.75, kv_max_abs=1.0),
    "fp8-bfloat16": Tolerance(max_abs=2.0, rel_l2=8e-2, min_cosine=0.99, min_top1=0.8, kv_max_abs=1.0),
    # FP8 artifact vs the unquantized checkpoint (--reference): E4M3 keeps 3 mantissa bits, so
    # each GEMM input carries ~3% relative error; on random-weight toy models logits land at
    # rel_l2 ~0.1-0.2. These bounds catch a broken scale (rel_l2 ~1) or a wrong layer, not
    # the quantization itself; trained models are judged by top-1 and perplexity deltas.
    "fp8": Tolerance(max_abs=float("inf"), rel_l2=0.35, min_cosine=0.9, min_top1=0.5, kv_max_abs=float("inf")),
}


def default_preset(dtype: str, quant: Quantization = Unquantized(), reference: bool = False) -> str | None:
    """The DEFAULT_TOLERANCES key for a comparison, or None where there is no default (the
    caller asks for an explicit preset or limits).

    Two backends on the same FP8 artifact compute the same quantized math, so the compute
    dtype's preset applies ("fp8-float16" allows for fp16 rounding flipping an activation across
    an FP8 step); an FP8 artifact against its unquantized --reference measures quantization
    error itself, which the looser "fp8" fidelity preset bounds.
    """
    key = quant.tolerance_key(dtype, reference)
    return key if key in DEFAULT_TOLERANCES else None


# -- metrics (pure numpy) --------------------------------------------------------------------

def relative(diff_norm: float, ref_norm: float) -> float:
    """||a - b|| / ||b||; 0 for two zero tensors, inf for a difference from a zero reference."""
    if ref_norm > 0:
        return diff_norm / ref_norm
    return 0.0 if diff_norm == 0 else math.inf


def compare_logits(a: np.ndarray, b: np.ndarray, top_k: int = 5) -> dict[str, Any]:
    """Error statistics of logits `a` against the reference `b`, both [..., vocab].

    Positions are all leading indices; cosine, top-1 and top-k are per position (cosine is the
    worst position, top-1 the agreeing fraction, top-k the mean |topk(a) & topk(b)| / k).
    `l2_diff`, `l2_ref`, `elements`, `positions` let callers aggregate steps exactly.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: {a.shape} vs {b.shape}")
    vocab = a.shape[-1] if a.ndim else 1
    a64 = a.astype(np.float64).reshape(-1, vocab)
    b64 = b.astype(np.float64).reshape(-1, vocab)
    positions = a64.shape[0]
    diff = np.abs(a64 - b64)
    l2_diff, l2_ref = float(np.linalg.norm(diff)), float(np.linalg.norm(b64))
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots = np.einsum("pv,pv->p", a64, b64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Two all-zero rows are identical (cosine 1); one zero row against another is not.
        cos = np.where(norms > 0, dots / norms, np.where(np.all(a64 == b64, axis=1), 1.0, 0.0))
    k = min(top_k, vocab)
    top_a = np.argpartition(-a64, k - 1, axis=1)[:, :k]
    top_b = np.argpartition(-b64, k - 1, axis=1)[:, :k]
    overlap = [len(np.intersect1d(x, y)) / k for x, y in zip(top_a, top_b)]
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "p99_abs": float(np.percentile(diff, 99)) if diff.size else 0.0,
        "rel_l2": relative(l2_diff, l2_ref),
        "cosine": float(cos.min()) if positions else 1.0,
        "top1": float(np.mean(a64.argmax(axis=1) == b64.argmax(axis=1))) if positions else 1.0,
        f"top{top_k}": float(np.mean(overlap)) if positions else 1.0,
        "nonfinite_a": int(np.size(a64) - np.isfinite(a64).sum()),
        "nonfinite_b": int(np.size(b64) - np.isfinite(b64).sum()),
        "l2_diff": l2_diff, "l2_ref": l2_ref, "elements": int(diff.size), "positions": positions,
    }


def _worse(x: float, y: float) -> float:
    """The larger error, a NaN being the worst there is (plain max() drops it by argument order)."""
    if math.isnan(x):
        return x
    if math.isnan(y):
        return y
    return x if x >= y else y


def compare_kv(a_layers: Sequence[tuple[np.ndarray, np.ndarray]],
               b_layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Error statistics of per-layer (key, value) caches `a` against the reference `b`.

    Pass only the filled slots. `worst_layer` / `worst_part` name where max_abs occurs, which
    points at the layer whose weights or kernels differ.
    """
    if len(a_layers) != len(b_layers):
        raise ValueError(f"KV caches have {len(a_layers)} vs {len(b_layers)} layers")
    worst, worst_layer, worst_part = -1.0, None, None
    sq_diff = sq_ref = sum_abs = 0.0
    elements = nonfinite_a = nonfinite_b = 0
    per_layer = []
    for layer, (pair_a, pair_b) in enumerate(zip(a_layers, b_layers)):
        layer_max = 0.0
        for part, x, y in zip(("key", "value"), pair_a, pair_b):
            if x.shape != y.shape:
                raise ValueError(f"layer {layer} {part} cache shapes differ: {x.shape} vs {y.shape}")
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            d = np.abs(x64 - y64)
            m = float(d.max()) if d.size else 0.0
            if worst_layer is None or (not math.isnan(worst) and (math.isnan(m) or m > worst)):
                worst, worst_layer, worst_part = m, layer, part
            layer_max = _worse(layer_max, m)
            sq_diff += float(np.sum(d * d))
            sq_ref += float(np.sum(y64 * y64))
            sum_abs += float(d.sum())
            elements += d.size
            nonfinite_a += int(x64.size - np.isfinite(x64).sum())
            nonfinite_b += int(y64.size - np.isfinite(y64).sum())
        per_layer.append(layer_max)
    return {
        "max_abs": _worse(worst, 0.0),
        "mean_abs": sum_abs / elements if elements else 0.0,
        "rel_l2": relative(math.sqrt(sq_diff), math.sqrt(sq_ref)),
        "worst_layer": worst_layer, "worst_part": worst_part,
        "per_layer_max_abs": per_layer,
        "nonfinite_a": nonfinite_a, "nonfinite_b": nonfinite_b,
    }


# -- one step's result -----------------------------------------------------------------------

def short(x: float | None) -> str:
    """A limit or a measurement in a failure line: 3 significant digits, '-' for none."""
    return "-" if x is None else f"{x:.3g}"


def over(value: float, limit: float) -> bool:
    return not value <= limit  # NaN counts as over


def under(value: float, limit: float) -> bool:
    return not value >= limit  # NaN counts as under


@dataclasses.dataclass
class StepRow:
    step: int
    kind: str  # "prefill" | "decode"
    tokens: list[int]  # ids fed to both backends at this step
    logits: dict[str, Any]  # compare_logits
    kv: dict[str, Any]  # compare_kv
    next_a: int  # greedy pick of each backend at the last position
    next_b: int
    seconds_a: float
    seconds_b: float
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return f"step {self.step} ({self.kind})"

    @property
    def passed(self) -> bool:
        return not self.failures

    def judge(self, tol: Tolerance) -> None:
        lg, kv, where = self.logits, self.kv, self.label
        if lg["nonfinite_a"] or lg["nonfinite_b"]:
            self.failures.append(f"{where} logits non-finite values: a {lg['nonfinite_a']}, b {lg['nonfinite_b']}")
        if over(lg["max_abs"], tol.max_abs):
            self.failures.append(f"{where} logits max_abs {short(lg['max_abs'])} > {short(tol.max_abs)}")
        if over(lg["rel_l2"], tol.rel_l2):
            self.failures.append(f"{where} logits rel_l2 {short(lg['rel_l2'])} > {short(tol.rel_l2)}")
        if under(lg["cosine"], tol.min_cosine):
            self.failures.append(f"{where} logits cosine {lg['cosine']:.6f} < {tol.min_cosine}")
        if kv["nonfinite_a"] or kv["nonfinite_b"]:
            self.failures.append(f"{where} kv_cache non-finite values: a {kv['nonfinite_a']}, b {kv['nonfinite_b']}")
        if over(kv["max_abs"], tol.kv_max_abs):
            self.failures.append(f"{where} kv_cache max_abs {short(kv['max_abs'])} > {short(tol.kv_max_abs)} "
                                 f"(worst: layer {kv['worst_layer']} {kv['worst_part']})")
