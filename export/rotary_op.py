"""Rotary position embedding as one opaque op, so the ONNX graph carries an ONNX
`RotaryEmbedding` node (opset 23) — the op TensorRT's parser maps onto its ROTARY_EMBEDDING
layer — while the eager body below stays the one definition of the math.

Form (measured with TensorRT-RTX 1.7 and onnxruntime 1.32, docs/engines.md): 4-D X
[batch, heads, seq, head_dim] and cos/sin [batch, seq, head_dim / 2] in X's dtype, already
gathered for this step's positions (no position_ids input: the rank gathers once from its
tables and every layer's two nodes read the result); `interleaved=0` is Hugging Face's
half-split layout (the checkpoints' q/k rows are permuted for it).

The tables are rank constants (export/model.py `rank_constants`): cos/sin of position x
inverse frequency, computed in fp32 with Llama 3.1's scaling applied and then cast to the
compute dtype — the same values Hugging Face's rotary module produces per step.
"""

from __future__ import annotations

import onnxscript
import torch

from export.custom_ops import define_op
ROTARY_OPSET = 23
_OPSET = onnxscript.values.Opset("", ROTARY_OPSET)


def _rotary_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, d]; cos, sin [batch, seq, d / 2]."""
    cos, sin = cos[:, None], sin[:, None]  # [batch, 1, seq, d / 2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [batch, heads, seq, d / 2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [batch, heads, seq, d]


def _rotary_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # What the eager math implies, stated for the tracer (one batch/seq symbol for all).
    for table in (cos, sin):
        torch._check(table.shape[0] == x.shape[0])
        torch._check(table.shape[1] == x.shape[2])
    return torch.empty_like(x)


def _rotary_onnx(x, cos, sin):
    return _OPSET.RotaryEmbedding(x, cos, sin, interleaved=0)


# rotary_embedding(x, cos, sin): x [batch, heads, seq, d] rotated, half-split layout.
rotary_embedding = define_op("rotary_embedding", _rotary_eager, _rotary_fake, _rotary_onnx)
