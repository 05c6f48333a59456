"""How the onnxruntime backend's sessions use the CPU (--ort-threads, --ort-spinning).

Apart from runner/backends/ort.py so the CLI can offer the flags without importing onnxruntime.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from export.bounds import ORT_THREADS
from export.errors import InputError

if TYPE_CHECKING:
    import onnxruntime as ort

SPINNING_CHOICES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class OrtThreads:
    """How the segment sessions use the CPU.

    threads: intra-op threads per session (None: the cores, at most 8). spinning: "auto" spins
    the pool's threads between steps when the rank graph is one session (TP1: +5-20% decode on
    2 cores, measured) and not when it is cut into many (a 405B rank is ~250 segments run one
    after the other: idle pools spinning would steal the cores from the one that runs).
    Per-session pools either way: onnxruntime's process-wide pool would refuse every default
    session created later in the same process (tests, user code).
    """

    threads: int | None = None
    spinning: str = "auto"  # one of SPINNING_CHOICES

    def __post_init__(self):
        if self.spinning not in SPINNING_CHOICES:
            raise InputError(f"OrtThreads spinning={self.spinning!r}: choose {', '.join(SPINNING_CHOICES)}")
        if self.threads is not None and ORT_THREADS.problem(self.threads) is not None:
            raise InputError(f"OrtThreads threads={ORT_THREADS.problem(self.threads)}")

    def session_options(self, segments: int) -> ort.SessionOptions:
        import onnxruntime as ort
        spin = self.spinning == "on" or (self.spinning == "auto" and segments == 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or min(os.cpu_count() or 1, 8)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # constant-folding chatter about CastLike is not news
        return options
