"""A GGUF file's tokenizer metadata -> tokenizer.json + tokenizer_config.json (HF `tokenizers`).

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`,
already in GPT-2's byte-to-unicode spelling for byte-level BPE), the merges, each token's type,
the special ids, the pre-tokenizer's name (`tokenizer.ggml.pre`) and the chat template. The
pre-tokenizer is only a name; PRE_TOKENIZERS below states, per name, the split llama.cpp applies
for it (llama-vocab.cpp), as `tokenizers` components. An unknown name, or a SentencePiece
vocabulary, is refused rather than tokenized another way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from export.errors import CheckpointError
from export.hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON
from export.tokenizer import PAT_STR

# llama.cpp's token types (llama_token_type): the ones a tokenizer.json lists as added tokens.
CONTROL, USER_DEFINED = 3, 4


def _byte_level() -> pre_tokenizers.PreTokenizer:
    """GPT-2's split (its regex inside ByteLevel) and byte-to-unicode mapping."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: {"\\p{N}", <GPT-2 regex>} — every digit alone, then GPT-2's split.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    build: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # Llama 3: a whole pre-token found in the vocabulary is one token


PRE_TOKENIZERS = {
    "gpt2": PreTokenizer(_byte_level),
    "smollm": PreTokenizer(_digits_then_byte_level),
    "starcoder": PreTokenizer(_digits_then_byte_level),
    "refact": PreTokenizer(_digits_then_byte_level),
    "llama-bpe": PreTokenizer(_llama3, ignore_merges=True),
}


@dataclasses.dataclass(frozen=True)
class GgufVocab:
    """What the GGUF says about its tokenizer (llama.cpp's keys, read by export/gguf_checkpoint.py)."""

    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos_token / eos_token / unk_token / pad_token -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def build_tokenizer(vocab: GgufVocab, source: Path) -> Tokenizer:
    """The `tokenizers` Tokenizer that llama.cpp's metadata describes."""
    if vocab.model != "gpt2":
        raise CheckpointError(f"{source}: tokenizer.ggml.model is {vocab.model!r}; llama405 converts byte-level BPE "
                              "vocabularies (\"gpt2\") only — a SentencePiece (\"llama\") vocabulary needs its "
                              "original tokenizer.json")
    pre = PRE_TOKENIZERS.get(vocab.pre or "gpt2")
    if pre is None:
        raise CheckpointError(f"{source}: tokenizer.ggml.pre is {vocab.pre!r}, a pre-tokenizer llama405 does not "
                              f"know (known: {', '.join(sorted(PRE_TOKENIZERS))}); use the model's own tokenizer.json")
    ids = {token: index for index, token in enumerate(vocab.tokens)}
    if len(ids) != len(vocab.tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens lists a token twice; the vocabulary is damaged")
    pairs = [tuple(m.split(" ")) for m in vocab.merges]
    bad = next((m for m, p in zip(vocab.merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{source}: merge {bad!r} is not two tokens separated by a space")
    tokenizer = Tokenizer(BPE(vocab=ids, merges=pairs, fuse_unk=False, byte_fallback=False,
                              ignore_merges=pre.ignore_merges))
    tokenizer.pre_tokenizer = pre.build()
    tokenizer.decoder = decoders.ByteLevel()
    # Ids already in the vocabulary: added tokens are matched whole in the text, no new ids.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(vocab.tokens, vocab.token_types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(vocab.tokens, vocab.token_types) if kind == USER_DEFINED])
    if vocab.add_bos or vocab.add_eos:
        tokenizer.post_processor = _bos_eos_processor(vocab, source)
    return tokenizer


def _bos_eos_processor(vocab: GgufVocab, source: Path) -> processors.TemplateProcessing:
    parts, specials = [], []
    for flag, role in ((vocab.add_bos, "bos_token"), (vocab.add_eos, "eos_token")):
        if flag and role not in vocab.special_ids:
            raise CheckpointError(f"{source}: the tokenizer adds a {role} but names none")
    if vocab.add_bos:
        bos = vocab.tokens[vocab.special_ids["bos_token"]]
        parts.append(bos)
        specials.append((bos, vocab.special_ids["bos_token"]))
    parts.append("$A")
    if vocab.add_eos:
        eos = vocab.tokens[vocab.special_ids["eos_token"]]
        parts.append(eos)
        specials.append((eos, vocab.special_ids["eos_token"]))
    return processors.TemplateProcessing(single=" ".join(parts), special_tokens=specials)


def tokenizer_config(vocab: GgufVocab, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens by name, BOS/EOS policy, the chat template."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                              "clean_up_tokenization_spaces": False,
                              "add_bos_token": vocab.add_bos, "add_eos_token": vocab.add_eos}
    for role, token_id in sorted(vocab.special_ids.items()):
        config[role] = vocab.tokens[token_id]
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    return config


def write_tokenizer_files(vocab: GgufVocab, source: Path, dest: Path, max_length: int) -> list[Path]:
    """tokenizer.json and tokenizer_config.json in `dest`; returns their paths."""
    tokenizer = build_tokenizer(vocab, source)
    tokenizer.save(str(dest / TOKENIZER_JSON))
    config_path = dest / TOKENIZER_CONFIG
    config_path.write_text(json.dumps(tokenizer_config(vocab, max_length), indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    return [dest / TOKENIZER_JSON, config_path]
