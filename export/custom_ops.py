"""Defining llama405's torch custom ops (`torch.ops.llama405.*`): each is an opaque node for the
tracer whose eager body is the reference math, whose fake states the output's shape, and whose
onnxscript function is the one ONNX op it exports as. `translation_table` gathers the latter for
`torch.onnx.export(..., custom_translation_table=...)`.

Registration is process-global, so a second import of a module (a reload, or the file imported
under another module name) reuses the op instead of registering it again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class CustomOp:
    op: Callable  # torch.ops.llama405.<name>: call it like the eager function
    onnx: Callable  # its onnxscript translation

    def __call__(self, *args):
        return self.op(*args)


def define_op(name: str, eager: Callable, fake: Callable, onnx: Callable) -> CustomOp:
    """torch.ops.llama405.<name>, defined from `eager` (its signature is the op's) and `fake`."""
    if not hasattr(torch.ops.llama405, name):
        op = torch.library.custom_op(f"llama405::{name}", mutates_args=())(eager)
        op.register_fake(fake)
    return CustomOp(getattr(torch.ops.llama405, name), onnx)


def translation_table(*ops: CustomOp) -> dict[Callable, Callable]:
    return {custom.op.default: custom.onnx for custom in ops}
