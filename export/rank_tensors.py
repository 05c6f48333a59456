"""The tensors of one rank module, as the exporter and the torch backend load them.

Unquantized: the checkpoint slices, cast to the compute dtype. FP8: quantized linears become
(weight fp8 [in, out], weight_scale [out], input_scale []) — quantized here per rank slice from a
bf16/fp16 checkpoint, or taken as stored from a pre-quantized one (ModelOpt / compressed-tensors
`weight_scale` + `input_scale`, Meta's fbgemm_fp8 row-wise `weight_scale`), never dequantizing
the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from export.checkpoint import Checkpoint
from export.errors import CheckpointError
from export.fp8 import FP8, quantize_weight
from export.quantization import Quantization, Unquantized
from export.rank_layout import checkpoint_name, rank_layout, rank_tensor_names, tensor_slice
from export.sharding import RankSpec, TensorSlice


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def stored_fp8(checkpoint: Checkpoint, weight_name: str) -> bool:
    return module_of(weight_name) + ".weight_scale" in checkpoint.weight_map


def _scale_slice(checkpoint: Checkpoint, spec: RankSpec, weight_name: str) -> torch.Tensor:
    """A pre-quantized weight's scale for this rank's slice, as a per-output-row vector."""
    scale_name = module_of(weight_name) + ".weight_scale"
    full_shape = checkpoint.shape(scale_name)
    part = tensor_slice(checkpoint.config, spec, weight_name, checkpoint.kv_dup_factor)
    rows = part.local_shape(checkpoint.shape(weight_name))[0]
    if len(full_shape) == 0 or full_shape in ((1,), (1, 1)):  # per-tensor
        return checkpoint.read(scale_name, TensorSlice(None)).float().reshape(()).expand(rows).clone()
    out_rows = checkpoint.shape(weight_name)[0]
    if full_shape not in ((out_rows,), (out_rows, 1)):
        raise CheckpointError(f"{checkpoint.directory}: {scale_name} has shape {list(full_shape)}; expected "
                              f"[], [{out_rows}] or [{out_rows}, 1] (per-tensor or per-row FP8 scales)")
    row_part = part if part.axis == 0 else TensorSlice(None)
    return checkpoint.read(scale_name, row_part).float().reshape(-1)  # [out_local]


def stored_input_scale(checkpoint: Checkpoint, module: str) -> float | None:
    name = module + ".input_scale"
    if name not in checkpoint.weight_map:
        return None
    shape = checkpoint.shape(name)
    if shape not in ((), (1,)):
        raise CheckpointError(f"{checkpoint.directory}: {name} has shape {list(shape)}; static activation "
                              "scales must be per-tensor (a single value)")
    return float(checkpoint.read(name, TensorSlice(None)).float().reshape(()))


def rank_module_tensors(checkpoint: Checkpoint, spec: RankSpec, dtype: torch.dtype,
                        quant: Quantization = Unquantized(),
                        input_scales: dict[str, float] | None = None,
                        only: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) for the rank module built with the same quant config.

    `only`: a name prefix (e.g. "model.layers.7."), filtered before anything is read.
    """
    for name, blocks in rank_module_blocks(checkpoint, spec, dtype, quant, input_scales, only, None):
        parts = list(blocks)
        yield name, parts[0] if len(parts) == 1 else torch.cat(parts)


def rank_module_blocks(checkpoint: Checkpoint, spec: RankSpec, dtype: torch.dtype,
                       quant: Quantization, input_scales: dict[str, float] | None,
                       only: str | None, max_bytes: int | None) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """Like rank_module_tensors, each tensor as lazily read row blocks of at most ~max_bytes
    (after the cast), so a writer can stream a 4 GB fp32 embedding through a few MB of memory.

    A quantized linear is one block (its scales need whole rows, its layout is transposed);
    consume each tensor's blocks before advancing to the next name.
    """
    cfg = checkpoint.config
    quantized = rank_layout(cfg, spec).quantized_linears(quant)
    for name in rank_tensor_names(cfg, spec):
        if only is not None and not name.startswith(only):
            continue
        fp8_in_file = stored_fp8(checkpoint, name)
        if module_of(name) in quantized:
            yield from quant.rank_tensors(checkpoint, spec, name, dtype, input_scales)
        elif fp8_in_file:
            # Stored FP8 but kept in the compute dtype here (an exclusion): dequantize the slice.
            raw = checkpoint.read_rank_tensor(name, spec)  # fp8, 1 byte a weight
            scale = _scale_slice(checkpoint, spec, name)
            rows = raw.shape[0] if max_bytes is None else max(1, max_bytes // (raw.shape[1] * dtype.itemsize))
            yield name, ((raw[r:r + rows].float() * scale[r:r + rows, None]).to(dtype)
                         for r in range(0, raw.shape[0], rows))
        else:
            source_bytes = None if max_bytes is None else max(1, max_bytes * checkpoint.info(
                checkpoint_name(cfg, name)).dtype.itemsize // dtype.itemsize)
            yield name, (block.to(dtype) for block in checkpoint.iter_rank_blocks(name, spec, source_bytes))


def fp8_linear_tensors(checkpoint: Checkpoint, spec: RankSpec, name: str, dtype: torch.dtype,
                       input_scales: dict[str, float] | None) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """One FP8 linear's rank slice (export/quantization.py Fp8): weight fp8 [in, out] (the
    checkpoint's FP8 bytes as stored, else quantized per output row here), weight_scale [out],
    input_scale []."""
    module = module_of(name)
    raw = checkpoint.read_rank_tensor(name, spec)
    if stored_fp8(checkpoint, name):
        weight = raw.to(FP8).t().contiguous()  # [in, out], bytes untouched
        scale = _scale_slice(checkpoint, spec, name)
    else:
        weight, scale = quantize_weight(raw)
    del raw
    if input_scales is None or module not in input_scales:
        raise CheckpointError(f"{checkpoint.directory}: no activation scale for {module}; "
                              "calibrate (--calib-text) or use a checkpoint with input_scale tensors")
    yield name, iter([weight])
    yield module + ".weight_scale", iter([scale.to(dtype)])
    yield module + ".input_scale", iter([torch.tensor(input_scales[module]).to(dtype)])


def checkpoint_input_scales(checkpoint: Checkpoint) -> dict[str, float]:
    """Static activation scales a pre-quantized checkpoint carries (may be empty)."""
    scales = {}
    for name in checkpoint.weight_map:
        if name.endswith(".input_scale"):
            scales[module_of(name)] = stored_input_scale(checkpoint, module_of(name))
    return scales
