"""Element types, one table: every name a dtype has in torch, numpy, ONNX, safetensors and
TensorRT, and its size. Everything that converts a dtype name asks `dtype(name)` (or
`dtype_of_*`) instead of keeping its own dict.

No torch at import time (the manifest, the planner and the CLI import this): `Dtype.torch`
imports it when asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np
from onnx import TensorProto

from export.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Dtype:
    name: str  # llama405's name: the --dtype choices, the manifest's IO specs
    itemsize: int  # bytes per element
    onnx: int  # onnx.TensorProto element type
    numpy: Any  # numpy dtype (ml_dtypes for bfloat16 / float8)
    safetensors: str  # the safetensors header's code
    trt: str | None  # tensorrt.DataType member name (None: TensorRT has no such type)
    compute: bool  # a --dtype choice (a compute dtype of the graph)

    @property
    def torch(self):
        import torch
        return getattr(torch, self.name)

    @property
    def ort_runs_on_cpu(self) -> bool:
        """onnxruntime's CPU build has no bfloat16 MatMul (or bf16 Q/DQ)."""
        return self.name != "bfloat16"

    def __str__(self) -> str:
        return self.name


_ALL = (
    Dtype("float32", 4, TensorProto.FLOAT, np.dtype(np.float32), "F32", "FLOAT", True),
    Dtype("float16", 2, TensorProto.FLOAT16, np.dtype(np.float16), "F16", "HALF", True),
    Dtype("bfloat16", 2, TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16), "BF16", "BF16", True),
    Dtype("float8_e4m3fn", 1, TensorProto.FLOAT8E4M3FN, np.dtype(ml_dtypes.float8_e4m3fn), "F8_E4M3", "FP8", False),
    Dtype("int64", 8, TensorProto.INT64, np.dtype(np.int64), "I64", "INT64", False),
    Dtype("int32", 4, TensorProto.INT32, np.dtype(np.int32), "I32", "INT32", False),
    Dtype("int8", 1, TensorProto.INT8, np.dtype(np.int8), "I8", "INT8", False),
    # Read from checkpoints only (safetensors), never a graph's type here:
    Dtype("float64", 8, TensorProto.DOUBLE, np.dtype(np.float64), "F64", None, False),
    Dtype("int16", 2, TensorProto.INT16, np.dtype(np.int16), "I16", None, False),
    Dtype("uint8", 1, TensorProto.UINT8, np.dtype(np.uint8), "U8", "UINT8", False),
    Dtype("float8_e5m2", 1, TensorProto.FLOAT8E5M2, np.dtype(ml_dtypes.float8_e5m2), "F8_E5M2", None, False),
    Dtype("bool", 1, TensorProto.BOOL, np.dtype(np.bool_), "BOOL", "BOOL", False),
)
DTYPES: dict[str, Dtype] = {d.name: d for d in _ALL}
COMPUTE_DTYPE_NAMES: tuple[str, ...] = tuple(d.name for d in _ALL if d.compute)  # the --dtype choices


def dtype(name: str | Dtype) -> Dtype:
    if isinstance(name, Dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r}: choose one of {', '.join(COMPUTE_DTYPE_NAMES)}") from None


def _lookup(field: str, value: Any) -> Dtype:
    for d in _ALL:
        if getattr(d, field) == value:
            return d
    raise ConfigError(f"element type {value!r} ({field}) is not one llama405 handles")


def dtype_of_torch(value) -> Dtype:
    return _lookup("name", str(value).removeprefix("torch."))


def dtype_of_onnx(elem_type: int) -> Dtype:
    return _lookup("onnx", elem_type)


def dtype_of_numpy(value) -> Dtype:
    return _lookup("numpy", np.dtype(value))


def dtype_of_safetensors(code: str) -> Dtype:
    """A safetensors header's dtype code ("BF16", "F8_E4M3", ...)."""
    return _lookup("safetensors", code)


def dtype_of_trt(value) -> Dtype:
    """A tensorrt.DataType (its member name)."""
    return _lookup("trt", getattr(value, "name", str(value).rsplit(".", 1)[-1]))
