"""Rows at different lengths in one step (static cache, per-sequence write slots) against the
Hugging Face oracle and against each row run alone.

The schedule is what a continuous-batching server does with the whole-batch `infer(feed)`:
three cache rows, right-padded prompts each at its own length, one row idle (an all-zero mask
row) until a request joins it, decode steps where every row writes at its own slot, a
multi-token step where a newcomer's prompt (from slot 0, right-padded) runs beside rows that
feed several teacher-forced tokens at their own slots, and a finished row refilled by a
one-token prompt while its old keys/values are still in the buffer; then the same arrivals
through the runner's rows API (each newcomer prefilled alone on its row, batch 1). Every row's mask is a prefix
of ones; the mask's width W is either the longest live row or max_seq_len (fixed decode shapes),
and both must give the same logits.

The oracle is one unpadded forward of `LlamaForCausalLM` per sequence (prompt + forced tokens);
every real position every step produces is compared (fp32: 1e-4, DESIGN's bar), and so is the
same sequence run alone (batch 1) through the same backend.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from export.checkpoint import Checkpoint
from export.model import ModelOptions
from runner.backends.base import make_feed
from runner.backends.ort import OrtBackend
from runner.backends.torch import TorchBackend
from tests.export.test_export_artifact import MAX_SEQ_LEN, shared_artifact

FP32_MAX_ABS = 1e-4
PAD_ID = 0
ROWS = 3
_rng = np.random.default_rng(7)
# Each sequence: its prompt, then the tokens it is teacher-forced with.
SEQUENCES = {name: [int(t) for t in _rng.integers(3, 256, size=n)]
             for name, n in (("a", 7 + 12), ("b", 3 + 9), ("c", 3 + 6), ("d", 1 + 2))}


@dataclasses.dataclass
class Step:
    """Tokens each row feeds this step: (sequence, how many of its next tokens), or None (idle).
    A row's first feed is its prompt: it starts from slot 0 with an empty mask. rows: the cache
    rows the feeds map to (the runner's rows API: a newcomer's batch-1 prefill); None = all."""
    feeds: list[tuple[str, int] | None]
    rows: slice | None = None


# prompts a (7) and b (3) right-padded, row 2 idle; decode; c (3) joins row 2 in a 4-token step
# beside a and b feeding 4 tokens each; decode; b has finished and d (1 token) takes its row.
SCHEDULE = ([Step([("a", 7), ("b", 3), None])] + [Step([("a", 1), ("b", 1), None])] * 2
            + [Step([("a", 4), ("b", 4), ("c", 3)])] + [Step([("a", 1), ("b", 1), ("c", 1)])] * 3
            + [Step([("a", 1), ("d", 1), ("c", 1)])] + [Step([("a", 1), ("d", 1), ("c", 1)])] * 2)
# The same arrivals through the rows API: each newcomer prefilled alone on its row (batch 1),
# the others' decode steps over every row.
ROWS_SCHEDULE = ([Step([("a", 7), ("b", 3), None])] + [Step([("a", 1), ("b", 1), None])] * 2
                 + [Step([("c", 3)], rows=slice(2, 3))] + [Step([("a", 1), ("b", 1), ("c", 1)])] * 3
                 + [Step([("d", 1)], rows=slice(1, 2))] + [Step([("a", 1), ("d", 1), ("c", 1)])] * 2)


def run_schedule(backend, schedule: list[Step], width: str) -> dict[str, dict[int, np.ndarray]]:
    """{sequence: {position: logits [vocab]}} of every real token fed. width: "live" (W = the
    longest live row, at least the step) or "max" (W = max_seq_len)."""
    backend.start(len(schedule[0].feeds))
    owner: list[str | None] = [None] * len(schedule[0].feeds)  # the sequence each cache row holds
    done = {name: 0 for name in SEQUENCES}  # tokens of each sequence fed so far
    out: dict[str, dict[int, np.ndarray]] = {name: {} for name in SEQUENCES}
    for step in schedule:
        seq = max(n for feed in step.feeds if feed for _, n in [feed])
        first_row = step.rows.start if step.rows else 0
        lengths = []
        for row, feed in enumerate(step.feeds, start=first_row):
            if feed is not None and feed[0] != owner[row]:
                owner[row] = feed[0]  # a newcomer: its own slots from 0, the old ones masked out
            lengths.append(done[feed[0]] + feed[1] if feed else 0)
        cols = max(max(lengths), seq) if width == "live" else backend.max_seq_len
        ids = np.full((len(step.feeds), seq), PAD_ID)
        positions = np.zeros((len(step.feeds), seq), dtype=np.int64)
        mask = np.zeros((len(step.feeds), cols), dtype=np.int64)
        for row, feed in enumerate(step.feeds):
            if feed is None:
                continue
            name, n = feed
            start = done[name]
            assert start == 0 or n == seq, "a row with a past feeds exactly the step's tokens"
            ids[row, :n] = SEQUENCES[name][start:start + n]
            positions[row] = np.arange(start, start + seq)
            mask[row, :start + n] = 1
        logits = backend.infer(make_feed(ids, positions, mask), rows=step.rows)["logits"]
        for row, feed in enumerate(step.feeds):
            if feed is None:
                continue
            name, n = feed
            for i in range(n):
                out[name][done[name] + i] = logits[row, i]
            done[name] += n
    return out


def alone_schedule(name: str, prompt: int) -> list[Step]:
    return [Step([(name, prompt)])] + [Step([(name, 1)])] * (len(SEQUENCES[name]) - prompt)


def schedule_prompts() -> dict[str, int]:
    seen: dict[str, int] = {}
    for step in SCHEDULE:
        for feed in step.feeds:
            if feed is not None:
                seen.setdefault(*feed)
    return seen


@pytest.fixture(scope="module")
def oracle(hf_checkpoint) -> dict[str, np.ndarray]:
    """HF logits [len, vocab] of each whole sequence, unpadded."""
    _, model = hf_checkpoint
    with torch.no_grad():
        return {name: model(torch.tensor([tokens])).logits[0].float().numpy() for name, tokens in SEQUENCES.items()}


def max_error(got: dict[str, dict[int, np.ndarray]], want) -> float:
    """Largest |difference| over every position of every sequence in got (want: arrays or dicts
    indexed by position)."""
    return max(float(np.abs(logits - want[name][p]).max())
               for name, per_position in got.items() for p, logits in per_position.items())


BACKENDS = [
    pytest.param("ort", dict(tp=1, pp=1), id="ort-tp1"),
    pytest.param("ort", dict(tp=2, pp=2), id="ort-tp2xpp2"),
    pytest.param("torch", dict(tp=1, pp=1), id="torch-tp1"),
    pytest.param("torch", dict(tp=2, pp=1), id="torch-tp2"),
    pytest.param("torch", dict(tp=1, pp=2), id="torch-pp2"),
]


def open_backend(kind: str, layout: dict, hf_checkpoint, tmp_path_factory):
    checkpoint, _ = hf_checkpoint
    if kind == "ort":
        return OrtBackend(shared_artifact(tmp_path_factory, checkpoint, kv_cache="static", dtype="float32",
                                          max_seq_len=MAX_SEQ_LEN, **layout))
    return TorchBackend(Checkpoint(checkpoint), dtype="float32", options=ModelOptions(max_seq_len=MAX_SEQ_LEN),
                        **layout)


@pytest.mark.slow
@pytest.mark.parametrize("kind,layout", BACKENDS)
def test_rows_at_their_own_lengths_match_transformers_and_each_row_alone(hf_checkpoint, oracle, tmp_path_factory,
                                                                         kind, layout):
    backend = open_backend(kind, layout, hf_checkpoint, tmp_path_factory)
    live = run_schedule(backend, SCHEDULE, "live")
    fixed = run_schedule(backend, SCHEDULE, "max")
    assert {n: len(p) for n, p in live.items()} == {n: len(t) for n, t in SEQUENCES.items()}  # every token fed
    alone = {}
    for name, prompt in schedule_prompts().items():
        alone.update({name: run_schedule(backend, alone_schedule(name, prompt), "live")[name]})
    rows = run_schedule(backend, ROWS_SCHEDULE, "live")
    errors = {"live vs HF": max_error(live, oracle), "max_seq_len vs HF": max_error(fixed, oracle),
              "live vs alone": max_error(live, alone), "max_seq_len vs live": max_error(fixed, live),
              "rows API vs HF": max_error(rows, oracle), "rows API vs alone": max_error(rows, alone)}
    print(kind, layout, {k: f"{v:.2g}" for k, v in errors.items()})
    assert all(e <= FP32_MAX_ABS for e in errors.values()), errors
    assert max(float(np.abs(o).max()) for o in oracle.values()) > 1.0  # logits that would show a slot error
