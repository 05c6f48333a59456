"""Where a backend runs: `--device cpu|cuda[:N]`, parsed here and nowhere else.

`cuda` spreads a single-process run's ranks over the visible GPUs (rank r on GPU r % count, so
TP/PP ranks share GPUs only when there are fewer GPUs than ranks); `cuda:N` puts every rank on
GPU N; under torchrun each process takes the GPU of its LOCAL_RANK. Whether a runtime can use
the device (onnxruntime's CUDA provider, a CUDA build of PyTorch) is the backend's check: this
module only says which device, and how many GPUs this machine shows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

from export.errors import InputError, MissingRequirement

KINDS = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Device:
    kind: str  # one of KINDS
    index: int | None = None  # cuda only: a fixed GPU; None = one per rank (r % count, or LOCAL_RANK)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"device {self.kind!r}: choose cpu, cuda or cuda:N")
        if self.kind == "cpu" and self.index is not None:
            raise InputError(f"device cpu:{self.index}: the CPU takes no index; pass cpu")
        if self.index is not None and self.index < 0:
            raise InputError(f"device cuda:{self.index}: a GPU index is >= 0")

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def for_rank(self, rank: int, local_rank: int | None = None) -> Placement:
        """The concrete device of `rank`; local_rank: this process's LOCAL_RANK under torchrun."""
        if not self.is_cuda:
            return Placement("cpu", 0)
        count = cuda_device_count()
        if count == 0:
            raise MissingRequirement(f"--device {self}: this machine shows no CUDA GPU (no driver, or "
                                     "CUDA_VISIBLE_DEVICES hides them); use --device cpu")
        if local_rank is not None:
            if self.index is not None:
                raise InputError(f"--device {self}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                                 "pass --device cuda")
            return Placement("cuda", local_rank % count)
        if self.index is not None:
            if self.index >= count:
                raise InputError(f"--device {self}: this machine shows {count} GPU(s), cuda:0..cuda:{count - 1}")
            return Placement("cuda", self.index)
        return Placement("cuda", rank % count)


@dataclasses.dataclass(frozen=True)
class Placement:
    """One rank's device: kind and ordinal, as onnxruntime ("cuda", 0) and torch ("cuda:0") name it."""

    kind: str
    index: int

    @property
    def torch(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def __str__(self) -> str:
        return self.torch


CPU = Device("cpu")


def parse_device(text: str) -> Device:
    """'cpu', 'cuda' or 'cuda:N' -> Device (the one parser of --device)."""
    kind, sep, index = text.strip().lower().partition(":")
    if kind not in KINDS or (sep and not index.isdigit()):
        raise InputError(f"device {text!r}: choose cpu, cuda or cuda:N (N a GPU index)")
    return Device(kind, int(index) if sep else None)


def local_rank() -> int | None:
    """LOCAL_RANK under torchrun, else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def cuda_device_count() -> int:
    """GPUs visible to this process: PyTorch's count where it has CUDA, else the driver's
    (libcuda's cuDeviceGetCount, which onnxruntime-gpu uses too); 0 without a driver."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value
