"""Rank graphs traced beside the weight stream, in a worker process, or here on demand.

Tracing (torch.export + torch.onnx) is single-threaded Python, 5-15 s a graph whatever the
model's size; streaming a rank's weights is reads, copies and writes that leave a core idle.
For exports large enough to care, a worker process traces every rank's graph on its own core
while this process streams the weights; the graphs come back serialized (they hold no weights).

The worker is `python -m export.graph_worker` speaking pickle over its stdin/stdout, not
multiprocessing: spawn and forkserver re-run the caller's main script in the child, which breaks
any caller without an `if __name__ == "__main__"` guard.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from export.errors import ArtifactError

# (graph without initializers, DistCollective nodes written, seconds spent tracing)
GraphResult = tuple[onnx.ModelProto, int, float]


def worth_a_process(weight_bytes: int) -> bool:
    """A worker interpreter costs ~3 s of imports: worth it when the weights take longer than
    that to stream and a core is free to trace on. The weight stream keeps about one core busy
    (reads, copies, sha256, the kernel's I/O work), so 2 cores are not enough: measured on a
    2-core VM, a worker made a 405B-width rank export slower (27 s vs 21 s), not faster."""
    return weight_bytes >= 256 << 20 and len(os.sched_getaffinity(0)) >= 4


class Graphs:
    """submit(key, fn, *args) now; result(key) when the graph is needed, as often as needed.

    fn must be a module-level function returning (ModelProto, int). With a worker, jobs run
    there in submission order; without, each runs inside its first result(). Every result() is
    a fresh copy of the graph; its seconds are the trace's on the first call and 0 after.
    """

    def __init__(self, use_process: bool):
        self._local: dict[object, tuple[Callable, tuple]] = {}
        self._done: dict[object, tuple] = {}  # key -> (ok, payload) as the worker sent it
        self._graphs: dict[object, tuple[onnx.ModelProto, int]] = {}
        self._outstanding = 0
        self._worker: subprocess.Popen | None = None
        if use_process:
            root = str(Path(__file__).resolve().parent.parent)  # where `export` is importable from
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
            self._worker = subprocess.Popen([sys.executable, "-m", "export.graph_worker"], env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @property
    def in_background(self) -> bool:
        return self._worker is not None

    def submit(self, key, fn: Callable, *args) -> None:
        if self._worker is None:
            self._local[key] = (fn, args)
            return
        try:
            pickle.dump((key, fn, args), self._worker.stdin)
            self._worker.stdin.flush()
            self._outstanding += 1
        except BrokenPipeError:
            raise self._died() from None

    def result(self, key) -> GraphResult:
        seconds = 0.0
        if key not in self._graphs:
            model, count, seconds = self._build(key)
            self._graphs[key] = (model, count)
        model, count = self._graphs[key]
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, count, seconds

    def _build(self, key) -> GraphResult:
        if self._worker is None:
            fn, args = self._local.pop(key)
            started = time.perf_counter()
            model, count = fn(*args)
            return model, count, time.perf_counter() - started
        while key not in self._done:
            try:
                done_key, ok, payload = pickle.load(self._worker.stdout)
            except EOFError:
                raise self._died() from None
            self._done[done_key] = (ok, payload)
            self._outstanding -= 1
        ok, payload = self._done.pop(key)
        if not ok:
            raise payload
        raw, count, seconds = payload
        return onnx.load_from_string(raw), count, seconds

    def _died(self) -> ArtifactError:
        code = self._worker.wait()
        return ArtifactError(f"the graph-tracing worker process exited with code {code} (killed for "
                             "memory if -9); its error is printed above — rerun the export")

    def close(self) -> None:
        """Stop the worker: at once if graphs are still owed (the export was abandoned)."""
        if self._worker is None:
            return
        if self._outstanding:
            self._worker.kill()
        try:
            self._worker.stdin.close()
        except BrokenPipeError:
            pass  # it is gone already; wait() collects it
        try:
            self._worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._worker.kill()
            self._worker.wait()
        self._worker.stdout.close()
        self._worker = None

    def __enter__(self) -> Graphs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(requests, replies) -> None:
    """The worker's loop: (key, fn, args) in, (key, ok, (bytes, count, seconds) | error) out."""
    while True:
        try:
            key, fn, args = pickle.load(requests)
        except EOFError:
            return
        started = time.perf_counter()
        try:
            model, count = fn(*args)
            reply = (key, True, (model.SerializeToString(), count, time.perf_counter() - started))
        except Exception as err:  # noqa: BLE001 — sent to the parent, which raises it
            reply = (key, False, err)
        try:
            data = pickle.dumps(reply)
        except Exception:  # noqa: BLE001 — an unpicklable error still reaches the parent as text
            data = pickle.dumps((key, False, ArtifactError(f"graph trace failed: {reply[2]!r}")))
        replies.write(data)
        replies.flush()


if __name__ == "__main__":
    # The protocol owns the original stdout; anything the tracer prints goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, protocol)
