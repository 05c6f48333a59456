"""The benchmark suites of `python -m bench`, in the order they run; `--only` picks among them.

Each suite is a module with run(ctx: bench.harness.Context): it measures through ctx (every
measurement in a fresh child, see bench/tasks.py) and adds its rows to ctx.rows.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.harness import Context
from bench.suites import (batching, decode, engines, export, fp8, genai, graph, load, peers, plan, recipes,
                          serving, smollm2)

SUITES: dict[str, Callable[[Context], None]] = {
    "plan": plan.run, "load": load.run, "export": export.run, "fp8": fp8.run, "recipes": recipes.run,
    "peers": peers.run, "decode": decode.run, "engines": engines.run, "graph": graph.run, "genai": genai.run,
    "batching": batching.run, "serving": serving.run, "smollm2": smollm2.run,
}
BENCHES = tuple(SUITES)
