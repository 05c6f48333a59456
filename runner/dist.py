"""All-reduce for tensor-parallel ranks: simulated in one process, or across torch.distributed.

Simulation runs each rank of a TP group in its own thread; `LocalAllReduce` meets them at a
barrier and hands every rank the same sum, added in rank order so the result is deterministic
and identical on all ranks — the same numbers a real NCCL/gloo all-reduce would give, up to
summation order.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from collections.abc import Callable, Sequence

import numpy as np
import torch

T = TypeVar("T")


class LocalAllReduce:
    """An all-reduce(sum) among `world` threads of this process."""

    def __init__(self, world: int):
        self.world = world
        self._slots: list[torch.Tensor | None] = [None] * world
        self._arrived = threading.Barrier(world)
        self._consumed = threading.Barrier(world)

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(x: torch.Tensor) -> torch.Tensor:
            self._slots[rank] = x
            self._arrived.wait()
            total = self._slots[0]
            for other in self._slots[1:]:
                total = total + other
            self._consumed.wait()  # nobody overwrites a slot before all ranks have summed
            return total
        return reduce

    def abort(self) -> None:
        """Release ranks blocked at the barrier when one of them failed."""
        self._arrived.abort()
        self._consumed.abort()


def run_in_lockstep(work: Sequence[Callable[[], T]], group: LocalAllReduce | None = None) -> list[T]:
    """Run one callable per rank concurrently; the first failure is raised, not a hang."""
    if len(work) == 1:
        return [work[0]()]
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        futures = [pool.submit(_abort_on_error, fn, group) for fn in work]
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


def torch_distributed_reducer(group=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """All-reduce(sum) over a torch.distributed process group (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    def reduce(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out
    return reduce


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _torch_dtype(numpy_dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=numpy_dtype)).dtype


class ProcessWorld:
    """One rank per process under torchrun: TP all-reduce, PP send/recv, logits broadcast.

    gloo on CPU, NCCL when CUDA is present. Every process calls every method in the same
    order (the generation loop is identical on all ranks), which is what collectives need.
    """

    def __init__(self, tp: int, pp: int):
        import torch.distributed as dist
        from export.errors import InputError
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
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

    # Tensors: moved to the process group's device (NCCL moves CUDA tensors only; gloo works on
    # host memory). Arrays: the numpy face of the same calls, for the onnxruntime backend.

    def send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        self.dist.send(tensor.to(self.device).contiguous(), dst=dst)

    def recv_tensor(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self.dist.recv(tensor, src=src)
        return tensor

    def broadcast_tensor(self, tensor: torch.Tensor | None, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        """src's tensor on every process (the others pass None)."""
        tensor = (torch.empty(shape, dtype=dtype, device=self.device) if tensor is None
                  else tensor.to(self.device).contiguous())
        self.dist.broadcast(tensor, src=src)
        return tensor

    def all_reduce(self, array, stage: int):
        tensor = torch.from_numpy(array.copy()).to(self.device)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.tp_groups[stage])
        return tensor.cpu().numpy()

    def send(self, array, dst: int) -> None:
        self.send_tensor(torch.from_numpy(array.copy()), dst)

    def recv(self, shape, dtype, src: int):
        return self.recv_tensor(shape, _torch_dtype(dtype), src).cpu().numpy()

    def broadcast(self, array, shape, dtype, src: int):
        tensor = torch.from_numpy(array.copy()) if array is not None else None
        return self.broadcast_tensor(tensor, shape, _torch_dtype(dtype), src).cpu().numpy()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
