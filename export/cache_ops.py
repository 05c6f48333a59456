"""Static KV-cache write as one opaque op, so the ONNX graph carries a TensorScatter.

TensorScatter (ONNX opset 24) is the op TensorRT maps onto its KV-cache update layer and that
onnxruntime can run in place; a plain `Tensor.scatter` would export as ScatterElements with a
materialised [batch, kv_heads, seq, head_dim] index tensor. The eager body is the same math.
"""

from __future__ import annotations

import onnxscript
import torch

from export.custom_ops import define_op

KV_WRITE_OPSET = 24
_OPSET = onnxscript.values.Opset("", KV_WRITE_OPSET)


def _kv_write_eager(past: torch.Tensor, new: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, dim = new.shape
    slots = write_indices[:, None] + torch.arange(seq, device=new.device)  # [batch, seq]
    index = slots[:, None, :, None].expand(batch, heads, seq, dim)  # [batch, kv_heads, seq, head_dim]
    return past.scatter(2, index, new)  # [batch, kv_heads, max_seq_len, head_dim]


def _kv_write_fake(past: torch.Tensor, new: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(past)


def _kv_write_onnx(past, new, write_indices):
    # axis -2 (not 2): the form onnx-tensorrt maps to its KV-cache update layer.
    return _OPSET.TensorScatter(past, new, write_indices, axis=-2, mode="linear")


# kv_cache_write(past, new, write_indices): past with new [batch, kv_heads, seq, head_dim] written
# at slots write_indices[b] + 0..seq-1.
kv_cache_write = define_op("kv_cache_write", _kv_write_eager, _kv_write_fake, _kv_write_onnx)
