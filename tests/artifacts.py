"""The test session's caches of expensive, deterministic export work.

`TraceCache`: `export.onnx_export.trace_rank_graph` (torch.export + torch.onnx of a one-layer
template, ~6-15 s on a 2-core machine) memoized per (template config, rank spec, model options,
dtype). Every in-process export of the session goes through it — the CLI's `export`, fp8
exports, `build-engine --stage onnx` — and each gets its own copy of the graph, so stamping,
collective rewriting and weight attaching still run per export. The trace of a tiny config does
not depend on its layer count (the template holds `pp` layers), so checkpoints of 2, 3 or 4
layers share traces. Exports in other processes (subprocess tests, the benches) trace afresh:
`test_an_export_in_another_process_is_byte_identical` compares such a fresh export with a cached
one, so a nondeterministic or cache-corrupted trace fails there.

A test that patches what a trace calls (e.g. `fold_constant_arithmetic`, to make the graph
before a fix) gets a fresh trace: the cache is bypassed while any name the tracer reads from
`export.onnx_export` differs from the session's start.

`shared_artifact` (below) goes one step further for tests that only read an artifact: one export
per (checkpoint, options) per session.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx

import export.onnx_export as onnx_export
from export.onnx_export import ExportOptions, export_artifact


class TraceCache:
    """Memoizes onnx_export.trace_rank_graph while installed (see the module docstring)."""

    def __init__(self) -> None:
        self.real = onnx_export.trace_rank_graph
        # The module globals the tracer reads, as they were before any test patched one.
        self._reads = {name: getattr(onnx_export, name) for name in self.real.__code__.co_names
                       if hasattr(onnx_export, name)}
        self._traces: dict[tuple, onnx.ModelProto] = {}
        self.hits = self.misses = self.bypassed = 0
        self.trace_s = 0.0

    def _patched(self) -> bool:
        return any(getattr(onnx_export, name) is not value for name, value in self._reads.items())

    def __call__(self, cfg, spec, options, dtype, workdir: Path) -> onnx.ModelProto:
        if self._patched():
            self.bypassed += 1
            return self.real(cfg, spec, options, dtype, workdir)
        key = (cfg, spec, options, dtype)
        if key not in self._traces:
            self.misses += 1
            started = time.perf_counter()
            self._traces[key] = self.real(cfg, spec, options, dtype, workdir)
            self.trace_s += time.perf_counter() - started
        else:
            self.hits += 1
        copy = onnx.ModelProto()
        copy.CopyFrom(self._traces[key])
        return copy


_EXPORTS: dict[tuple, Path] = {}  # (checkpoint, options, calibration) -> artifact; one pytest session


def shared_artifact(tmp_path_factory, checkpoint: Path, *, calibration_tokens: Any = None,
                    calibration_source: str = "", **options) -> Path:
    """An artifact of `checkpoint` exported with ExportOptions(**options), once per pytest session
    for each distinct (checkpoint, options, calibration).

    Read-only for callers: copy it (shutil.copytree) before changing anything.
    """
    export_options = ExportOptions(**options)
    tokens = None if calibration_tokens is None else tuple(map(tuple, calibration_tokens.tolist()))
    key = (str(checkpoint), export_options, tokens, calibration_source)
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp("shared-artifact") / "art"
        _EXPORTS[key] = export_artifact(checkpoint, out, export_options, calibration_tokens=calibration_tokens,
                                        calibration_source=calibration_source)
    return _EXPORTS[key]
