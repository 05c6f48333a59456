"""How the ranks of a deployment meet: simulated in one process, or one process per rank.

Simulation runs each TP rank of a stage in its own thread; `LocalAllReduce` meets them at a
barrier and hands every rank the same sum, added once in rank order so the result is
deterministic and identical on all ranks — the same numbers a real NCCL/gloo all-reduce gives,
up to summation order. Under torchrun, `ProcessWorld` is the process group: the TP all-reduce,
the pipeline's send/recv of hidden states and the broadcast of the last stage's logits.

The values are whatever a backend's rank session computes with: numpy arrays (onnxruntime) or
torch tensors (PyTorch, TensorRT's device buffers), on the CPU or a GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from export.errors import InputError, MissingRequirement

T = TypeVar("T")
Reduce = Callable[[Any], Any]  # all-reduce(sum) of one rank's array or tensor


def _like(value, like):
    """`value` on the device of `like` (tensors; numpy arrays live on the host already)."""
    return value.to(like.device) if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor) else value


class LocalAllReduce:
    """An all-reduce(sum) among `world` threads of this process."""

    def __init__(self, world: int):
        self.world = world
        self._slots: list[Any] = [None] * world
        self._total: Any = None
        self._arrived = threading.Barrier(world, action=self._sum)  # action: once, by one thread
        self._consumed = threading.Barrier(world)

    def _sum(self) -> None:
        total = self._slots[0]
        for other in self._slots[1:]:  # rank order: deterministic; ranks may sit on different GPUs
            total = total + _like(other, total)
        self._total = total

    def for_rank(self, rank: int) -> Reduce:
        def reduce(x):
            self._slots[rank] = x
            self._arrived.wait()
            total = _like(self._total, x)
            self._consumed.wait()  # nobody overwrites a slot or the total before all have read it
            return total
        return reduce

    def abort(self) -> None:
        """Release ranks blocked at the barrier when one of them failed."""
        self._arrived.abort()
        self._consumed.abort()


def run_in_lockstep(work: Sequence[Callable[[], T]], group: LocalAllReduce | None = None) -> list[T]:
    """Run one callable per rank concurrently; the failure that broke the group is raised (not the
    BrokenBarrierError it caused in the ranks that were waiting), not a hang."""
    if len(work) == 1:
        return [work[0]()]
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        futures = [pool.submit(_abort_on_error, fn, group) for fn in work]
        errors = [f.exception() for f in futures]  # waits for every rank
    cause = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if cause is None:
        cause = next((e for e in errors if e is not None), None)
    if cause is not None:
        raise cause
    return [f.result() for f in futures]


def _abort_on_error(fn: Callable[[], T], group: LocalAllReduce | None) -> T:
    try:
        return fn()
    except threading.BrokenBarrierError:
        raise
    except BaseException:
        if group is not None:
            group.abort()
        raise


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


class ProcessWorld:
    """One rank per process under torchrun: TP all-reduce, PP send/recv, logits broadcast.

    NCCL when the backend runs on CUDA (each process on the GPU of its LOCAL_RANK), gloo on the
    CPU. Every process calls every method in the same order (the generation loop is identical
    on all ranks), which is what collectives need.
    """

    def __init__(self, tp: int, pp: int, cuda: bool):
        import torch.distributed as dist
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            if not torch.cuda.is_available():
                raise MissingRequirement(f"a CUDA run under torchrun needs a CUDA build of PyTorch for NCCL "
                                         f"(this is {torch.__version__}); install one, or use --device cpu")
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size != tp * pp:
            raise InputError(f"torchrun started {self.world_size} processes but the artifact has "
                             f"tp {tp} x pp {pp} = {tp * pp} ranks; use --nproc-per-node {tp * pp}")
        self.tp, self.pp = tp, pp
        # new_group is itself collective: every process creates every stage's group.
        self.tp_groups = [dist.new_group(ranks=[s * tp + t for t in range(tp)]) for s in range(pp)]

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    def reducer(self, stage: int) -> Reduce:
        """All-reduce(sum) over the stage's TP group, of an array (returned as an array) or a
        tensor (returned on the tensor's device)."""
        group = self.tp_groups[stage]

        def reduce(x):
            host = isinstance(x, np.ndarray)
            tensor = torch.tensor(x, device=self.device) if host else x.to(self.device, copy=True)  # a copy
            self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=group)
            return tensor.cpu().numpy() if host else tensor.to(x.device)
        return reduce

    # Tensors move to the process group's device (NCCL moves CUDA tensors only; gloo host memory).

    def send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        self.dist.send(tensor.to(self.device).contiguous(), dst=dst)

    def recv_tensor(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self.dist.recv(tensor, src=src)
        return tensor

    def broadcast_tensor(self, tensor: torch.Tensor | None, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        """src's tensor on every process (the others pass None)."""
        tensor = (torch.empty(shape, dtype=dtype, device=self.device) if tensor is None
                  else tensor.to(self.device, dtype).contiguous())
        self.dist.broadcast(tensor, src=src)
        return tensor

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
