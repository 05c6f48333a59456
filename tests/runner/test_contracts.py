"""Pure contracts of small runner modules on hand-made inputs: the in-process all-reduce and
lockstep runner of runner/dist.py, and the whole-run aggregate of runner/parity_report.py
(checked against numpy over the concatenated steps, the oracle it must equal)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from runner.compare import StepRow, Tolerance, compare_kv, compare_logits
from runner.dist import LocalAllReduce, run_in_lockstep
from runner.parity_report import ParityReport


# -- dist: the simulated TP all-reduce -------------------------------------------------------

@pytest.mark.parametrize("make", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_every_rank_gets_the_same_sum_step_after_step(make):
    group = LocalAllReduce(3)

    def rank(r: int):
        reduce = group.for_rank(r)
        return [reduce(make([float(r + 1), 10.0 * step])) for step in range(4)]  # the barrier is reused

    results = run_in_lockstep([lambda r=r: rank(r) for r in range(3)], group)
    for per_rank in results:
        assert [list(map(float, x)) for x in per_rank] == [[6.0, 30.0 * step] for step in range(4)]


def test_one_rank_runs_inline_without_a_group():
    assert run_in_lockstep([lambda: threading.current_thread() is threading.main_thread()]) == [True]


def test_a_failing_first_rank_is_raised_not_a_hang():
    group = LocalAllReduce(2)

    def fail():
        raise ValueError("rank 0 broke")

    with pytest.raises(ValueError, match="rank 0 broke"):
        run_in_lockstep([fail, lambda: group.for_rank(1)(np.ones(2))], group)


def test_a_failing_later_rank_is_raised_not_a_hang():
    group = LocalAllReduce(2)

    def fail():
        raise ValueError("rank 1 broke")

    with pytest.raises(ValueError, match="rank 1 broke"):
        run_in_lockstep([lambda: group.for_rank(0)(np.ones(2)), fail], group)


# -- parity_report: the aggregate equals the statistics of all steps together ---------------

TOL = Tolerance(max_abs=10.0, rel_l2=10.0, min_cosine=-1.0, min_top1=0.9, kv_max_abs=10.0)  # per step: loose


def _rows(a_steps, b_steps) -> list[StepRow]:
    rows = []
    for i, (a, b) in enumerate(zip(a_steps, b_steps)):
        kv = compare_kv([(a[..., :2], a[..., 2:4])], [(b[..., :2], b[..., 2:4])])
        row = StepRow(i, "prefill" if i == 0 else "decode", [1] * a.shape[0], compare_logits(a, b), kv,
                      int(a[-1].argmax()), int(b[-1].argmax()), 0.0, 0.0)
        row.judge(TOL)
        rows.append(row)
    return rows


def test_summary_equals_numpy_over_every_position():
    rng = np.random.default_rng(0)
    b_steps = [rng.normal(size=(n, 16)) for n in (5, 1, 1, 1)]  # a prefill then decode steps
    a_steps = [b + rng.normal(scale=0.05, size=b.shape) for b in b_steps]
    a_steps[2][0, :] = b_steps[2][0, ::-1]  # one decode step disagrees on its argmax
    report = ParityReport("a", "b", [1] * 5, 3, TOL, _rows(a_steps, b_steps))
    report.summarize()
    a, b = np.concatenate(a_steps), np.concatenate(b_steps)
    o = report.overall
    assert o["positions"] == 8
    assert o["max_abs"] == pytest.approx(np.abs(a - b).max())
    assert o["mean_abs"] == pytest.approx(np.abs(a - b).mean())
    assert o["rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert o["top1"] == pytest.approx(np.mean(a.argmax(-1) == b.argmax(-1)))
    cosines = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert o["cosine"] == pytest.approx(cosines.min())
    agree = [int(x[-1].argmax()) == int(y[-1].argmax()) for x, y in zip(a_steps, b_steps)]
    assert o["greedy_agreement"] == pytest.approx(np.mean(agree))
    # top-1 over all positions is 7/8 < 0.9: the run fails as a whole, no single step does
    assert all(r.passed for r in report.rows) and not report.passed
    assert report.failures == report.overall_failures and "over 8 positions" in report.failures[0]
    assert "FAIL" in report.format_table().splitlines()[-2]


def test_json_is_strict_non_finite_become_null():
    b = np.ones((2, 8))
    a = b.copy()
    a[1, 3] = np.nan
    report = ParityReport("a", "b", [1, 2], 1, TOL, _rows([a], [b]))
    report.summarize()
    text = report.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    assert not report.passed and "non-finite" in report.failures[0]
