"""Grouped-query attention as one opaque op, so the ONNX graph carries an ONNX `Attention` node
(opset 23) — the op TensorRT's parser maps onto its fused attention layer (IAttention) — while
the eager body below stays the one definition of the math.

The form is the one TensorRT accepts (measured with TensorRT-RTX 1.7, docs/engines.md): 4-D
Q [batch, q_heads, seq, head_dim] and K/V [batch, kv_heads, keys, head_dim] (GQA natively:
`q_num_heads` / `kv_num_heads`, no repeated KV heads), K/V being the cache after this step's
update, an explicit additive mask (causal + padding + unused slots) with `is_causal=0`
(TensorRT aligns is_causal upper-left, wrong for decode), no past/present inputs or outputs,
one output. `nonpad_kv_seqlen` is never used (TensorRT drops it silently).

Scores and softmax are fp32 in the eager body (as Llama's reference does). The ONNX node cannot
ask for that: TensorRT refuses `softmax_precision` ("Setting softmax precision is not supported
in TensorRT Attention"), so each runtime's kernel picks its own accumulation for fp16 graphs.
"""

from __future__ import annotations

import math

import onnxscript
import torch

from export.custom_ops import define_op
ATTENTION_OPSET = 24  # the graph's opset; Attention-24 = Attention-23 plus nonpad_kv_seqlen, never used here


def _attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [batch, q_heads, seq, d], k/v [batch, kv_heads, keys, d], mask fp32 [batch, 1, seq, keys]."""
    batch, q_heads, seq, d = q.shape
    kv_heads = k.shape[1]
    n_rep = q_heads // kv_heads
    # A KV head's n_rep query heads are folded into the row axis: one matmul per KV head, no copies.
    qg = q.reshape(batch, kv_heads, n_rep * seq, d)  # [batch, kv_heads, n_rep * seq, d]
    scores = (qg @ k.transpose(-1, -2)).reshape(batch, kv_heads, n_rep, seq, -1)  # [.., seq, keys]
    scores = scores.float() * (1.0 / math.sqrt(d)) + mask[:, :, None]  # mask [batch, 1, 1, seq, keys]
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = probs.reshape(batch, kv_heads, n_rep * seq, -1) @ v  # [batch, kv_heads, n_rep * seq, d]
    return out.reshape(batch, q_heads, seq, d)  # [batch, q_heads, seq, d]




def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The relations the eager math implies, stated for the tracer: without them torch.export
    # would give the mask's and the cache's batch dims symbols of their own.
    torch._check(k.shape[0] == q.shape[0])
    torch._check(v.shape[0] == q.shape[0])
    torch._check(mask.shape[0] == q.shape[0])
    torch._check(mask.shape[2] == q.shape[2])
    torch._check(mask.shape[3] == k.shape[2])
    torch._check(v.shape[2] == k.shape[2])
    return torch.empty_like(q)


_OPSET = onnxscript.values.Opset("", ATTENTION_OPSET)


def _attention_onnx(q, k, v, mask):
    # The mask is fp32; Attention wants it in Q's type (or bool).
    mask = _OPSET.CastLike(mask, q)
    # onnxscript gives the node all four outputs of Attention's schema; only Y is used, and
    # export/graph_passes.py trims the other three (TensorRT accepts Attention with one output).
    y, _, _, _ = _OPSET.Attention(q, k, v, mask, is_causal=0)
    return y


# gqa_attention(q, k, v, mask) -> [batch, q_heads, seq, head_dim]
gqa_attention = define_op("gqa_attention", _attention_eager, _attention_fake, _attention_onnx)
