"""Quantization fidelity: perplexity and KV-cache drift of a backend against a reference.

Parity (runner/parity.py) asks "do two runtimes compute the same numbers?". For an FP8 artifact
against its unquantized checkpoint they do not, by design; the useful questions are then how much
worse the quantized model predicts text, how often its greedy choice changes, and where in the
stack its state drifts furthest. All of it is teacher-forced: both backends read the same token
ids through their own KV caches, window tokens per forward step, so no divergence in one backend
changes what the other is asked.

  perplexity      exp(mean NLL) of token t+1 given tokens 0..t, log-softmax in float64
  top-1           fraction of positions where both backends' argmax agree
  KL              mean over positions of KL(reference || backend) of the next-token distributions,
                  nats: the expected perplexity cost on text the reference would write, and a far
                  steadier ranking of quantization recipes than a perplexity delta on a few hundred
                  tokens, which rounding noise moves by about a percent either way
                  (docs/fp8-real-activations.md)
  KV cache        per layer, after the same prefill: max |a - b| and ||a - b|| / ||b|| over the
                  filled slots; the worst layer is the one with the largest relative error (the
                  absolute error of keys grows with their magnitude, which differs by layer)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from export.errors import InputError
from runner.backends.base import Backend, make_feed
from runner.compare import compare_kv


def _token_array(token_ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size < 2:
        raise InputError(f"perplexity needs at least 2 tokens (got {ids.size}): every token after the "
                         "first is predicted from the ones before it")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise InputError(f"token id {bad} is outside the model's vocabulary 0..{vocab_size - 1}")
    return ids


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise InputError(f"window {window!r}: must be a positive number of tokens per forward step")


def _teacher_forced(backend: Backend, ids: np.ndarray, window: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(logits [n, vocab], next-token targets [n]) per chunk; tokens 0..len-2 are fed, so the
    cache ends holding len - 1 tokens."""
    backend.start(1)
    last = ids.size - 1  # the final token is only ever a target
    for start in range(0, last, window):
        stop = min(start + window, last)
        chunk = ids[start:stop]
        feed = make_feed(chunk[None], np.arange(start, stop)[None], np.ones((1, stop)))
        logits = backend.infer(feed)["logits"][0]  # [chunk, vocab]
        if logits.shape[0] != chunk.size:
            raise InputError(f"{backend.name} returned logits for {logits.shape[0]} of {chunk.size} positions; "
                             "perplexity needs every position's logits (export with --logits all)")
        yield logits, ids[start + 1:stop + 1]


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood in float64 (a stable log-softmax)."""
    x = logits.astype(np.float64)  # [n, vocab]
    peak = x.max(axis=-1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))  # [n]
    return log_z - x[np.arange(targets.size), targets]  # [n]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)  # [n, vocab]
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def _kl(logits: np.ndarray, reference_logits: np.ndarray) -> np.ndarray:
    """Per-position KL(reference || logits) in nats, float64 [n]."""
    log_q, log_p = _log_softmax(logits), _log_softmax(reference_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def perplexity(backend: Backend, token_ids: Sequence[int] | np.ndarray, window: int) -> float:
    """exp(mean NLL) of tokens 1..n-1, each given all tokens before it (teacher forcing through the
    backend's KV cache, `window` tokens per forward step). The text must fit the KV cache."""
    _check_window(window)
    ids = _token_array(token_ids, backend.config.vocab_size)
    total = 0.0
    for logits, targets in _teacher_forced(backend, ids, window):
        total += float(_nll(logits, targets).sum())
    return math.exp(total / (ids.size - 1))


def _kv_report(a_layers, b_layers, filled: int) -> dict[str, Any]:
    a = [(k[:, :, :filled], v[:, :, :filled]) for k, v in a_layers]
    b = [(k[:, :, :filled], v[:, :, :filled]) for k, v in b_layers]
    stats = compare_kv(a, b)
    rel = []
    for (ka, va), (kb, vb) in zip(a, b):
        diff = math.sqrt(sum(float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2))
                             for x, y in ((ka, kb), (va, vb))))
        ref = math.sqrt(sum(float(np.sum(y.astype(np.float64) ** 2)) for y in (kb, vb)))
        rel.append(diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf))
    # NaN is the worst there is; max() would skip it depending on position.
    worst = next((i for i, r in enumerate(rel) if math.isnan(r)), int(np.argmax(rel)) if rel else None)
    return {"per_layer_rel_l2": rel, "per_layer_max_abs": stats["per_layer_max_abs"],
            "worst_layer": worst, "worst_layer_rel_l2": rel[worst] if rel else None,
            "max_abs": stats["max_abs"], "max_abs_layer": stats["worst_layer"], "max_abs_part": stats["worst_part"],
            "rel_l2": stats["rel_l2"]}


def fidelity_report(fp8_backend: Backend, reference_backend: Backend, token_ids: Sequence[int] | np.ndarray,
                    window: int) -> dict[str, Any]:
    """How far `fp8_backend` (any backend under test) is from `reference_backend` on the same text.

    Both run teacher-forced over `token_ids` in lockstep, `window` tokens per step; perplexities,
    top-1 agreement over every predicted position, then the KV caches after that same prefill.
    """
    _check_window(window)
    if fp8_backend.config != reference_backend.config:
        raise InputError(f"{fp8_backend.name} and {reference_backend.name} hold different model geometries; "
                         "compare an artifact with the checkpoint it was exported from")
    ids = _token_array(token_ids, reference_backend.config.vocab_size)
    nll_a = nll_b = 0.0
    agree, kl = 0, 0.0
    for (la, targets), (lb, _) in zip(_teacher_forced(fp8_backend, ids, window),
                                      _teacher_forced(reference_backend, ids, window)):
        nll_a += float(_nll(la, targets).sum())
        nll_b += float(_nll(lb, targets).sum())
        kl += float(_kl(la, lb).sum())
        agree += int(np.sum(la.argmax(axis=-1) == lb.argmax(axis=-1)))
    n = ids.size - 1
    ppl_a, ppl_b = math.exp(nll_a / n), math.exp(nll_b / n)
    return {
        "backend": fp8_backend.name, "reference": reference_backend.name,
        "tokens": int(ids.size), "predictions": n, "window": int(window),
        "top1_agreement": agree / n,
        "perplexity": ppl_a, "reference_perplexity": ppl_b,
        "perplexity_delta": ppl_a - ppl_b,
        "perplexity_delta_rel": (ppl_a - ppl_b) / ppl_b,
        "mean_nll_delta": (nll_a - nll_b) / n,
        "mean_kl": kl / n,
        "kv_cache": _kv_report(fp8_backend.cache(), reference_backend.cache(), n),
    }


def format_fidelity(report: dict[str, Any]) -> str:
    """Two lines for under the parity table."""
    kv = report["kv_cache"]
    return "\n".join([
        f"fidelity  perplexity {report['perplexity']:.4g} vs reference {report['reference_perplexity']:.4g}: "
        f"delta {report['perplexity_delta']:+.4g} ({100 * report['perplexity_delta_rel']:+.2f}%) over "
        f"{report['predictions']} predicted tokens{' of ' + report['text'] if report.get('text') else ''}; "
        f"top-1 agreement {report['top1_agreement']:.3f}; mean KL {report['mean_kl']:.4g}",
        f"          KV cache worst layer {kv['worst_layer']} (rel_l2 {kv['worst_layer_rel_l2']:.3g}); "
        f"largest |a-b| {kv['max_abs']:.3g} at layer {kv['max_abs_layer']} {kv['max_abs_part']}",
    ])
