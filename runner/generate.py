"""Prefill + decode through a backend's KV cache: greedy or temperature/top-p sampling.

A batch of prompts of different lengths is right-padded: each sequence keeps its own positions,
every step occupies the same cache slot in every sequence (the attention mask's length), and the
padding slots of shorter prompts stay masked out by attention_mask — in both cache modes. The
same loop drives every backend.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable

import numpy as np

from export.bounds import MAX_NEW_TOKENS, SEED
from export.errors import InputError
from runner.backends.base import Backend, make_feed


# What each sampling value must be: the one statement of the rules, read by SamplingOptions
# (naming the field) and by the command line's flag types (argparse names the flag).
SAMPLING_RULES = {
    "max_new_tokens": (lambda v: 0 <= v <= MAX_NEW_TOKENS.hi,
                       f"must be >= 0 and at most {MAX_NEW_TOKENS.hi} ({MAX_NEW_TOKENS.reason})"),
    "temperature": (lambda v: v >= 0 and math.isfinite(v), "must be a finite number >= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),  # also refuses nan
    "seed": (lambda v: SEED.problem(v) is None, f"must be {SEED.describe()} ({SEED.reason})"),
}


def sampling_problem(field: str, value: float) -> str | None:
    """What is wrong with `value` for SamplingOptions.`field`, or None."""
    ok, rule = SAMPLING_RULES[field]
    return None if ok(value) else rule


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for field in SAMPLING_RULES:
            value = getattr(self, field)
            why = sampling_problem(field, value)
            if why is not None:
                raise InputError(f"sampling {field}={value} {why}")


@dataclasses.dataclass
class Generation:
    prompts: list[list[int]]
    tokens: list[list[int]]  # new tokens per sequence, stop token included when hit
    stop_reasons: list[str]  # "stop_token" | "max_new_tokens"
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # per decode step: sampling + forward

    @property
    def decode_tokens_per_second(self) -> float:
        produced = self.decode_steps * len(self.prompts)
        return produced / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def choose_tokens(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of logits [batch, vocab]."""
    if options.temperature == 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / options.temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    chosen = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = order[: int(np.searchsorted(cumulative, options.top_p)) + 1]
        chosen[row] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return chosen


def check_room(backend: Backend, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a run whose prompt + new tokens cannot fit a bounded cache (checked once with
    prompt_tokens=1 before any text is tokenized, then with the real width)."""
    if backend.cache_layout.bounded and prompt_tokens + max_new_tokens > backend.max_seq_len:
        raise InputError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                         f"max_seq_len={backend.max_seq_len}; shorten the prompt, lower "
                         "--max-new-tokens or re-export with a larger --max-seq-len")


def generate(backend: Backend, prompts: list[list[int]], options: SamplingOptions,
             stop_ids: Iterable[int] = (), pad_id: int = 0) -> Generation:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    stop = set(stop_ids)
    batch, lengths = len(prompts), np.array([len(p) for p in prompts])
    width = int(lengths.max())
    check_room(backend, width, options.max_new_tokens)
    ids = np.full((batch, width), pad_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for b, prompt in enumerate(prompts):
        ids[b, :len(prompt)], mask[b, :len(prompt)] = prompt, 1
    positions = np.tile(np.arange(width), (batch, 1))
    rng = np.random.default_rng(options.seed)

    backend.start(batch)
    started = time.perf_counter()
    logits = backend.infer(make_feed(ids, positions, mask))["logits"]
    if logits.shape[1] == 1 and width > 1 and (lengths != width).any():
        raise InputError("this artifact returns last-position logits only, which cannot serve a batch "
                         "of prompts of different lengths; re-export with --logits all")
    last = logits[np.arange(batch), np.minimum(lengths - 1, logits.shape[1] - 1)]  # [batch, vocab]
    prefill_seconds = time.perf_counter() - started

    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["max_new_tokens"] * batch
    done = np.zeros(batch, dtype=bool)
    steps, started = 0, time.perf_counter()
    step_seconds: list[float] = []
    for step in range(options.max_new_tokens):
        step_started = time.perf_counter()
        nxt = choose_tokens(last, options, rng)
        for b in np.flatnonzero(~done):
            tokens[b].append(int(nxt[b]))
            if int(nxt[b]) in stop:
                done[b], reasons[b] = True, "stop_token"
        if done.all() or step == options.max_new_tokens - 1:
            break
        nxt = np.where(done, pad_id, nxt)
        mask = np.concatenate([mask, (~done).astype(np.int64)[:, None]], axis=1)
        feed = make_feed(nxt[:, None], (lengths + step)[:, None], mask)  # slot: mask's length - 1
        last = backend.infer(feed)["logits"][:, -1]
        steps += 1
        step_seconds.append(time.perf_counter() - step_started)
    return Generation(prompts, tokens, reasons, prefill_seconds, time.perf_counter() - started, steps, step_seconds)
