"""A rank's weights, streamed into its external-data file in row blocks.

A reader thread pulls blocks from the checkpoint (positional reads, the dtype cast) while the
calling thread pads, hashes and writes the previous ones: the syscalls and torch copies release
the GIL, so reading and writing overlap. At most `depth` blocks wait between the two, so memory
stays at a few blocks however large a tensor is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from export.errors import CheckpointError, naming

ALIGN = 4096  # page-aligned tensors: runtimes can mmap them directly
BLOCK_BYTES = 32 << 20  # x (depth + 2) blocks in flight
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class WrittenTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class _End:
    error: BaseException | None = None


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` on a background thread, at most `depth` ahead of the consumer.

    An exception in the producer is raised in the consumer; closing the consumer early stops
    the producer before its next item.
    """
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as err:  # noqa: BLE001 — handed to the consumer, which raises it
            put(_End(err))
            return
        put(_End())

    thread = threading.Thread(target=produce, name="weight-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        thread.join()


class DataWriter:
    """Appends tensors to one external-data file, page-aligned, hashing as it goes.

    The sha256 of a buffer runs on a helper thread while the buffer is written: both release
    the GIL, and for float32 exports hashing is a third of the writer's time.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="weight-hash")
        self.offset = 0

    def align(self) -> None:
        pad = (-self.offset) % ALIGN
        if pad:
            self.put(memoryview(bytes(pad)))

    def put(self, buffer: memoryview) -> None:
        buffer = buffer.cast("B")
        hashed = self._hasher.submit(self._digest.update, buffer)
        done = 0
        with naming(self.path):
            while done < len(buffer):
                done += os.write(self._fd, buffer[done:])
        hashed.result()  # in order: the next update starts after this one
        self.offset += len(buffer)

    def close(self) -> str:
        self._hasher.shutdown()
        os.close(self._fd)
        return self._digest.hexdigest()


def check_finite(name: str, block: torch.Tensor) -> None:
    """Refuse NaN/Inf weights by name (checked on the blocks already in memory: no extra read)."""
    if block.dtype == torch.float8_e4m3fn:
        bad = bool(((block.view(torch.uint8) & 0x7F) == 0x7F).any())  # E4M3FN's only non-finite: NaN
    elif block.is_floating_point():
        bad = not bool(torch.isfinite(block).all())
    else:
        return
    if not bad:
        return
    if block.dtype == torch.float16:
        raise CheckpointError(f"{name}: NaN/Inf in the checkpoint, or values beyond float16's range (65504) once "
                              "cast; check the checkpoint, or export with --dtype bfloat16 or float32")
    raise CheckpointError(f"{name}: the checkpoint holds NaN or Inf values; this checkpoint is damaged — "
                          "re-download or re-convert it")


def _flatten(tensors: Iterable[tuple[str, Iterable[torch.Tensor]]]) -> Iterator[tuple[str, torch.Tensor, bool]]:
    for name, blocks in tensors:
        first = True
        for block in blocks:
            yield name, block.contiguous(), first
            first = False


def write_weights(tensors: Iterable[tuple[str, Iterable[torch.Tensor]]], path: Path, depth: int = 4,
                  on_bytes: Callable[[int], None] = lambda n: None) -> tuple[list[WrittenTensor], str]:
    """Write (name, row blocks) pairs to `path`, each tensor starting on a page boundary.

    Returns where each tensor landed and the file's sha256.
    """
    written: list[WrittenTensor] = []
    writer = DataWriter(path)
    current: dict | None = None

    def finish() -> None:
        if current is not None:
            written.append(WrittenTensor(current["name"], current["dtype"], tuple(current["shape"]),
                                         current["offset"], writer.offset - current["offset"]))

    try:
        for name, block, first in prefetch(_flatten(tensors), depth):
            if first:
                finish()
                writer.align()
                current = {"name": name, "dtype": block.dtype, "shape": list(block.shape), "offset": writer.offset}
            else:
                if block.dtype != current["dtype"] or block.shape[1:] != tuple(current["shape"][1:]):
                    raise ValueError(f"{name}: row blocks disagree ({block.dtype} {list(block.shape)} after "
                                     f"{current['dtype']} {current['shape']})")
                current["shape"][0] += block.shape[0]
            check_finite(name, block)
            # reshape(-1): a 0-d scale cannot be viewed as bytes directly
            writer.put(memoryview(block.reshape(-1).view(torch.uint8).numpy()))
            on_bytes(block.nbytes)
            del block
        finish()
    finally:
        digest = writer.close()
    return written, digest
