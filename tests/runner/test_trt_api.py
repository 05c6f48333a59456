"""Every TensorRT runtime call runner/backends/trt.py makes exists in TensorRT 11's Python API,
with the arguments it is given.

No GPU here, so no engine runs: the check is against the real bindings, read from the source's
syntax tree (every attribute of the engine, execution context, runtime, refitter and module the
backend touches, and the positional arguments of each call). `tensorrt-lean-cu13-bindings`
(the `test` extra) is TensorRT 11's runtime; the ONNX refit parser is not in the lean runtime,
so OnnxParserRefitter is checked against TensorRT-RTX's parser (same API names).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import runner.backends.trt as trt_backend

lean = pytest.importorskip("tensorrt_lean_bindings", reason="TensorRT 11's runtime API: the `test` extra")
rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (the `rtx` extra) holds the ONNX parser")

RECEIVERS = {  # how trt.py names each TensorRT object -> the class that must have the attribute
    "engine": lean.ICudaEngine, "context": lean.IExecutionContext, "runtime": lean.Runtime,
    "refitter": lean.Refitter, "parser": rtx.OnnxParserRefitter, "trt": lean, "logger": lean.Logger,
}
PARSER_ONLY = {"OnnxParserRefitter"}  # module attributes of the full TensorRT's parser, not the lean runtime


def receiver(node: ast.expr) -> str | None:
    """'engine' for `self.engine` / `engine`; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def uses() -> list[tuple[str, str, ast.AST]]:
    tree = ast.parse(Path(trt_backend.__file__).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and receiver(node.value) in RECEIVERS:
            found.append((receiver(node.value), node.attr, node))
    return found


def owner(name: str, attr: str):
    return rtx if name == "trt" and attr in PARSER_ONLY else RECEIVERS[name]


def test_every_runtime_name_the_backend_uses_exists():
    seen = uses()
    assert {name for name, _, _ in seen} >= {"engine", "context", "runtime", "trt"}
    missing = sorted({f"{name}.{attr}" for name, attr, _ in seen if not hasattr(owner(name, attr), attr)})
    assert not missing, f"not in TensorRT {lean.__version__}'s Python API: {missing}"
    # Members reached through the module: trt.Logger.WARNING, trt.TensorIOMode.INPUT
    tree = ast.parse(Path(trt_backend.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                receiver(node.value.value) == "trt":
            assert hasattr(getattr(lean, node.value.attr), node.attr), f"trt.{node.value.attr}.{node.attr}"


def parameters(doc: str) -> tuple[int, int] | None:
    """(required, total) parameters after self, from a pybind11 signature line; None if overloaded."""
    line = (doc or "").strip().splitlines()[0] if doc else ""
    if "(" not in line or line.startswith(("(*args", )) or "*args" in line:
        return None
    inner = line[line.index("(") + 1: line.rindex(")")]
    depth, parts, current = 0, [], ""
    for ch in inner:
        depth += ch in "[(" and 1 or ch in "])" and -1 or 0
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    params = [p for p in parts if p and not p.startswith("self")]
    return sum(" = " not in p for p in params), len(params)


def test_every_call_passes_arguments_the_bindings_take():
    tree = ast.parse(Path(trt_backend.__file__).read_text())
    checked = 0
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name = receiver(node.func.value)
        if name not in RECEIVERS or name == "trt":
            continue
        member = getattr(owner(name, node.func.attr), node.func.attr)
        if not callable(member) or isinstance(member, property):
            continue
        counts = parameters(inspect.getdoc(member))
        if counts is None:
            continue
        required, total = counts
        given = len(node.args) + len(node.keywords)
        assert required <= given <= total, f"{name}.{node.func.attr}: {given} arguments, the API takes {counts}"
        checked += 1
    assert checked >= 8  # execute_async_v3, set_tensor_address, get_tensor_name, ... were really checked
