"""Parity harness: two backends, same tokens, step by step through the KV cache.

Modelled on Polygraphy's comparator (run two runners on identical inputs, compare every output
with error statistics, judge against tolerances, report which output of which iteration broke).
Here an "iteration" is a generation step:

  step 0   prefill: the prompt tokens; logits of every position are compared
  step k   decode:  one token — the greedy pick of backend B (the reference) after step k-1 —
           fed to *both* backends, so a divergence in A never changes what the two are asked.

After every step the KV caches are compared too, over the filled slots only (a static cache's
slots past the tokens written hold zeros in one runtime and stale data in another).

The metrics functions are pure numpy, so tests and other tools can use them on saved arrays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from export.errors import InputError
from runner.backends.base import Backend, make_feed

BACKEND_KINDS = ("ort", "torch", "trt")


# -- tolerances ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Limits one comparison must stay within. Logit limits apply per step; top-1 agreement
    is judged over all compared positions together (one near-tie flipping one argmax in a
    decode step is noise, a low agreement rate over the run is not)."""

    max_abs: float  # largest |a - b| over all logits of a step
    rel_l2: float  # ||a - b|| / ||b|| over a step's logits (b = reference)
    min_cosine: float  # worst per-position cosine similarity of the logit vectors
    min_top1: float  # fraction of positions whose argmax agrees, over the whole run
    kv_max_abs: float  # largest |a - b| over the filled KV-cache slots, all layers

    def replace(self, **changes: float | None) -> Tolerance:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check(self) -> None:
        for name in ("max_abs", "rel_l2", "kv_max_abs"):
            value = getattr(self, name)
            if not value >= 0:
                raise InputError(f"tolerance {name}={value} must be a number >= 0")
        for name, low in (("min_cosine", -1.0), ("min_top1", 0.0)):
            value = getattr(self, name)
            if not low <= value <= 1:
                raise InputError(f"tolerance {name}={value} must lie in [{low:g}, 1]")


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


def default_preset(dtype: str, quant: str = "none", reference: bool = False) -> str:
    """The DEFAULT_TOLERANCES key for a comparison.

    Two backends on the same FP8 artifact compute the same quantized math, so the compute
    dtype's preset applies ("fp8-float16" allows for fp16 rounding flipping an activation across
    an FP8 step); an FP8 artifact against its unquantized --reference measures quantization
    error itself, which the looser "fp8" fidelity preset bounds.
    """
    if quant == "fp8":
        key = "fp8" if reference else f"fp8-{dtype}"
    elif quant != "none":
        raise InputError(f"no default parity tolerance for quant={quant} artifacts yet; pass "
                         "--tolerance-preset and/or --max-abs/--rel-l2/--min-top1 explicitly")
    else:
        key = dtype
    if key not in DEFAULT_TOLERANCES:
        raise InputError(f"no default parity tolerance for {key!r}; pass --tolerance-preset "
                         f"({', '.join(DEFAULT_TOLERANCES)})")
    return key


# -- metrics (pure numpy) --------------------------------------------------------------------

def _rel(diff_norm: float, ref_norm: float) -> float:
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
        "rel_l2": _rel(l2_diff, l2_ref),
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
        "rel_l2": _rel(math.sqrt(sq_diff), math.sqrt(sq_ref)),
        "worst_layer": worst_layer, "worst_part": worst_part,
        "per_layer_max_abs": per_layer,
        "nonfinite_a": nonfinite_a, "nonfinite_b": nonfinite_b,
    }


# -- report ----------------------------------------------------------------------------------

def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _over(value: float, limit: float) -> bool:
    return not value <= limit  # NaN counts as over


def _under(value: float, limit: float) -> bool:
    return not value >= limit


