"""Defining llama405's torch custom ops (`torch.ops.llama405.*`): each is an opaque node for the
tracer — translated to one ONNX op by its module's translation table — whose eager body is the
reference math and whose fake states the output's shape.

Registration is process-global, so a second import of a module (a reload, or the file imported
under another module name) reuses the op instead of registering it again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def define_op(name: str, eager: Callable, fake: Callable):
    """torch.ops.llama405.<name>, defined from `eager` (its signature is the op's) and `fake`."""
    try:
        return getattr(torch.ops.llama405, name)
    except AttributeError:
        pass
    op = torch.library.custom_op(f"llama405::{name}", mutates_args=())(eager)
    op.register_fake(fake)
    return getattr(torch.ops.llama405, name)
