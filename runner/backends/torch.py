"""PyTorch backend: the rank modules of export/model.py, run eagerly on the CPU or a CUDA GPU.

Every rank of a tp x pp layout is built in this process and fed its own slices from the
checkpoint (or the artifact's initializers); the pipeline loop of runner/backends/base.py runs
the TP ranks of a stage in lockstep threads sharing an all-reduce and hands hidden states down
the stages — the same arithmetic as a multi-process run. On CUDA each rank's module and cache
sit on its GPU (`--device cuda`: rank r on GPU r % count).
"""

from __future__ import annotations

import numpy as np
import torch

from export.checkpoint import Checkpoint
from export.dtypes import dtype as dtype_named
from export.errors import MissingRequirement
from export.model import ModelOptions, build_rank_module, load_rank_weights
from export.rank_tensors import rank_module_tensors
from export.sharding import all_ranks, validate_parallelism
from runner.backends.base import Backend, RankSession
from runner.backends.options import TorchOptions
from runner.device import CPU, Placement
from runner.dist import Reduce


class TorchRankSession(RankSession):
    """One rank module on its device; the module's all-reduces call the reduce of the running step."""

    def __init__(self, rank: int, placement: Placement):
        self.rank, self.device = rank, torch.device(placement.torch)
        self.module = None  # set once the weights are in (it needs `self.reduce_now` at build time)
        self._reduce: Reduce | None = None

    def reduce_now(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x)

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype.torch, device=self.device)

    @torch.inference_mode()
    def run(self, first, feed, rows, reduce):
        self._reduce = reduce
        x = torch.as_tensor(first).to(self.device)  # [batch, seq] ids or [batch, seq, hidden]
        positions = torch.from_numpy(feed["position_ids"]).to(self.device)  # [batch, seq]
        mask = torch.from_numpy(feed["attention_mask"]).to(self.device)  # [batch, W]
        names = list(self.cache)  # the module's past inputs: (key, value) per local layer
        pasts = [self.cache[n] if rows is None else self.cache[n][rows] for n in names]  # rows: views
        out, *presents = self.module(x, positions, mask, *pasts)
        if rows is None:
            return out, dict(zip(names, presents))
        for past, present in zip(pasts, presents):  # the functional cache write, back into the row views
            past.copy_(present)
        return out, {}

    def read_cache(self, name: str) -> np.ndarray:
        return self.cache[name].float().cpu().numpy()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, checkpoint: Checkpoint, tp: int = 1, pp: int = 1, dtype: str = "float32",
                 options: ModelOptions = ModelOptions(), input_scales: dict[str, float] | None = None,
                 run: TorchOptions | None = None):
        """options: the model (cache layout, length, logits; quant selects FP8 linears, input_scales
        their static activation scales); run: where and how it runs (device, TF32)."""
        run = run or TorchOptions()
        device = run.device or CPU
        cfg = checkpoint.config
        validate_parallelism(cfg, tp, pp)
        if device.is_cuda:
            require_cuda_torch(device)
            # A process-wide switch: the torch backend is the only user of CUDA matmuls here.
            torch.backends.cuda.matmul.allow_tf32 = run.tf32
        compute = dtype_named(dtype)
        runners = {}
        for spec in all_ranks(tp, pp):
            session = TorchRankSession(spec.rank, device.for_rank(spec.rank))
            module = build_rank_module(cfg, spec, options, session.reduce_now, dtype=compute.torch, device="meta")
            if isinstance(checkpoint, Checkpoint):
                tensors = rank_module_tensors(checkpoint, spec, compute.torch, options.quant, input_scales)
            else:  # a source already in the module's layout (an artifact's initializers)
                tensors = checkpoint.iter_rank_tensors(spec)
            load_rank_weights(module, tensors, compute.torch)
            session.module = module.to(session.device)
            runners[spec.rank] = session
        super().__init__(config=cfg, tp=tp, pp=pp, cache_layout=options.cache_layout, max_seq_len=options.max_seq_len,
                         logits=options.logits, dtype=compute, runners=runners)
        self.options, self.device = options, device

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The rank modules, in rank order."""
        return [self.runners[r].module for r in sorted(self.runners)]


def require_cuda_torch(device, flag: str = "--device") -> None:
    if not torch.cuda.is_available():
        raise MissingRequirement(f"{flag} {device}: this PyTorch ({torch.__version__}) has no CUDA (a CPU build, or "
                                 "no GPU visible); install a CUDA build of PyTorch, or use --device cpu")
