"""Positional safetensors reads against the safetensors library (the oracle), and the page
savings of per-row column reads measured against the page cache."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.checkpoint import Checkpoint
from export.errors import CheckpointError
from export.safetensors_file import SafetensorsFile
from export.sharding import TensorSlice


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    data = {
        "w_bf16": torch.randn(37, 300, generator=gen).to(torch.bfloat16),
        "w_f32": torch.randn(5, 4096, generator=gen),
        "w_fp8": torch.randn(16, 64, generator=gen).to(torch.float8_e4m3fn),
        "norm": torch.randn(300, generator=gen).to(torch.float16),
        "scale": torch.tensor(0.25),
        "cube": torch.randn(3, 4, 5, generator=gen),
    }
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(data, str(path))
    return path, load_file(str(path))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_bytes = [t.reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*as_bytes)


@pytest.mark.parametrize("name", ["w_bf16", "w_f32", "w_fp8", "norm", "scale", "cube"])
def test_whole_tensors_match_the_library(tensors, name):
    path, oracle = tensors
    assert same(SafetensorsFile(path).read(name), oracle[name].contiguous())


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("name", ["w_bf16", "w_f32", "w_fp8"])
def test_row_and_column_blocks_match_the_library(tensors, name, strided):
    path, oracle = tensors
    file, full = SafetensorsFile(path), oracle[name]
    rows, cols = full.shape
    assert same(file.read(name, (1, rows - 2)), full[1:rows - 2].contiguous())
    for blocks in [((0, cols // 4),), ((cols // 4, cols // 2), (cols - 3, cols)), ((3, 4),)]:
        want = torch.cat([full[2:rows, a:b] for a, b in blocks], dim=1)
        assert same(file.read(name, (2, rows), blocks, strided=strided), want), blocks


@pytest.mark.parametrize("part", [TensorSlice(None), TensorSlice(0, ((3, 9), (20, 31))), TensorSlice(1, ((10, 90),))])
@pytest.mark.parametrize("max_bytes", [None, 1, 700])
def test_row_blocks_concatenate_to_the_slice(tensors, part, max_bytes):
    path, oracle = tensors
    ckpt = Checkpoint.__new__(Checkpoint)  # just the reader: no config.json in this folder
    ckpt._files, ckpt.weight_map = {}, {"w_bf16": path}
    full = oracle["w_bf16"]
    if part.axis is None:
        want = full
    else:
        want = torch.cat([full[a:b] if part.axis == 0 else full[:, a:b] for a, b in part.blocks], dim=part.axis)
    blocks = list(ckpt.iter_blocks("w_bf16", part, max_bytes))
    if max_bytes == 1:
        assert all(b.shape[0] == 1 for b in blocks)
    assert same(torch.cat(blocks), want.contiguous())
    assert same(ckpt.read("w_bf16", part), want.contiguous())


def _disk_reads(path, read) -> int:
    """Bytes this process fetched from the disk (/proc/self/io) while `read` ran on a cold file."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

    def read_bytes() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))

    before = read_bytes()
    read()
    return read_bytes() - before


def test_strided_column_reads_leave_most_pages_on_disk(tmp_path):
    """A TP8 column slice of a 32 KB-row tensor fetches ~2 of each row's 8 pages, not all 8."""
    path = tmp_path / "wide.safetensors"
    save_file({"lm_head": torch.randn(2048, 16384).to(torch.bfloat16)}, str(path))
    file = SafetensorsFile(path)
    whole = _disk_reads(path, lambda: file.read("lm_head", None, ((0, 2048),), strided=False))
    if whole < 0.9 * os.path.getsize(path):
        pytest.skip(f"{tmp_path} is not on a block device the page cache reads from (tmpfs?)")
    strided = _disk_reads(path, lambda: file.read("lm_head", None, ((0, 2048),)))
    assert strided < 0.4 * whole, (strided, whole)


def _write_raw(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header, data, why", [
    (b"{not json", b"", "not JSON"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode(), b"\0" * 8, "spans"),
    (json.dumps({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}).encode(), b"\0", "known dtype"),
])
def test_corrupt_headers_name_the_file(tmp_path, header, data, why):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=why) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and "corrupt" in str(err.value)


def test_truncated_prefix(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\0")
    with pytest.raises(CheckpointError, match="8-byte"):
        SafetensorsFile(path)
