"""What TensorRT's ONNX parser accepts but computes differently from ONNX — the one thing a parse
cannot show. Whether a rank graph parses and builds is checked with NVIDIA's own parser and
builder (TensorRT-RTX, `llama405 inspect`, the test suite); this module keeps only the rules
measured to be silent (TensorRT-RTX 1.7.1, docs/engines.md):

- `Attention`'s `nonpad_kv_seqlen` input (opset 24) is parsed and dropped: padded keys would be
  attended to.
- `Attention` with `is_causal=1` is aligned upper-left; ONNX Runtime and the ONNX spec align it
  so that the last query sees every key. The two differ whenever the query is shorter than the
  keys — every decode step over a KV cache. Causality must come from an explicit mask.
"""

from __future__ import annotations

import onnx

NONPAD_KV_SEQLEN = 6  # Attention's input index (opset 24)


def silent_trt_problems(model: onnx.ModelProto) -> list[str]:
    """One line per node TensorRT would run differently from ONNX Runtime; [] when none."""
    problems = []
    for node in model.graph.node:
        if node.op_type != "Attention":
            continue
        if len(node.input) > NONPAD_KV_SEQLEN and node.input[NONPAD_KV_SEQLEN]:
            problems.append(f"{node.name}: Attention with nonpad_kv_seqlen; TensorRT ignores it (padded keys are "
                            "attended to): mask padding in attn_mask instead")
        causal = next((a.i for a in node.attribute if a.name == "is_causal"), 0)
        if causal:
            problems.append(f"{node.name}: Attention with is_causal=1; TensorRT aligns it upper-left, wrong when "
                            "queries are fewer than keys (decode): pass an explicit causal mask and is_causal=0")
    return problems
