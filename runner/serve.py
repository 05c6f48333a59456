"""Serving a list of requests through one backend: continuous batching, or lockstep batches.

continuous (a static-cache artifact with per-sequence write slots, docs/batching.md): the
backend holds `max_batch` cache rows. Between steps every free row takes the next waiting
request, whose prompt is prefilled alone on its row (the rows API: batch 1, mask ones over the
prompt, slots from 0; a prompt longer than a TensorRT profile's tokens per step is cut by the
backend into chunks of exactly that many tokens on that row, each chunk's mask ones from slot 0
to its end); then one decode step carries every live row at its own length (row b feeds its last
token at its own next slot, its mask a prefix of ones), a finished row is free at once. The
step spans the live rows only (the rows API takes a slice); a free row inside the span gets one
real slot (its slot 0) so that no row of a step is fully masked.

lockstep (any artifact, concat too): requests in groups of `max_batch`, each group prefilled as
one right-padded batch and decoded until its longest member ends (runner/generate.py's
schedule); the next group waits for the whole batch.

Each request samples with its own generator (its seed), so its tokens do not depend on its batch
neighbours: its logits match the request run alone within the backend's float tolerance, and its
greedy tokens are the same. Every process of a torchrun launch runs this loop with the same
logits, so all take the same decisions. Times are measured from the start of the run, when
every request is taken to have arrived.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from export.errors import InputError
from export.kv_cache import PER_SEQUENCE, decode_width
from runner.backends.base import Backend, make_feed
from runner.generate import SamplingOptions, choose_tokens

BATCHING = ("continuous", "lockstep")
PAD_ID = 0  # the token a free row or a finished lockstep row feeds (its logits are never read)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]  # token ids
    options: SamplingOptions
    stop_ids: frozenset[int] = frozenset()  # generation ends when one is produced (it is kept)
    stop_texts: tuple[str, ...] = ()  # ... or when the generated text contains one


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # new tokens, a stop token included
    stop_reason: str  # "stop_token" | "stop_text" | "max_new_tokens"
    first_token_s: float  # since the run started
    finished_s: float
    logits: list[np.ndarray] | None = None  # [vocab] float32 behind each token (keep_logits)

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens after the first per second of the request's own decoding (None for one token)."""
        span = self.finished_s - self.first_token_s
        return (len(self.tokens) - 1) / span if len(self.tokens) > 1 and span > 0 else None


@dataclasses.dataclass
class Served:
    batching: str
    max_batch: int
    completions: list[Completion]  # in request order
    seconds: float
    decode_steps: int  # forward steps that decoded live rows
    prefills: int  # forward steps that prefilled prompts

    @property
    def generated_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.completions)

    def totals(self) -> dict:
        return {"batching": self.batching, "max_batch": self.max_batch, "requests": len(self.completions),
                "generated_tokens": self.generated_tokens, "seconds": self.seconds,
                "tokens_per_second": self.generated_tokens / self.seconds if self.seconds > 0 else None,
                "mean_time_to_first_token_s": float(np.mean([c.first_token_s for c in self.completions])),
                "decode_steps": self.decode_steps, "prefills": self.prefills}


def check_continuous(backend: Backend) -> None:
    """The loaded model must write each row at its own slot (artifacts: check their manifest
    first with Manifest.require_per_sequence_writes, which knows older exports)."""
    if backend.cache_layout.writes != PER_SEQUENCE:
        raise InputError(f"continuous batching needs a KV cache where each row writes its own slot; the "
                         f"{backend.cache_layout.name} cache writes every row at the same slot: use --kv-cache "
                         "static, or --batching lockstep")


def check_lockstep_room(backend: Backend, requests: list[Request], max_batch: int) -> None:
    """A lockstep group pads every prompt to its longest and runs until its longest output: its
    cache must hold both, which a request that fits alone may not."""
    if not backend.cache_layout.bounded:
        return
    for first in range(0, len(requests), max_batch):
        group = requests[first:first + max_batch]
        needed = max(len(r.prompt) for r in group) + max(r.options.max_new_tokens for r in group)
        if needed > backend.max_seq_len:
            raise InputError(f"lockstep batch of requests {first + 1}..{first + len(group)} pads its prompts to the "
                             f"longest and runs to its longest output: {needed} cache slots, but max_seq_len is "
                             f"{backend.max_seq_len}; use --batching continuous (each request needs only its own "
                             "slots) or a smaller --max-batch")