@dataclasses.dataclass
class StepRow:
    step: int
    kind: str  # "prefill" | "decode"
    tokens: list[int]  # ids fed to both backends at this step
    logits: dict[str, Any]
    kv: dict[str, Any]
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
        if _over(lg["max_abs"], tol.max_abs):
            self.failures.append(f"{where} logits max_abs {_g(lg['max_abs'])} > {_g(tol.max_abs)}")
        if _over(lg["rel_l2"], tol.rel_l2):
            self.failures.append(f"{where} logits rel_l2 {_g(lg['rel_l2'])} > {_g(tol.rel_l2)}")
        if _under(lg["cosine"], tol.min_cosine):
            self.failures.append(f"{where} logits cosine {lg['cosine']:.6f} < {tol.min_cosine}")
        if kv["nonfinite_a"] or kv["nonfinite_b"]:
            self.failures.append(f"{where} kv_cache non-finite values: a {kv['nonfinite_a']}, b {kv['nonfinite_b']}")
        if _over(kv["max_abs"], tol.kv_max_abs):
            self.failures.append(f"{where} kv_cache max_abs {_g(kv['max_abs'])} > {_g(tol.kv_max_abs)} "
                                 f"(worst: layer {kv['worst_layer']} {kv['worst_part']})")


@dataclasses.dataclass
class ParityReport:
    backend_a: str
    backend_b: str
    prompt: list[int]
    steps: int
    tolerance: Tolerance
    rows: list[StepRow]
    context: dict[str, Any] = dataclasses.field(default_factory=dict)  # artifact, preset, ...
    overall: dict[str, Any] = dataclasses.field(default_factory=dict)
    overall_failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f for row in self.rows for f in row.failures] + self.overall_failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def summarize(self) -> None:
        """Aggregate the rows (exactly, from their sums) and judge the whole-run limits."""
        rows = self.rows
        weight = sum(r.logits["positions"] for r in rows)
        elements = sum(r.logits["elements"] for r in rows)
        self.overall = {
            "max_abs": max(r.logits["max_abs"] for r in rows),
            "mean_abs": sum(r.logits["mean_abs"] * r.logits["elements"] for r in rows) / max(elements, 1),
            "p99_abs": max(r.logits["p99_abs"] for r in rows),  # worst step's p99
            "rel_l2": _rel(math.sqrt(sum(r.logits["l2_diff"] ** 2 for r in rows)),
                           math.sqrt(sum(r.logits["l2_ref"] ** 2 for r in rows))),
            "cosine": min(r.logits["cosine"] for r in rows),
            "top1": sum(r.logits["top1"] * r.logits["positions"] for r in rows) / max(weight, 1),
            "top5": sum(r.logits["top5"] * r.logits["positions"] for r in rows) / max(weight, 1),
            "positions": weight,
            "kv_max_abs": max(r.kv["max_abs"] for r in rows),
            "kv_rel_l2": max(r.kv["rel_l2"] for r in rows),
            "greedy_agreement": sum(r.next_a == r.next_b for r in rows) / len(rows),
        }
        self.overall_failures = []
        if _under(self.overall["top1"], self.tolerance.min_top1):
            self.overall_failures.append(
                f"all steps logits top1 {self.overall['top1']:.3f} < {self.tolerance.min_top1} "
                f"(over {weight} positions)")

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({
            "passed": self.passed,
            "backend_a": self.backend_a, "backend_b": self.backend_b,
            **self.context,
            "prompt_tokens": self.prompt, "steps": self.steps,
            "tolerance": dataclasses.asdict(self.tolerance),
            "rows": [{"step": r.step, "kind": r.kind, "tokens": r.tokens, "logits": r.logits,
                      "kv_cache": r.kv, "next_token_a": r.next_a, "next_token_b": r.next_b,
                      "seconds_a": r.seconds_a, "seconds_b": r.seconds_b, "passed": r.passed,
                      "failures": r.failures} for r in self.rows],
            "overall": self.overall,
            "failures": self.failures,
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        head = (f"{'step':>4}  {'kind':<7} {'tokens':>6}  {'max_abs':>9}  {'rel_l2':>9}  {'cosine':>9}  "
                f"{'top1':>5}  {'top5':>5}  {'kv_max_abs':>10}  verdict")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lg = r.logits
            verdict = "ok" if r.passed else "FAIL " + ",".join(
                sorted({"kv_cache" if " kv_cache " in f else "logits" for f in r.failures}))
            lines.append(f"{r.step:>4}  {r.kind:<7} {len(r.tokens):>6}  {lg['max_abs']:>9.3g}  "
                         f"{lg['rel_l2']:>9.3g}  {lg['cosine']:>9.6f}  {lg['top1']:>5.3f}  "
                         f"{lg['top5']:>5.3f}  {r.kv['max_abs']:>10.3g}  {verdict}")
        o, t = self.overall, self.tolerance
        lines.append("-" * len(head))
        lines.append(f"{'all':>4}  {'':<7} {o['positions']:>6}  {o['max_abs']:>9.3g}  {o['rel_l2']:>9.3g}  "
                     f"{o['cosine']:>9.6f}  {o['top1']:>5.3f}  {o['top5']:>5.3f}  {o['kv_max_abs']:>10.3g}  "
                     f"{'PASS' if self.passed else 'FAIL'}")
        lines.append(f"{'limit':>4}  {'':<7} {'':>6}  {t.max_abs:>9.3g}  {t.rel_l2:>9.3g}  "
                     f"{t.min_cosine:>9.6f}  {t.min_top1:>5.3f}  {'':>5}  {t.kv_max_abs:>10.3g}")
        return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN/inf become null (their presence is already counted as non-finite)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


# -- the run ---------------------------------------------------------------------------------

def check_request(backend_a: Backend, backend_b: Backend, tokens: Sequence[int], steps: int) -> None:
    """Refuse a comparison the backends cannot serve, before any step runs."""
    if steps < 0:
        raise InputError(f"--steps {steps}: must be >= 0 (decode steps after the prefill)")
    if not tokens:
        raise InputError("parity needs at least one prompt token; pass --tokens or --prompt")
    if backend_a.config != backend_b.config:
        raise InputError(f"backends {backend_a.name} and {backend_b.name} hold different model geometries; "
                         "compare two runtimes of the same model (same artifact or its checkpoint)")
    check_tokens(tokens, backend_a.config.vocab_size)
    for backend in (backend_a, backend_b):
        check_capacity(len(tokens), steps, backend.kv_cache, backend.max_seq_len)


def check_tokens(tokens: Sequence[int], vocab_size: int) -> None:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the model's vocabulary 0..{vocab_size - 1}; "
                         f"pass --tokens with ids below {vocab_size} (a synthetic model with a small "
                         "vocab cannot take tokenizer output)")


def check_capacity(prompt_len: int, steps: int, kv_cache: str, max_seq_len: int) -> None:
    if kv_cache == "static" and prompt_len + steps > max_seq_len:
        raise InputError(f"prompt ({prompt_len} tokens) + --steps {steps} needs {prompt_len + steps} cache "
                         f"slots but the artifact was exported with max_seq_len={max_seq_len}; shorten "
                         "the prompt, lower --steps or re-export with a larger --max-seq-len")


def _filled(layers: list[tuple[np.ndarray, np.ndarray]], length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in layers]


def _timed(backend: Backend, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    logits = backend.infer(feed)["logits"]
    return logits, time.perf_counter() - started


def run_parity(backend_a: Backend, backend_b: Backend, tokens: Sequence[int], steps: int,
               tolerance: Tolerance, context: dict[str, Any] | None = None,
               on_step: Callable[[StepRow], None] = lambda row: None) -> ParityReport:
    """Prefill `tokens`, then `steps` teacher-forced decode steps; B (the reference) picks each token."""
    tolerance.check()
    tokens = [int(t) for t in tokens]
    check_request(backend_a, backend_b, tokens, steps)
    report = ParityReport(backend_a.name, backend_b.name, tokens, steps, tolerance, [], dict(context or {}))
    for backend in (backend_a, backend_b):
        backend.start(1)
    n = len(tokens)
    ids = np.array([tokens], dtype=np.int64)
    feed = make_feed(ids, np.arange(n)[None], np.ones((1, n)))
    fed, filled, kind = tokens, n, "prefill"
    for step in range(steps + 1):
        logits_a, seconds_a = _timed(backend_a, feed)
        logits_b, seconds_b = _timed(backend_b, feed)
        if logits_a.shape != logits_b.shape:
            raise InputError(f"step {step}: {backend_a.name} returns logits {list(logits_a.shape)} but "
                             f"{backend_b.name} {list(logits_b.shape)}; the backends were built with "
                             "different --logits modes")
        row = StepRow(step, kind, list(fed), compare_logits(logits_a, logits_b),
                      compare_kv(_filled(backend_a.cache(), filled), _filled(backend_b.cache(), filled)),
                      int(logits_a[0, -1].argmax()), int(logits_b[0, -1].argmax()), seconds_a, seconds_b)
        row.judge(tolerance)
        report.rows.append(row)
        on_step(row)
        # Next input: the reference's greedy token at the next position, cache slot, mask column.
        fed, kind = [row.next_b], "decode"
        feed = make_feed(np.array([fed]), np.array([[filled]]), np.ones((1, filled + 1)))
        filled += 1
    report.summarize()
    return report


# -- backends --------------------------------------------------------------------------------

def open_parity_backend(kind: str, artifact: Path, reference: Path | None = None) -> Backend:
    """One side of a comparison.

    ort    the artifact's rank graphs in onnxruntime
    torch  the eager PyTorch model over the artifact's own weights, or over the checkpoint
           `reference` (same tp/pp/dtype/kv-cache/max-seq-len as the artifact) when given
    trt    TensorRT engines (rank{r}/engine.plan) with the runtime of the flavour that built them, on a GPU
    """
    artifact = Path(artifact)
    if kind == "ort":
        from runner.backends.ort import OrtBackend
        return OrtBackend(artifact)
    if kind == "torch":
        if reference is None:
            from runner.backends.torch_artifact import torch_backend_from_artifact
            return torch_backend_from_artifact(artifact)
        return _reference_backend(artifact, reference)
    check_backend_available(kind, artifact)
    if kind == "trt":
        from runner.backends.trt import TrtBackend
        return TrtBackend(artifact)
    raise InputError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")


def check_backend_available(kind: str, artifact: Path) -> None:
    """Fail fast (before minutes of loading the other side) on a backend that cannot run."""
    if kind != "trt":
        return
    from export.manifest import load_manifest
    manifest = load_manifest(artifact)
    missing = [e.engine_path for e in manifest.ranks if not (artifact / e.engine_path).is_file()]
    if missing:
        raise InputError(f"--a/--b trt needs TensorRT engines, but {artifact} lacks {', '.join(missing)}; "
                         "build them with `llama405 build` (or `build-engine`) on a GPU machine "
                         "with TensorRT >= 10.16, or compare --a ort --b torch")
    from export.trt_flavours import why_engines_cannot_run
    why = why_engines_cannot_run(manifest.extra.get("engines") or {})
    if why is not None:
        raise InputError(f"--a/--b trt: {why}; compare --a ort --b torch on this machine")


def _reference_backend(artifact: Path, reference: Path) -> Backend:
    from export.checkpoint import Checkpoint
    from export.manifest import load_manifest
    from runner.backends.torch import TorchBackend
    from runner.backends.torch_artifact import artifact_model_options
    manifest = load_manifest(artifact)
    checkpoint = Checkpoint(reference)
    if checkpoint.config != manifest.config:
        raise InputError(f"--reference {reference}: its config.json describes another model than the "
                         f"artifact {artifact} was exported from (geometry, rope or vocab differ); pass "
                         "the checkpoint the artifact came from")
    # The reference is the checkpoint's own (unquantized) model at the artifact's layout, so an
    # FP8 artifact is measured against what it approximates.
    options = dataclasses.replace(artifact_model_options(manifest), quant=None)
    return TorchBackend(checkpoint, tp=manifest.tp, pp=manifest.pp, dtype=manifest.dtype, options=options)
