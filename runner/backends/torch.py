"""PyTorch backend: the rank modules of export/model.py, run eagerly on the CPU.

Every rank of a tp x pp layout is built in this process and fed its own slices from the
checkpoint; the TP ranks of a stage run in lockstep threads sharing a LocalAllReduce, and
stages hand hidden states down the pipeline — the same arithmetic as a multi-process run.
"""

from __future__ import annotations

import numpy as np
import torch

from export.checkpoint import Checkpoint
from export.kv_cache import PARTS
from export.model import ModelOptions, build_rank_module, load_rank_weights
from export.rank_tensors import rank_module_tensors
from export.sharding import all_ranks, kv_heads_local, validate_parallelism
from runner.backends.base import Backend
from runner.dist import LocalAllReduce, run_in_lockstep

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, checkpoint: Checkpoint, tp: int = 1, pp: int = 1, dtype: str = "float32",
                 options: ModelOptions = ModelOptions(), input_scales: dict[str, float] | None = None):
        """options.quant selects FP8 linears; input_scales are their static activation scales."""
        cfg = checkpoint.config
        validate_parallelism(cfg, tp, pp)
        self.config, self.tp, self.pp = cfg, tp, pp
        self.cache_layout, self.max_seq_len = options.cache_layout, options.max_seq_len
        self.options = options
        self.dtype = DTYPES[dtype]
        self.groups = [LocalAllReduce(tp) for _ in range(pp)]
        self.specs = all_ranks(tp, pp)
        self.modules = []
        for spec in self.specs:
            module = build_rank_module(cfg, spec, options, self.groups[spec.pp_rank].for_rank(spec.tp_rank),
                                       dtype=self.dtype, device="meta")
            if isinstance(checkpoint, Checkpoint):
                tensors = rank_module_tensors(checkpoint, spec, self.dtype, options.quant, input_scales)
            else:  # a source already in the module's layout (an artifact's initializers)
                tensors = checkpoint.iter_rank_tensors(spec)
            load_rank_weights(module, tensors, self.dtype)
            self.modules.append(module)
        self._cache: list[list[torch.Tensor]] = []

    def start_impl(self, batch: int) -> None:
        cfg = self.config
        kv_local = kv_heads_local(cfg, self.tp)
        length = self.cache_layout.buffer_len(self.max_seq_len)
        self._cache = [
            [torch.zeros(batch, kv_local, length, cfg.head_dim, dtype=self.dtype)
             for _ in range(2 * len(module.layer_ids))]
            for module in self.modules]

    @torch.inference_mode()
    def infer_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        positions, mask = torch.from_numpy(feed["position_ids"]), torch.from_numpy(feed["attention_mask"])
        x = torch.from_numpy(feed["input_ids"])
        for stage in range(self.pp):
            ranks = self.stage_ranks(stage)
            outs = run_in_lockstep(
                [lambda r=r, x=x: self.modules[r](x, positions, mask, *self._cache[r]) for r in ranks],
                self.groups[stage])
            for r, out in zip(ranks, outs):
                self._cache[r] = list(out[1:])
            x = outs[0][0]  # identical on every TP rank after the last all-reduce
        return x.float().numpy()

    def read_cache(self, rank: int, name: str) -> np.ndarray:
        # past_key_values.{layer}.{part} -> the module's past inputs, (key, value) per local layer
        _, layer, part = name.split(".")
        index = 2 * self.modules[rank].layer_ids.index(int(layer)) + PARTS.index(part)
        return self._cache[rank][index].float().numpy()