def serve(backend: Backend, requests: list[Request], max_batch: int, batching: str = "continuous",
          width: str = "live", detokenize: Callable[[list[int]], str] | None = None,
          keep_logits: bool = False) -> Served:
    """Run every request to its end; completions in request order. width: the decode step's
    attention width policy (export/kv_cache.py:decode_width; continuous only). detokenize: the
    tokenizer's decode, needed by requests with stop texts."""
    if batching not in BATCHING:
        raise InputError(f"batching {batching!r}: choose one of {', '.join(BATCHING)}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"--max-batch {max_batch!r} must be an integer >= 1")
    if not requests or any(not r.prompt for r in requests):
        raise InputError("every request needs a prompt of at least one token")
    if any(r.options.max_new_tokens < 1 for r in requests):
        raise InputError("every request produces at least one token: max_new_tokens must be >= 1")
    if detokenize is None and any(r.stop_texts for r in requests):
        raise InputError("requests with stop texts need a tokenizer to read the generated text")
    for r in requests:
        backend.cache_layout.check_fits(len(r.prompt) + r.options.max_new_tokens, backend.max_seq_len)
    if batching == "continuous":
        check_continuous(backend)
        return _Continuous(backend, requests, max_batch, width, detokenize, keep_logits).run()
    check_lockstep_room(backend, requests, max_batch)
    return _Lockstep(backend, requests, max_batch, detokenize, keep_logits).run()


class _Run:
    """What both schedules share: the clock, each request's generator and its end."""

    def __init__(self, backend, requests, max_batch, detokenize, keep_logits):
        self.backend, self.requests, self.max_batch = backend, requests, max_batch
        self.detokenize, self.keep_logits = detokenize, keep_logits
        self.rngs = [np.random.default_rng(r.options.seed) for r in requests]
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.logits: list[list[np.ndarray]] = [[] for _ in requests]
        self.first: list[float | None] = [None] * len(requests)
        self.done: list[Completion | None] = [None] * len(requests)
        self.decode_steps = self.prefills = 0
        self.started = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.started

    def take(self, index: int, logits: np.ndarray) -> int | None:
        """Sample request `index`'s next token from its logits [vocab]; returns it while the
        request goes on, None once it has ended."""
        request = self.requests[index]
        token = int(choose_tokens(logits[None], request.options, self.rngs[index])[0])
        tokens = self.tokens[index]
        tokens.append(token)
        if self.keep_logits:
            self.logits[index].append(np.array(logits, dtype=np.float32))
        now = self.now()
        if self.first[index] is None:
            self.first[index] = now
        reason = None
        if token in request.stop_ids:
            reason = "stop_token"
        elif request.stop_texts and any(s in self.detokenize(tokens) for s in request.stop_texts):
            reason = "stop_text"
        elif len(tokens) >= request.options.max_new_tokens:
            reason = "max_new_tokens"
        if reason is None:
            return token
        self.done[index] = Completion(tokens, reason, self.first[index], now,
                                      self.logits[index] if self.keep_logits else None)
        return None

    def served(self, batching: str) -> Served:
        return Served(batching, self.max_batch, list(self.done), self.now(), self.decode_steps, self.prefills)


@dataclasses.dataclass
class _Row:
    index: int  # the request it serves
    length: int  # cache slots its tokens fill once `token` is fed
    token: int  # the next token to feed


class _Continuous(_Run):
    def __init__(self, backend, requests, max_batch, width, detokenize, keep_logits):
        super().__init__(backend, requests, max_batch, detokenize, keep_logits)
        self.width = width
        self.waiting = collections.deque(range(len(requests)))
        self.rows: list[_Row | None] = [None] * max_batch

    def run(self) -> Served:
        self.backend.start(self.max_batch)
        while self.waiting or any(self.rows):
            for row in range(self.max_batch):
                while self.rows[row] is None and self.waiting:  # one that ends at its first token frees it again
                    self.rows[row] = self.prefill(row, self.waiting.popleft())
            if any(self.rows):
                self.decode()
        return self.served("continuous")

    def prefill(self, row: int, index: int) -> _Row | None:
        """The prompt alone on its row, from slot 0; its first token."""
        prompt = np.array([self.requests[index].prompt], dtype=np.int64)  # [1, P]
        length = prompt.shape[1]
        feed = make_feed(prompt, np.arange(length)[None], np.ones_like(prompt))
        logits = self.backend.infer(feed, rows=slice(row, row + 1))["logits"]  # [1, P or 1, vocab]
        self.prefills += 1
        token = self.take(index, logits[0, -1])
        return None if token is None else _Row(index, length + 1, token)

    def decode(self) -> None:
        """One step over the span of live rows, each at its own slot."""
        live = [r for r, state in enumerate(self.rows) if state is not None]
        first, end = live[0], live[-1] + 1
        rows = self.rows[first:end]
        w = decode_width(self.width, max(state.length for state in rows if state), self.backend.max_seq_len)
        ids = np.full((len(rows), 1), PAD_ID, dtype=np.int64)
        positions = np.zeros((len(rows), 1), dtype=np.int64)
        mask = np.zeros((len(rows), w), dtype=np.int64)
        mask[:, 0] = 1  # a free row in the span: one real slot (its own slot 0), never a fully masked row
        for i, state in enumerate(rows):
            if state is not None:
                ids[i, 0], positions[i, 0] = state.token, state.length - 1
                mask[i, :state.length] = 1
        whole = first == 0 and end == self.max_batch
        logits = self.backend.infer(make_feed(ids, positions, mask), rows=None if whole else slice(first, end))
        self.decode_steps += 1
        for i, state in enumerate(rows):
            if state is None:
                continue
            token = self.take(state.index, logits["logits"][i, -1])
            if token is None:
                self.rows[first + i] = None
            else:
                state.token, state.length = token, state.length + 1


class _Lockstep(_Run):
    def run(self) -> Served:
        for first in range(0, len(self.requests), self.max_batch):
            self.group(list(range(first, min(first + self.max_batch, len(self.requests)))))
        return self.served("lockstep")

    def group(self, indices: list[int]) -> None:
        """Right-padded prefill of the group, then decode steps at one slot for every row (a
        finished row feeds a masked pad) until every member has ended."""
        prompts = [self.requests[i].prompt for i in indices]
        batch, lengths = len(prompts), np.array([len(p) for p in prompts])
        width = int(lengths.max())
        ids = np.full((batch, width), PAD_ID, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)], mask[b, :len(prompt)] = prompt, 1
        self.backend.start(batch)
        logits = self.backend.infer(make_feed(ids, np.tile(np.arange(width), (batch, 1)), mask))["logits"]
        self.prefills += 1
        if logits.shape[1] == 1 and (lengths != width).any():
            raise InputError("this artifact returns last-position logits only, which cannot serve a lockstep batch "
                             "of prompts of different lengths; re-export with --logits all, or --max-batch 1")
        last = logits[np.arange(batch), np.minimum(lengths - 1, logits.shape[1] - 1)]  # [batch, vocab]
        nxt = [self.take(i, last[b]) for b, i in enumerate(indices)]
        step = 0
        while any(t is not None for t in nxt):
            live = np.array([t is not None for t in nxt])
            mask = np.concatenate([mask, live.astype(np.int64)[:, None]], axis=1)
            tokens = np.array([[PAD_ID if t is None else t] for t in nxt], dtype=np.int64)
            last = self.backend.infer(make_feed(tokens, (lengths + step)[:, None], mask))["logits"][:, -1]
            self.decode_steps += 1
            nxt = [None if t is None else self.take(i, last[b]) for b, (i, t) in enumerate(zip(indices, nxt))]
            step += 1
