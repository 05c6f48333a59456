"""Hugging Face safetensors checkpoints, read one rank's slices at a time.

Nothing here loads a whole tensor file: `safe_open(...).get_slice` maps the file and copies out
only the rows/columns a rank holds, so exporting one rank of 405B needs memory for a few slices,
not for the 800 GB model.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

from export.config import LlamaConfig
from export.errors import CheckpointError, ConfigError
from export.sharding import (RankSpec, TensorSlice, checkpoint_name, expected_shape,
                             rank_tensor_names, tensor_slice)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """A checkpoint directory: config, tensor -> file map, open file handles, KV-head layout."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory; pass the folder "
                                  "holding config.json and *.safetensors")
        file_config = LlamaConfig.from_hf(self.directory / "config.json")
        self._handles: dict[Path, object] = {}
        self.weight_map = self._read_weight_map()
        self.kv_dup_factor = self._detect_duplicated_kv_heads(file_config)
        try:
            self.config = file_config.replace(
                num_key_value_heads=file_config.num_key_value_heads // self.kv_dup_factor)
        except ConfigError as err:
            raise ConfigError(f"{self.directory / 'config.json'}: {err}") from None

    # -- file layout -------------------------------------------------------------------------

    def _read_weight_map(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                raw = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err!r}); re-download it") from None
            files = {name: self.directory / fname for name, fname in raw.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise CheckpointError(f"{path}: shard named in {index.name} is missing; "
                                          "download it again or fix the index")
            return files
        if single.is_file():
            return {name: single for name in self._handle(single).keys()}
        raise CheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found; "
                              "point --checkpoint at a Hugging Face safetensors checkpoint")

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: cannot read safetensors header ({err}); the file is "
                                      "truncated or corrupt — download it again") from None
        return self._handles[path]

    def _file_of(self, name: str) -> Path:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is not in the checkpoint; "
                                  "is this a Llama checkpoint with the config.json beside it?") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice_view(name).get_shape())

    def _slice_view(self, name: str):
        path = self._file_of(name)
        handle = self._handle(path)
        try:
            return handle.get_slice(name)
        except SafetensorError as err:
            raise CheckpointError(f"{path}: tensor {name!r} unreadable ({err}); the index points "
                                  "at the wrong shard or the file is corrupt") from None

    # -- duplicated KV heads -----------------------------------------------------------------

    def _detect_duplicated_kv_heads(self, cfg: LlamaConfig) -> int:
        """Factor by which each KV head is repeated back to back (1 for ordinary checkpoints).

        Some 405B uploads carry num_key_value_heads 16 with every head stored twice, so 16-way
        tensor parallelism could split them. Serving them as 16 distinct heads doubles the KV
        cache for nothing; the duplicates are found by comparing layer 0's heads.
        """
        n_kv, d = cfg.num_key_value_heads, cfg.head_dim
        if n_kv == 1:
            return 1
        heads = {}
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.0.self_attn.{proj}.weight"
            if name not in self.weight_map:
                return 1
            view = self._slice_view(name)
            if tuple(view.get_shape())[0] != n_kv * d:
                return 1  # the shape check of the load names this mismatch properly
            raw = view[:]
            if raw.element_size() == 1:
                raw = raw.view(torch.uint8)  # FP8 weights: compare the stored bytes
            heads[proj] = raw.reshape(n_kv, d, -1)  # [kv_heads, head_dim, hidden]
        best = 1
        for factor in range(2, n_kv + 1):
            if n_kv % factor or cfg.num_attention_heads % (n_kv // factor):
                continue
            if all(torch.equal(h.reshape(n_kv // factor, factor, d, -1)[:, i],
                               h.reshape(n_kv // factor, factor, d, -1)[:, 0])
                   for h in heads.values() for i in range(1, factor)):
                best = factor
        return best

    # -- reading one rank --------------------------------------------------------------------

    def read(self, name: str, part: TensorSlice) -> torch.Tensor:
        """One tensor (or the part `part` names) copied out of the file.

        Data is read through a short-lived handle and copied: safetensors returns views into
        its memory map, and a long-lived map keeps every page an export touched resident (RSS
        would grow with the number of layers). The cached handles serve headers only.
        """
        if part.axis is None:
            return self._copy_rows(name, 0, self.shape(name)[0] if self.shape(name) else None, None)
        pieces = [self._copy_rows(name, start, stop, None) if part.axis == 0
                  else self._copy_columns(name, start, stop) for start, stop in part.blocks]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=part.axis)

    def _copy_rows(self, name: str, start: int, stop: int | None, columns: tuple[int, int] | None):
        path = self._file_of(name)
        try:
            handle = safe_open(str(path), framework="pt")
            if stop is None:  # a 0-d tensor (scalar scales) cannot be sliced
                return handle.get_tensor(name).clone()
            view = handle.get_slice(name)
            rows = view[start:stop] if columns is None else view[start:stop, columns[0]:columns[1]]
            return rows.clone()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: tensor {name!r} unreadable ({err}); the file is truncated or "
                                  "corrupt — download it again") from None

    def _copy_columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        """A column block, read in row blocks of ~32 MB: each block's pages are mapped only
        while it is copied, so a 4 GB lm_head never becomes resident at once."""
        shape = self.shape(name)
        row_bytes = max(1, int(torch.tensor(shape[1:]).prod()) * self._itemsize(name))
        step = max(1, (32 << 20) // row_bytes)
        return torch.cat([self._copy_rows(name, r, min(r + step, shape[0]), (start, stop))
                          for r in range(0, shape[0], step)])

    def _itemsize(self, name: str) -> int:
        return {"F64": 8, "F32": 4, "I64": 8, "I32": 4}.get(self._slice_view(name).get_dtype(), 2 if
                                                             self._slice_view(name).get_dtype() in ("F16", "BF16") else 1)

    def check_shape(self, name: str) -> None:
        file_name = checkpoint_name(self.config, name)
        want = expected_shape(self.config, file_name, self.kv_dup_factor)
        got = self.shape(file_name)
        if got != want:
            raise CheckpointError(
                f"{self._file_of(file_name)}: tensor {file_name!r} has shape {list(got)} but "
                f"config.json implies {list(want)}; the config does not belong to these weights")

    def iter_rank_tensors(self, spec: RankSpec) -> Iterator[tuple[str, torch.Tensor]]:
        """(module state-dict name, local slice) for every tensor of one rank, one at a time."""
        for name in rank_tensor_names(self.config, spec):
            yield name, self.read_rank_tensor(name, spec)

    def read_rank_tensor(self, name: str, spec: RankSpec) -> torch.Tensor:
        self.check_shape(name)
        file_name = checkpoint_name(self.config, name)
        part = tensor_slice(self.config, spec, name, self.kv_dup_factor)
        return self.read(file_name, part)

    def validate(self, spec: RankSpec) -> None:
        """Every tensor a rank needs is present with the right shape (headers only, no data)."""
        for name in rank_tensor_names(self.config, spec):
            self.check_shape(name)

    def tensor_dtype(self) -> torch.dtype:
        """The storage dtype of the checkpoint (taken from its first norm weight)."""
        name = "model.norm.weight" if "model.norm.weight" in self.weight_map else next(iter(self.weight_map))
        return self._slice_view(name)[:1].dtype
