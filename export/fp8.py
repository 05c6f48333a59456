"""FP8 (E4M3) linears that compute exactly what TensorRT's fused FP8 GEMM computes.

Graph pattern per quantized linear, which TensorRT fuses into one FP8 GEMM:

    x --QuantizeLinear(input_scale, zp=fp8 0, saturate)--DequantizeLinear(input_scale)--\
                                                                                        MatMul
    W_fp8 [in, out] --DequantizeLinear(weight_scale [out], axis=1)----------------------/

Weights are stored already transposed to [in, out], so the DequantizeLinear feeds the MatMul
directly (an exported nn.Linear would put a Transpose in between and break the fusion).
Activation scales are per-tensor and static (calibrated or from the checkpoint); weight scales
per output channel. Scales are in the compute dtype.

The eager bodies of the two custom ops below are the reference semantics: x / scale in fp32,
clamped to ±448 (saturate), rounded to nearest even by the float8_e4m3fn cast; dequantize is
q * scale in the scale's dtype.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxscript
import torch
from export.custom_ops import define_op
from torch import nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn
QUANTIZABLE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
RECIPES = ("default", "meta")


# -- custom ops: one opaque node each, translated to ONNX Q/DQ ---------------------------------

def _quantize_eager(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _dequantize_eager(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    if scale.dim() == 0:
        return q.to(scale.dtype) * scale
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.to(scale.dtype) * scale.view(shape)


_OP = onnxscript.values.Opset("", 24)


def _fp8_zero():
    return _OP.Constant(value=ir.tensor(np.array(0, dtype=ml_dtypes.float8_e4m3fn)))


def _quantize_onnx(x, scale):
    return _OP.QuantizeLinear(x, scale, _fp8_zero(), saturate=1)


def _dequantize_onnx(q, scale, axis: int):
    # Per-tensor (activation): the fp8 zero point TensorRT expects. Per-channel (weight):
    # no zero point — onnxruntime requires a per-axis zero point to match the scale's length.
    if axis < 0:
        return _OP.DequantizeLinear(q, scale, _fp8_zero())
    return _OP.DequantizeLinear(q, scale, axis=axis)


fp8_quantize = define_op("fp8_quantize", _quantize_eager, lambda x, scale: torch.empty_like(x, dtype=FP8),
                         _quantize_onnx)
fp8_dequantize = define_op("fp8_dequantize", _dequantize_eager,
                           lambda q, scale, axis: torch.empty_like(q, dtype=scale.dtype), _dequantize_onnx)


# -- the module --------------------------------------------------------------------------------

class Fp8Linear(nn.Module):
    """y = dq(q(x)) @ dq(W); weight float8_e4m3fn [in, out], weight_scale [out], input_scale []."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features), requires_grad=False)
        self.input_scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # module.to(dtype) must move the scales to the compute dtype but leave the FP8 weight.
        weight = self.weight
        result = super()._apply(fn, recurse)
        if self.weight.dtype != FP8:
            self.weight = nn.Parameter(weight.to(self.weight.device), requires_grad=False)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = torch.ops.llama405.fp8_quantize(x, self.input_scale)  # [batch, seq, in] fp8
        xd = torch.ops.llama405.fp8_dequantize(xq, self.input_scale, -1)
        wd = torch.ops.llama405.fp8_dequantize(self.weight, self.weight_scale, 1)  # [in, out]
        return xd @ wd  # [batch, seq, out]


# -- which linears, which scales ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which linears are FP8. Names are module paths like model.layers.3.mlp.down_proj.

    Embedding and lm_head always stay in the compute dtype. `exclude` holds fnmatch patterns, or
    `re:` + a regular expression matched from the start of the path (compressed-tensors' form);
    the "meta" recipe adds Meta's choice for its FP8 405B: attention and the first and last
    layer stay in the compute dtype.
    """

    recipe: str = "default"
    exclude: tuple[str, ...] = ()

    def patterns(self, num_layers: int) -> tuple[str, ...]:
        extra = ()
        if self.recipe == "meta":
            extra = ("*.self_attn.*", "model.layers.0.*", f"model.layers.{num_layers - 1}.*")
        return tuple(self.exclude) + extra

    def is_quantized(self, module_name: str, num_layers: int) -> bool:
        if not module_name.endswith(QUANTIZABLE):
            return False
        return not any(pattern_matches(module_name, p) for p in self.patterns(num_layers))


def pattern_matches(module_name: str, pattern: str) -> bool:
    """An --fp8-exclude pattern (fnmatch, or re: + a regular expression) against a module path."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module_name) is not None
    return fnmatch.fnmatchcase(module_name, pattern)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF [out, in] weight -> (fp8 [in, out], per-output-channel scale [out], fp32)."""
    w = weight.float()
    amax = w.abs().amax(dim=1)  # [out]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # [out, in]
    return q.t().contiguous(), scale  # [in, out], [out]


def input_scale_from_amax(amax: float) -> float:
    return amax / FP8_MAX
