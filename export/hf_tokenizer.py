"""A checkpoint's own Hugging Face tokenizer: `tokenizer.json` through the `tokenizers` library,
special tokens and the chat template from `tokenizer_config.json` / `chat_template.jinja`.

This serves every checkpoint that is not Llama 3's tiktoken `tokenizer.model` (export/tokenizer.py
decides which). The names are the Llama 3 tokenizer's (encode, decode, encode_dialog, stop_ids,
bos_id, pad_id, vocab_size), so callers do not branch on the kind.

As transformers does:
- `encode(text)` adds a BOS only where the tokenizer itself adds one: tokenizer.json's
  post-processor (SmolLM2's adds none; Llama 3's HF files add <|begin_of_text|>).
- `encode_dialog` renders the chat template (export/chat_template.py) and tokenizes the result
  with special-token strings recognised, as `apply_chat_template(tokenize=True)` does.
Unlike transformers, plain text never becomes special tokens (a prompt containing "<|im_end|>"
is those characters), as with the Llama 3 tokenizer: user text cannot forge turn boundaries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from export.chat_template import render_chat
from export.errors import ConfigError, InputError, excerpt

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The special-token roles transformers passes to a chat template, by tokenizer_config.json key.
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    fix = "re-download it with the checkpoint (or re-run the conversion that wrote it)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}; {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({excerpt(err)}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _token_text(value: Any, key: str, path: Path) -> str | None:
    """A tokenizer_config.json special token: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise ConfigError(f"{path}: {key}={value!r} must be a token string (or null)")


def _chat_template(directory: Path, config: dict[str, Any], config_path: Path) -> tuple[str, str] | None:
    """(template source, where it came from): chat_template.jinja wins over the config's entry."""
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    value = config.get("chat_template")
    if value is None:
        return None
    if isinstance(value, str):
        return value, str(config_path)
    if isinstance(value, list):  # named templates: the "default" one is the chat format
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"], f"{config_path} (chat_template 'default')"
    raise ConfigError(f"{config_path}: chat_template must be a Jinja string or a list of named templates "
                      "with a 'default' one")


class HFTokenizer:
    """Text <-> ids with a checkpoint's tokenizer.json (and its tokenizer_config.json)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.source = directory / TOKENIZER_JSON
        try:
            self._tok = Tokenizer.from_file(str(self.source))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            if not self.source.is_file():
                raise ConfigError(f"tokenizer file {self.source} not found; copy the checkpoint's tokenizer.json "
                                  "there") from None
            raise ConfigError(f"{self.source} is not a tokenizer.json the `tokenizers` library reads ({excerpt(err)}); "
                              "re-download it with the checkpoint") from None
        config_path = directory / TOKENIZER_CONFIG
        config = _read_json(config_path) if config_path.is_file() else {}
        self.config_source = config_path
        self.files = tuple(p for p in (self.source, config_path, directory / CHAT_TEMPLATE_FILE) if p.is_file())
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special_tokens = {}  # role -> token text, for the chat template
        ids = {}
        for role in SPECIAL_ROLES:
            text = _token_text(config.get(role), role, config_path)
            if text is None:
                continue
            token_id = self._tok.token_to_id(text)
            if token_id is None:
                raise ConfigError(f"{config_path}: {role} {text!r} is not a token of {self.source}; the two files "
                                  "come from different tokenizers — re-download both")
            self.special_tokens[role], ids[role] = text, token_id
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.pad_id: int | None = ids.get("pad_token")
        self._adds_bos = self._decide_bos()
        self._template = _chat_template(directory, config, config_path)

    def _decide_bos(self) -> bool:
        """Does tokenizer.json's own post-processor put the BOS in front of a text? (transformers'
        generic fast tokenizer follows the post-processor, not tokenizer_config's add_bos_token.)"""
        probe = self._tok.encode("a", add_special_tokens=True).ids
        return self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """The end-of-turn / end-of-text id the tokenizer names (none: generation runs to its limit)."""
        return frozenset() if self.eos_id is None else frozenset({self.eos_id})

    @property
    def chat_template(self) -> str | None:
        return None if self._template is None else self._template[0]

    # -- text --------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of `text`; with bos, the BOS in front when this tokenizer adds one (as transformers'
        tokenizer(text) does). Special-token strings inside `text` stay plain text."""
        if not isinstance(text, str):
            raise InputError(f"text to tokenize must be str, got {type(text).__name__}; decode bytes first")
        self._tok.encode_special_tokens = True
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False
        return ([self.bos_id] if bos and self._adds_bos else []) + ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens written out."""
        checked = [int(i) for i in ids]
        bad = next((i for i in checked if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise InputError(f"token id {bad} is outside the vocabulary of {self.source} (0..{self.vocab_size - 1}); "
                             "check the model's vocab_size and the ids")
        return self._tok.decode(checked, skip_special_tokens=False)

    # -- chat --------------------------------------------------------------------------------
    def render_dialog(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ConfigError(f"{self.config_source}: this tokenizer has no chat template (no chat_template in "
                              f"{TOKENIZER_CONFIG}, no {CHAT_TEMPLATE_FILE}); --chat needs one — prompt without --chat")
        source, origin = self._template
        return render_chat(source, origin, messages, add_generation_prompt, self.special_tokens)

    def encode_dialog(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat template applied to `messages`, tokenized with special tokens recognised."""
        text = self.render_dialog(messages, add_generation_prompt)
        return self._tok.encode(text, add_special_tokens=False).ids
