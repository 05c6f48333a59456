"""What `python -m bench` prints and writes: the rows, the Markdown table on stdout, WORKDIR/bench.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.harness import Context

GB = 1e9


@dataclasses.dataclass
class Row:
    bench: str
    what: str
    figure: float | int | str | None
    unit: str = ""
    against: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown_table(rows: list[Row]) -> str:
    header = ("what", "figure", "unit", "against what")
    body = [(f"{r.bench}: {r.what}", fmt(r.figure), r.unit, r.against) for r in rows]
    cells = [header, *body]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]

    def line(c):
        return "| " + " | ".join(s.replace("|", "/").ljust(w) for s, w in zip(c, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(c) for c in body)])


def gb(n: float | None) -> float | None:
    return None if n is None else n / GB


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = int(f.readline().split()[1]) * 1024 / GB
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except (OSError, ValueError, IndexError):
        pass
    return info


def write_report(ctx: Context, selected: list[str], quick: bool, seconds: float) -> Path:
    """The machine's load row first, then WORKDIR/bench.json and the table on stdout."""
    if ctx.loads:
        # Wall times on a shared machine stretch with whatever else runs: say how busy it was.
        ctx.rows.insert(0, Row("machine", "1-min load average around the measurements",
                               f"{min(ctx.loads):.1f}-{max(ctx.loads):.1f}", "",
                               f"{os.cpu_count()} cores; above that, other jobs were competing "
                               "and the times are inflated"))
    payload = {"rows": [r.as_dict() for r in ctx.rows], "benches": selected, "quick": quick,
               "failures": ctx.failures, "measurements": ctx.measurements, "seconds": seconds,
               "machine": machine_info(),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = ctx.workdir / "bench.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown_table(ctx.rows), flush=True)
    return path
