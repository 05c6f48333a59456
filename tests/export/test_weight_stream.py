"""The row-block weight stream: file layout and hash against hashlib and the tensors themselves,
and the reader thread's error and early-stop behaviour."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from export.errors import CheckpointError
from export.weight_stream import ALIGN, prefetch, write_weights


def blocks_of(tensor: torch.Tensor, rows: int):
    return (tensor[i:i + rows] for i in range(0, max(1, tensor.shape[0]), rows)) if tensor.dim() else iter([tensor])


def test_tensors_land_page_aligned_whole_and_hashed(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 5, generator=gen), "b": torch.randn(300, generator=gen).half(),
               "scale": torch.tensor(0.5), "c": torch.randn(1000, 64, generator=gen).to(torch.bfloat16)}
    path = tmp_path / "data"
    counted = []
    written, digest = write_weights(((n, blocks_of(t, 7)) for n, t in tensors.items()), path,
                                    on_bytes=counted.append)
    raw = path.read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest()
    assert [w.name for w in written] == list(tensors)
    for w in written:
        t = tensors[w.name]
        assert w.offset % ALIGN == 0 and w.dtype == t.dtype and w.shape == tuple(t.shape)
        assert raw[w.offset:w.offset + w.length] == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert sum(counted) == sum(t.nbytes for t in tensors.values())
    assert len(raw) == written[-1].offset + written[-1].length


def test_float16_overflow_is_refused_with_the_tensor_name(tmp_path):
    bad = torch.tensor([1.0, 7e4]).half()  # inf once cast
    with pytest.raises(CheckpointError, match="model.norm.weight.*bfloat16"):
        write_weights([("model.norm.weight", iter([bad]))], tmp_path / "data")


def test_producer_errors_reach_the_consumer():
    def items():
        yield 1
        raise ValueError("shard unreadable")

    got = []
    with pytest.raises(ValueError, match="shard unreadable"):
        for item in prefetch(items(), depth=2):
            got.append(item)
    assert got == [1]


def test_closing_the_consumer_stops_the_producer():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    stream.close()  # joins the reader thread
    assert len(produced) <= 5
    assert not any(t.name == "weight-reader" for t in threading.enumerate())
