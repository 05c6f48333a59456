"""Positional reads of tensor parts from a .safetensors file, without mapping it.

The safetensors library reads through a memory map; a rank's column slice of a row-major
tensor (o_proj, down_proj, lm_head) then faults in, and reads ahead over, every page of the
tensor: 8x the bytes the rank needs at TP8. Here the header is parsed (the format is a u64
length, a JSON header, then the data) and each row's wanted bytes are requested with
posix_fadvise(WILLNEED) a window ahead and copied with pread, so only those pages leave the
disk, queued deep enough to run at sequential speed. Nothing stays mapped, so reads never count
in the exporter's RSS.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from export.dtypes import DTYPES as ELEMENT_TYPES
from export.dtypes import dtype_of_safetensors
from export.errors import CheckpointError, ConfigError

# dtypes the safetensors format defines that llama405 does not read: a valid file, an unsupported model
SAFETENSORS_ONLY_DTYPES = frozenset({"U16", "U32", "U64", "C64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})
PAGE = 4096
WINDOW_ROWS = 4096  # rows whose pages are requested ahead of the copies (measured: 1024-16384 alike)
MAX_PREAD = 1 << 30  # Linux returns at most ~2 GiB per read


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object_pairs_hook: a key written twice is refused (json.loads keeps the last silently;
    the safetensors library refuses such a header)."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class SafetensorsFile:
    """The header of one file; `read` copies any row range x column blocks of a tensor.

    The file's identity (inode, size, mtime) is recorded when the header is read and checked
    around every read: a shard replaced or rewritten while an export streams it is refused by
    name instead of mixing two checkpoints' bytes in one artifact."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors = self._parse_header()

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: cannot read safetensors header ({why}); the file is "
                               "truncated or corrupt — download it again")

    def _parse_header(self) -> dict[str, TensorInfo]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                self.identity = file_identity(st)
                size = st.st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._corrupt(f"{size} bytes, shorter than the 8-byte header length")
                length = struct.unpack("<Q", prefix)[0]
                if length > size - 8:
                    raise self._corrupt(f"header length {length} exceeds the file's {size} bytes")
                header = json.loads(f.read(length), object_pairs_hook=unique_keys)
        except DuplicateKey as dup:
            raise CheckpointError(f"{self.path}: tensor {dup.key!r} appears twice in the safetensors header; "
                                  "the safetensors library refuses such a file — download it again") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a folder, not a safetensors file; a shard must be a file") from None
        except OSError as err:
            raise CheckpointError(f"{self.path}: unreadable ({err.strerror}); check the path and permissions") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._corrupt(f"header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        data_start, data_size = 8 + length, size - 8 - length
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            stored = entry.get("dtype") if isinstance(entry, dict) else None
            if stored in SAFETENSORS_ONLY_DTYPES:
                readable = ", ".join(d.safetensors for d in ELEMENT_TYPES.values())
                raise CheckpointError(f"{self.path}: tensor {name!r} is stored as {stored}, a dtype llama405 does not "
                                      f"support (it reads {readable}); convert the checkpoint to bf16/fp16")
            try:
                dtype = dtype_of_safetensors(entry["dtype"]).torch
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError, ConfigError):
                raise self._corrupt(f"entry {name!r} = {entry!r} is not a known dtype/shape/offsets") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0 or end > data_size:
                raise self._corrupt(f"tensor {name!r} spans bytes [{begin}, {end}) of {data_size}, "
                                    f"but shape {list(shape)} x {entry['dtype']} needs {nbytes}")
            tensors[name] = TensorInfo(dtype, shape, data_start + begin, nbytes)
        # Overlapping tensors would silently read each other's bytes (the safetensors library
        # refuses them too).
        spans = sorted((t.start, t.start + t.nbytes, n) for n, t in tensors.items() if t.nbytes)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self._corrupt(f"tensors {first!r} and {second!r} overlap (bytes {begin - data_start} to "
                                    f"{end - data_start} of the data)")
        return tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this file; the index points "
                                  "at the wrong shard") from None

    def read(self, name: str, rows: tuple[int, int] | None = None,
             columns: tuple[tuple[int, int], ...] | None = None, strided: bool | None = None) -> torch.Tensor:
        """tensor[rows[0]:rows[1]] (all rows if None), restricted to the concatenated column
        blocks of dim 1 if given. `strided` forces (True) or forbids (False) per-row reads of the
        column blocks; None picks them when they skip most of each row's pages."""
        info = self.info(name)
        if not info.shape:
            out = torch.empty((), dtype=info.dtype)
            self._fill(out, [(info.start, info.nbytes)])
            return out
        lo, hi = rows if rows is not None else (0, info.shape[0])
        if not 0 <= lo <= hi <= info.shape[0]:
            raise ValueError(f"rows [{lo}, {hi}) outside {name} of shape {list(info.shape)}")
        if columns is None:
            out = torch.empty((hi - lo, *info.shape[1:]), dtype=info.dtype)
            self._fill(out, [(info.start + lo * info.row_bytes, (hi - lo) * info.row_bytes)])
            return out
        if len(info.shape) != 2:
            raise ValueError(f"column blocks of {name}: only 2-D tensors, shape is {list(info.shape)}")
        item = info.dtype.itemsize
        spans = [(c0 * item, (c1 - c0) * item) for c0, c1 in columns]  # byte offset, length within a row
        wanted = sum(n for _, n in spans)
        if strided is None:  # worth it when a row's wanted pages are well under half its pages
            strided = len(spans) * PAGE + wanted < info.row_bytes // 2
        if not strided:
            whole = self.read(name, (lo, hi))  # [rows, cols]
            return torch.cat([whole[:, c0:c1] for c0, c1 in columns], dim=1)
        out = torch.empty((hi - lo, wanted // item), dtype=info.dtype)
        self._read_strided(out, info, lo, hi, spans)
        return out

    def _fill(self, out: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
        buffer = _bytes_of(out).reshape(-1)
        fd = self._open_unchanged()
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            at = 0
            for offset, length in ranges:
                self._pread_into(fd, buffer[at:at + length], offset)
                at += length
            self._check_unchanged(fd)
        finally:
            os.close(fd)

    def _open_unchanged(self) -> int:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self._check_unchanged(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_unchanged(self, fd: int) -> None:
        """The file at self.path (fd) is still the one whose header was read: a shard replaced or
        rewritten meanwhile would mix two checkpoints (one fstat, no data read)."""
        if file_identity(os.fstat(fd)) != self.identity or file_identity(os.stat(self.path)) != self.identity:
            raise CheckpointError(f"{self.path}: the file changed while llama405 was reading it (its inode, size or "
                                  "modification time differ from when its header was read); the result would mix "
                                  "two checkpoints — wait until the checkpoint is complete and run again")

    def _read_strided(self, out: torch.Tensor, info: TensorInfo, lo: int, hi: int,
                      spans: list[tuple[int, int]]) -> None:
        flat = memoryview(_bytes_of(out).reshape(-1))  # row r's wanted bytes follow row r-1's
        wanted, row_bytes = sum(n for _, n in spans), info.row_bytes
        advise, preadv, willneed = os.posix_fadvise, os.preadv, os.POSIX_FADV_WILLNEED
        fd = self._open_unchanged()
        try:
            advise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead over the skipped pages
            # ~200k rows for a 405B rank: the loops stay lean (one syscall per row and span).
            for window in range(lo, hi, WINDOW_ROWS):
                stop = min(window + WINDOW_ROWS, hi)
                for row in range(window, stop):
                    base = info.start + row * row_bytes
                    for offset, length in spans:
                        advise(fd, base + offset, length, willneed)
                for row in range(window, stop):
                    base, at = info.start + row * row_bytes, (row - lo) * wanted
                    for offset, length in spans:
                        target = flat[at:at + length]
                        if preadv(fd, [target], base + offset) != length:
                            self._pread_into(fd, target, base + offset)  # a short read: finish it
                        at += length
            self._check_unchanged(fd)
        finally:
            os.close(fd)

    def _pread_into(self, fd: int, target: np.ndarray | memoryview, offset: int) -> None:
        view, done = memoryview(target).cast("B"), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:done + MAX_PREAD]], offset + done)
            if n == 0:
                raise self._corrupt(f"file ends at byte {offset + done}, inside a tensor")
            done += n


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous tensor's storage: [rows, row bytes]."""
    flat = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)
    return flat.view(torch.uint8).numpy()
