"""Parity run: two backends, same tokens, step by step through the KV cache.

Modelled on Polygraphy's comparator (run two runners on identical inputs, compare every output
with error statistics, judge against tolerances, report which output of which iteration broke).
Here an "iteration" is a generation step:

  step 0   prefill: the prompt tokens; logits of every position are compared
  step k   decode:  one token — the greedy pick of backend B (the reference) after step k-1 —
           fed to *both* backends, so a divergence in A never changes what the two are asked.

After every step the KV caches are compared too, over the filled slots only (a static cache's
slots past the tokens written hold zeros in one runtime and stale data in another).

The metrics and tolerances are runner/compare.py, the report runner/parity_report.py, the
command line (which checks the user's request once, before any backend loads)
runner/parity_cli.py. What the backends cannot serve (a token past the vocabulary, more cache
slots than a static cache holds) they refuse themselves (runner/backends/base.py:check_feed).
"""

from __future__ import annotations

import time
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from runner.backends.base import Backend, make_feed
from runner.compare import StepRow, Tolerance, compare_kv, compare_logits
from runner.parity_report import ParityReport


def _filled(layers: list[tuple[np.ndarray, np.ndarray]], length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in layers]


def _timed(backend: Backend, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    logits = backend.infer(feed)["logits"]
    return logits, time.perf_counter() - started


def run_parity(backend_a: Backend, backend_b: Backend, tokens: Sequence[int], steps: int,
               tolerance: Tolerance, context: dict[str, Any] | None = None,
               on_step: Callable[[StepRow], None] = lambda row: None) -> ParityReport:
    """Prefill `tokens`, then `steps` teacher-forced decode steps; B (the reference) picks each token.

    Preconditions (a caller's mistake, not a user's: ValueError): at least one token, steps >= 0,
    two backends of the same model."""
    tokens = [int(t) for t in tokens]
    if not tokens or steps < 0:
        raise ValueError(f"run_parity needs at least one token and steps >= 0 (got {len(tokens)} tokens, "
                         f"steps={steps})")
    if backend_a.config != backend_b.config:
        raise ValueError(f"backends {backend_a.name} and {backend_b.name} hold different model geometries; "
                         "compare two runtimes of the same model (same artifact or its checkpoint)")
    report = ParityReport(backend_a.name, backend_b.name, tokens, steps, tolerance, [], dict(context or {}))
    for backend in (backend_a, backend_b):
        backend.start(1)
    n = len(tokens)
    feed = make_feed(np.array([tokens]), np.arange(n)[None], np.ones((1, n)))
    fed, filled, kind = tokens, n, "prefill"
    for step in range(steps + 1):
        logits_a, seconds_a = _timed(backend_a, feed)
        logits_b, seconds_b = _timed(backend_b, feed)
        if logits_a.shape != logits_b.shape:
            raise ValueError(f"step {step}: {backend_a.name} returns logits {list(logits_a.shape)} but "
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
