"""`make bench`: load, export, peer-exporter, decode, engine-build, graph-size, genai-runtime and decode-width benchmarks.

    python -m bench [--quick] [--only plan,load,export,fp8,recipes,peers,decode,engines,graph,genai,batching,serving]
                    [--workdir DIR] [--no-keep]

Prints one Markdown table (what | figure | unit | against what) on stdout and writes the same
rows to WORKDIR/bench.json (bench/report.py); progress goes to stderr. Nothing here asserts on
time: the figures are for reading, not for gating CI.

Every measurement runs in a fresh interpreter (`python -m bench --child TASK ...`; the tasks are
bench/tasks.py, the machinery bench/harness.py), so its peak RSS is its own: the child imports
what it needs, reads VmRSS (the baseline), resets the kernel's high-water mark
(`/proc/self/clear_refs` 5), does the work and reads VmHWM. A sampler thread also records the
peaks of RssAnon (heap) and RssFile (mapped checkpoint pages), which VmHWM adds together (not in
the genai suite's timing child, where it would steal a core). Peer exporters run in their own
venvs (bench/peers.py); their peak is the largest process's ru_maxrss (what `/usr/bin/time -v`
prints) and the peak of the RSS summed over the process tree, polled every 50 ms. The engines
suite measures `llama405 export` and `llama405 build --trt rtx` (TensorRT-RTX, ahead of time,
no GPU) the same way, as CLI processes. The recipes suite times FP8 exports with Meta's recipe
against the default one at two depths; the graph suite counts one decoder layer's ONNX nodes and
TensorRT layers (5-layer minus 4-layer rank graph).

The genai suite times decode and prefill rather than memory: onnxruntime-genai on its own
model-builder graph and on our TP1 artifacts (their genai_config.json), and our runner on the
same artifacts. Each runtime runs alone in its child (one per variant and pass, the passes
alternating ours and genai so they share the machine's drift); before each measurement the
child waits until other processes leave the CPUs idle (/proc/stat less its own time) and tags
the figure with what they used meanwhile; medians of the clean figures are reported.

Synthesized checkpoints are cached under WORKDIR/checkpoints/, keyed by a digest of their
geometry, dtype and seed (bench/models.py), so a second run reuses the ~21 GB 405B-width ones
(`--no-keep` deletes what this run synthesized at the end). Before each load/export
measurement, ours and the peers', the checkpoint's pages are dropped from the page cache
(posix_fadvise DONTNEED), so reads are cold; /proc/self/io's read_bytes says how much each child
read from the disk. The suites, one module each, are bench/suites/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from bench.harness import Context, log
from bench.report import write_report
from bench.suites import BENCHES, SUITES
from bench.tasks import child_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small geometries (seconds, for tests); peers only when --only names it")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"),
                        help="checkpoints, scratch and bench.json (default bench-out/)")
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=True,
                        help="keep synthesized checkpoints cached in WORKDIR/checkpoints for the "
                             "next run (default); --no-keep deletes those this run wrote")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-args", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_args, args.child_out)
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in selected if s not in BENCHES]
        if unknown or not selected:
            print(f"--only {args.only!r}: unknown benchmark {', '.join(unknown) or '(none)'}; "
                  f"choose from {', '.join(BENCHES)}", file=sys.stderr)
            return 2
    else:
        selected = [b for b in BENCHES if not (args.quick and b == "peers")]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir=workdir, quick=args.quick, created=[])
    started = time.perf_counter()
    try:
        for name in BENCHES:
            if name not in selected:
                continue
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                SUITES[name](ctx)
            except Exception as err:  # noqa: BLE001 — one broken bench must not hide the others
                import traceback
                traceback.print_exc(file=sys.stderr)
                ctx.fail(name, "benchmark", err)
            log(f"== {name} done in {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(workdir / "scratch", ignore_errors=True)
        if not args.keep:
            for path in ctx.created:
                shutil.rmtree(path, ignore_errors=True)
    path = write_report(ctx, selected, args.quick, time.perf_counter() - started)
    log(f"rows written to {path}; {len(ctx.failures)} failure(s)")
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
