"""SmoothQuant-style smoothing of each MLP's up_proj -> down_proj pair, for FP8 on real activations.

down_proj's input is silu(gate(x)) * up(x): linear in up_proj's output rows. Dividing up_proj's
row j by s_j and multiplying down_proj's column j by s_j therefore leaves the model's function
unchanged in real arithmetic, while it moves channel j's range from the activation (quantized
per tensor) into the weight (quantized per output row, where one column's growth costs little).
Trained models need it: SmolLM2's down_proj inputs reach |x| ~ 3000 in a couple of channels of
a few layers (massive activations) while most channels stay under 10, and one per-tensor FP8
scale sized for 3000 flushes the small values to FP8 subnormals (docs/fp8-real-activations.md).

  s_j = amax_x[j] ** alpha / amax_w[:, j] ** (1 - alpha)     (SmoothQuant, Xiao et al. 2022)

amax_x from calibration (per input channel of down_proj), amax_w the column of down_proj's
weight. The down_proj input's per-tensor amax after smoothing is max_j amax_x[j] / s_j, exactly.
up_proj's per-row FP8 weight scale absorbs 1/s_j exactly, so only down_proj's quantization
changes.

Applied where the exporter reads rank weights (`SmoothedCheckpoint`), before quantization: the
artifact's weights are the smoothed ones, the torch backend over the artifact reads them too,
and `parity --reference CKPT` compares against the untransformed checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from export.checkpoint import Checkpoint
from export.errors import CheckpointError
from export.rank_layout import tensor_slice
from export.sharding import RankSpec

UP, DOWN = "mlp.up_proj", "mlp.down_proj"
FLOOR = 1e-5  # keeps s finite for dead channels (amax 0) and all-zero weight columns


def smoothing_factors(channel_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [intermediate] for one layer: channel_amax [intermediate] of down_proj's input, weight
    down_proj's HF [hidden, intermediate] weight."""
    w = weight.float().abs().amax(dim=0).clamp_min(FLOOR)  # [intermediate]
    x = channel_amax.float().clamp_min(FLOOR)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp_min(FLOOR)


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """Factors per smoothed layer: "model.layers.N" -> s [intermediate] (fp32)."""

    alpha: float
    factors: dict[str, torch.Tensor]

    def smoothed_amax(self, layer: str, channel_amax: torch.Tensor) -> float:
        """down_proj's per-tensor input amax once its channels are divided by s."""
        return float((channel_amax.float() / self.factors[layer]).max())

    def manifest_record(self) -> dict[str, Any]:
        low = min(float(s.min()) for s in self.factors.values())
        high = max(float(s.max()) for s in self.factors.values())
        return {"pairs": f"{UP} rows / s, {DOWN} columns * s", "alpha": self.alpha,
                "layers": sorted(int(k.rsplit(".", 1)[1]) for k in self.factors), "s_range": [low, high]}

    def transform(self, name: str, tensor: torch.Tensor, column_start: int) -> torch.Tensor:
        """`tensor` (an HF-layout slice of checkpoint tensor `name`) smoothed; others unchanged.
        column_start: where the slice's intermediate channels begin (rows of up, columns of down)."""
        layer, _, leaf = name.rpartition(".mlp.")
        if layer not in self.factors or leaf not in ("up_proj.weight", "down_proj.weight"):
            return tensor
        s = self.factors[layer]
        if leaf == "up_proj.weight":  # [intermediate_local, hidden]
            part = s[column_start:column_start + tensor.shape[0]]
            return (tensor.float() / part[:, None]).to(tensor.dtype)
        part = s[column_start:column_start + tensor.shape[1]]  # down: [hidden, intermediate_local]
        return (tensor.float() * part[None, :]).to(tensor.dtype)


def compute_smoothing(checkpoint: Checkpoint, channel_amax: dict[str, torch.Tensor], alpha: float,
                      layers: list[int]) -> Smoothing:
    """Factors for `layers` (those whose down_proj is FP8) from calibration's per-channel amax of
    each down_proj input and the checkpoint's down_proj weight (read one layer at a time)."""
    if any(name.endswith(".weight_scale") for name in checkpoint.weight_map):
        raise CheckpointError(f"{checkpoint.directory}: --fp8-smoothing rescales unquantized weights before "
                              "quantizing them; this checkpoint is already FP8 — drop --fp8-smoothing")
    factors = {}
    for i in layers:
        layer = f"model.layers.{i}"
        amax = channel_amax.get(f"{layer}.{DOWN}")
        if amax is None:
            raise CheckpointError(f"{checkpoint.directory}: calibration recorded no input of {layer}.{DOWN}")
        weight = checkpoint.read(f"{layer}.{DOWN}.weight", tensor_slice(checkpoint.config, RankSpec(0, 1),
                                                                         f"{layer}.{DOWN}.weight"))
        s = smoothing_factors(amax, weight, alpha)
        if not bool(torch.isfinite(s).all()) or not math.isfinite(float((amax / s).max())):
            raise CheckpointError(f"{checkpoint.directory}: smoothing factors of {layer} are not finite; check "
                                  "the weights (NaN/inf?) or the calibration text")
        factors[layer] = s
    return Smoothing(float(alpha), factors)


class SmoothedCheckpoint(Checkpoint):
    """The checkpoint as the exporter reads rank tensors, with `smoothing` applied to up_proj rows
    and down_proj columns of each smoothed layer (whole tensors and row blocks alike)."""

    def __init__(self, directory: str | Path, smoothing: Smoothing):
        super().__init__(directory)
        self.smoothing = smoothing

    def _column_start(self, name: str, spec: RankSpec) -> int:
        part = tensor_slice(self.config, spec, name, self.kv_dup_factor)
        return 0 if part.axis is None else part.blocks[0][0]

    def read_rank_tensor(self, name: str, spec: RankSpec) -> torch.Tensor:
        return self.smoothing.transform(name, super().read_rank_tensor(name, spec), self._column_start(name, spec))

    def iter_rank_blocks(self, name: str, spec: RankSpec, max_bytes: int | None) -> Iterator[torch.Tensor]:
        start = self._column_start(name, spec)
        rows_done = 0
        for block in super().iter_rank_blocks(name, spec, max_bytes):
            # up_proj blocks are runs of its rows (= intermediate channels); down_proj blocks are
            # runs of hidden rows, each holding every local intermediate column.
            offset = start + rows_done if name.endswith(f"{UP}.weight") else start
            yield self.smoothing.transform(name, block, offset)
            rows_done += block.shape[0]


def smooth_down_proj_inputs(checkpoint: Checkpoint, channel_amax: dict[str, torch.Tensor],
                            amax: dict[str, float], alpha: float,
                            quantized: list[str]) -> tuple[Smoothing, dict[str, float]]:
    """Smoothing for every layer whose down_proj is in `quantized` (module paths), and `amax`
    (calibration's per-tensor input amax) with those down_proj inputs replaced by their
    smoothed amax, the range the FP8 input scale must cover once the weights are transformed."""
    layers = sorted(int(name.split(".")[2]) for name in quantized if name.endswith(DOWN))
    smoothing = compute_smoothing(checkpoint, channel_amax, alpha, layers)
    smoothed = dict(amax)
    for layer in smoothing.factors:
        smoothed[f"{layer}.{DOWN}"] = smoothing.smoothed_amax(layer, channel_amax[f"{layer}.{DOWN}"])
    return smoothing, smoothed
