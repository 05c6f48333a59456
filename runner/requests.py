"""A request file for `llama405 generate --requests FILE.jsonl`: one JSON object a line.

    {"prompt": "text"} or {"tokens": [128000, 9906]}        exactly one of the two
    optional: "id" (string or integer; default: the line number), "max_new_tokens" (>= 1),
              "temperature" (0 = greedy), "top_p", "seed" (>= 0), "stop" (a list of strings
              and/or token ids; generation ends when the text contains a string or a listed id
              is produced)

A sampling key a line leaves out takes the command's flag (--max-new-tokens, --temperature,
--top-p, --seed). Blank lines are skipped. Every refusal is one line naming FILE:LINE, the value
and the fix (InputError: exit 2), made before the model runs; the checks that need the model
(vocabulary, cache room) run once it is open (`check_fits_model`), and those that need the
prompt's token count once prompts are tokenized (`check_room`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from export.errors import InputError
from runner.generate import SamplingOptions, sampling_problem
from runner.serve import Request

PROMPT_KEYS = ("prompt", "tokens")
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed")
KEYS = ("id", *PROMPT_KEYS, *SAMPLING_KEYS, "stop")


@dataclasses.dataclass(frozen=True)
class RequestLine:
    """One line of the file, checked for shape and types; its prompt not yet tokenized."""
    where: str  # "FILE:LINE", for every message about this request
    line: int
    id: str | int
    text: str | None  # the "prompt" key
    tokens: tuple[int, ...] | None  # the "tokens" key
    options: SamplingOptions
    stop_texts: tuple[str, ...]
    stop_ids: frozenset[int]

    def request(self, prompt: list[int], stop_ids: frozenset[int]) -> Request:
        """The serving loop's request: the prompt as ids, the model's stop ids beside the line's own."""
        return Request(tuple(prompt), self.options, stop_ids | self.stop_ids, self.stop_texts)


def read_requests(path: Path, defaults: SamplingOptions) -> list[RequestLine]:
    """Every request of the file, in order; InputError naming FILE:LINE for the first bad one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such request file; pass a JSON-lines file, one request a line") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    requests = [_parse_line(f"{path}:{number}", number, raw, defaults)
                for number, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    if not requests:
        raise InputError(f"{path}: holds no request; write one JSON object a line, e.g. {{\"prompt\": \"Hello\"}}")
    return requests


def _parse_line(where: str, number: int, raw: str, defaults: SamplingOptions) -> RequestLine:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); write one JSON object a line") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a JSON {type(obj).__name__}, not an object; write e.g. {{\"prompt\": \"Hello\"}}")
    unknown = [key for key in obj if key not in KEYS]
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; a request takes {', '.join(KEYS)}")
    given = [key for key in PROMPT_KEYS if key in obj]
    if len(given) != 1:
        raise InputError(f"{where}: give exactly one of \"prompt\" (text) or \"tokens\" (a list of token ids), "
                         f"not {' and '.join(given) or 'neither'}")
    text = tokens = None
    if "prompt" in obj:
        text = obj["prompt"]
        if not isinstance(text, str) or not text:
            raise InputError(f"{where}: \"prompt\" must be non-empty text, got {_shown(text)}")
    else:
        tokens = obj["tokens"]
        if not isinstance(tokens, list) or not tokens or not all(_is_int(t) for t in tokens):
            raise InputError(f"{where}: \"tokens\" must be a non-empty list of integer token ids, got "
                             f"{_shown(tokens)}")
        tokens = tuple(tokens)
    request_id = obj.get("id", number)
    if not (isinstance(request_id, str) or _is_int(request_id)):
        raise InputError(f"{where}: \"id\" must be a string or an integer, got {_shown(request_id)}")
    options = SamplingOptions(**{key: _sampling_value(where, key, obj[key]) if key in obj else getattr(defaults, key)
                                 for key in SAMPLING_KEYS})
    stop = obj.get("stop", [])
    if not isinstance(stop, list) or not all((isinstance(s, str) and s) or _is_int(s) for s in stop):
        raise InputError(f"{where}: \"stop\" must be a list of non-empty strings and/or token ids, got {_shown(stop)}")
    return RequestLine(where, number, request_id, text, tokens, options,
                       tuple(s for s in stop if isinstance(s, str)), frozenset(s for s in stop if _is_int(s)))


def _sampling_value(where: str, key: str, value):
    if key in ("max_new_tokens", "seed"):
        if not _is_int(value) or value < (1 if key == "max_new_tokens" else 0):
            least = "1 (a request produces at least one token)" if key == "max_new_tokens" else "0"
            raise InputError(f"{where}: \"{key}\" must be an integer >= {least}, got {_shown(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: \"{key}\" must be a number, got {_shown(value)}")
    why = sampling_problem(key, value)
    if why is not None:
        raise InputError(f"{where}: \"{key}\" {value} {why}")
    return float(value)


def check_fits_model(requests: list[RequestLine], vocab_size: int, max_seq_len: int, bounded: bool) -> None:
    """What the model refuses, before any prompt is tokenized: token ids past its vocabulary, stop
    ids past it, a max_new_tokens that no prompt (at least one token) leaves room for, and a
    token prompt without room for its new tokens."""
    for r in requests:
        for what, ids in (("\"tokens\"", r.tokens or ()), ("\"stop\"", r.stop_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InputError(f"{r.where}: {what} holds token id {bad[0]}, outside the model's vocabulary "
                                 f"0..{vocab_size - 1}; use ids of this model's tokenizer")
        if bounded and 1 + r.options.max_new_tokens > max_seq_len:
            raise InputError(f"{r.where}: max_new_tokens {r.options.max_new_tokens} leaves no room for a prompt in "
                             f"the model's {max_seq_len} cache slots (max_seq_len); lower it to at most "
                             f"{max_seq_len - 1} or re-export with a larger --max-seq-len")
        if r.tokens is not None:
            check_room(r, len(r.tokens), max_seq_len, bounded)


def check_room(line: RequestLine, prompt_tokens: int, max_seq_len: int, bounded: bool) -> None:
    """A request's prompt + new tokens must fit its own cache row (static cache: max_seq_len slots)."""
    needed = prompt_tokens + line.options.max_new_tokens
    if bounded and needed > max_seq_len:
        raise InputError(f"{line.where}: the prompt ({prompt_tokens} tokens) + max_new_tokens "
                         f"{line.options.max_new_tokens} needs {needed} cache slots but max_seq_len is {max_seq_len}; "
                         "shorten the prompt, lower max_new_tokens or re-export with a larger --max-seq-len")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
