"""The measurement machinery of `python -m bench`: children, /proc, process trees, the Context.

Every measurement runs in a fresh interpreter (`python -m bench --child TASK ...`, see
bench/tasks.py): run_child reads VmRSS (the baseline) once the task's imports are done, resets
the kernel's high-water mark (`/proc/self/clear_refs` 5), runs the task and reads VmHWM, with
RssSampler recording the peaks of RssAnon and RssFile meanwhile. The parent side (measure,
run_watched) polls the process tree's RSS and takes ru_maxrss from wait4. CpuWatch and IdleGate
say how busy the rest of the machine was while something was timed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import Row, gb


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def one_line(err: BaseException) -> str:
    """An exception as one line for a report: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# -- /proc bookkeeping (used in the children) ------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile... of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def proc_io() -> dict[str, int]:
    """read_bytes / write_bytes this process caused at the storage layer (page faults included)."""
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key.strip()] = int(value)
    except (OSError, ValueError):
        pass
    return out


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Peaks of RssAnon and RssFile, sampled every few ms in a daemon thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_anon, self.peak_file = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        s = proc_status()
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, s.get("RssFile", 0))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        return False


class NoSampler:
    """RssSampler's stand-in where a sampling thread would disturb what is measured."""

    peak_anon = peak_file = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def evict_from_page_cache(path: Path) -> None:
    """Drop a file's (or a directory's files') clean pages from the page cache: cold reads."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


def dir_bytes(path: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(f"*{suffix}") if p.is_file())


# -- how busy the rest of the machine is -----------------------------------------------------


class CpuWatch:
    """Cores other processes used while this one ran something: the machine's busy time
    (/proc/stat, steal included) minus this process's own (all its threads), over the wall."""

    def __init__(self):
        self._tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _system_busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: inside user already]
        return sum(v[:3]) + sum(v[5:8])

    def _own(self) -> float:
        t = os.times()
        return (t.user + t.system) * self._tick

    def start(self) -> CpuWatch:
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._system_busy(), self._own()
        return self

    def stop(self) -> float:
        wall = max(time.perf_counter() - self._t0, 1e-6)
        others = (self._system_busy() - self._busy0) - (self._own() - self._own0)
        return max(others, 0.0) / self._tick / wall


class IdleGate:
    """Before each measurement, wait (within a budget for the whole child) until other processes
    use under `cores` CPUs, probing in `window`-second sleeps; then measure, with CpuWatch on,
    so each figure carries how busy the others were while it ran (clean: under `cores`)."""

    def __init__(self, cores: float, budget_s: float, window: float = 0.3):
        self.cores, self.budget, self.window = cores, budget_s, window
        self.waited = 0.0

    def wait(self) -> None:
        while self.waited < self.budget:
            watch = CpuWatch().start()
            time.sleep(self.window)
            if watch.stop() < self.cores:
                return
            self.waited += self.window

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        self.wait()
        watch = CpuWatch().start()
        value = fn()
        return value, watch.stop()

    def clean(self, others: list[float]) -> int:
        return sum(o < self.cores for o in others)


# -- inside the child ------------------------------------------------------------------------


def run_child(prepare: Callable[[], None], run: Callable[[dict], dict], args_json: str, out_path: str,
              sampled: bool = True) -> int:
    """Body of a measurement subprocess: prepare() (imports, before the baseline), then the
    measured run(args); result JSON (or one line of error) into out_path."""
    try:
        started = time.perf_counter()
        prepare()
        prepare_s = time.perf_counter() - started
        baseline = proc_status()
        io_before = proc_io()
        reset = reset_peak_rss()
        # Timing tasks go without the sampler: a thread waking at 100 Hz on a 2-core machine
        # preempts a pool thread mid parallel-for (VmHWM still gives their peak).
        with (RssSampler() if sampled else NoSampler()) as sampler:
            result = run(json.loads(args_json))
        after = proc_status()
        io_after = proc_io()
        io = {k: io_after[k] - io_before.get(k, 0) for k in ("read_bytes", "write_bytes") if k in io_after}
        payload = {"result": result, "imports_s": prepare_s, "io": io, "rss": {
            "baseline": baseline["VmRSS"], "peak": after["VmHWM"],
            "peak_delta": after["VmHWM"] - baseline["VmRSS"], "hwm_reset": reset,
            "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file,
            "baseline_anon": baseline.get("RssAnon", 0)}}
    except BaseException as err:  # noqa: BLE001 — reported to the parent as one line
        payload = {"error": one_line(err)}
        Path(out_path).write_text(json.dumps(payload))
        import traceback
        traceback.print_exc(file=sys.stderr)
        return 1
    Path(out_path).write_text(json.dumps(payload))
    return 0


# -- running a process and watching its memory -----------------------------------------------


@dataclasses.dataclass
class ProcResult:
    returncode: int | None
    wall_s: float
    maxrss: int | None  # largest single process's peak (ru_maxrss), bytes
    tree_peak: int  # peak of the RSS summed over the process tree, polled
    output_tail: str
    timed_out: bool = False
    over_limit: bool = False

    def last_line(self) -> str:
        """The output's last non-blank line, cut to 200 characters: why a command failed."""
        lines = [ln.strip() for ln in self.output_tail.splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""


def whole_peak(proc: dict) -> int:
    """Peak RSS of a command's process tree: the polled sum, or the largest single process's
    exact ru_maxrss where polling missed a short peak."""
    return max(proc.get("maxrss") or 0, proc.get("tree_peak") or 0)


def run_watched(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None,
                capture: bool = True, poll: float = 0.05, rss_limit: int | None = None) -> ProcResult:
    """Run cmd, polling its process tree's RSS; ru_maxrss from wait4 (as /usr/bin/time -v).

    rss_limit: kill the tree when its RSS passes this many bytes (the machine is shared: a peer
    that needs more memory than there is must not wake the OOM killer on someone else).
    """
    import psutil
    log_file = tempfile.TemporaryFile(mode="w+") if capture else None  # noqa: SIM115 (closed below)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=log_file if capture else sys.stderr,
                            stderr=subprocess.STDOUT if capture else None)
    tree_peak, status, usage, timed_out, over_limit = 0, None, None, False, False
    try:
        root = psutil.Process(proc.pid)
    except psutil.Error:
        root = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if root is not None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            tree_peak = max(tree_peak, total)
        over_limit = rss_limit is not None and tree_peak > rss_limit
        if over_limit or time.perf_counter() - started > timeout:
            timed_out = not over_limit
            kill_tree(proc.pid)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(poll)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = ""
    if log_file is not None:
        log_file.seek(0)
        tail = log_file.read()[-4000:]
        log_file.close()
    maxrss = usage.ru_maxrss * 1024 if usage is not None else None
    return ProcResult(proc.returncode, wall, maxrss, tree_peak, tail, timed_out, over_limit)


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 1024**3


def kill_tree(pid: int) -> None:
    import psutil
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.kill(pid, 9)
    except OSError:
        pass


class MeasurementError(RuntimeError):
    pass


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        import signal
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (out of memory?)" if code == -9 else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


def measure(task: str, args: dict, timeout: float = 3600) -> dict:
    """Run one child task; returns {"result", "rss", "proc"} or raises MeasurementError."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    try:
        cmd = [sys.executable, "-m", "bench", "--child", task, "--child-args",
               json.dumps(args), "--child-out", out_path]
        # Child output goes to our stderr (progress); stdout stays the table's.
        proc = run_watched(cmd, timeout, capture=False)
        try:
            payload = json.loads(Path(out_path).read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            payload = {}
    finally:
        Path(out_path).unlink(missing_ok=True)
    if proc.timed_out:
        raise MeasurementError(f"{task}: timed out after {timeout:.0f} s")
    if "error" in payload:
        raise MeasurementError(f"{task}: {payload['error']}")
    if proc.returncode != 0 or "result" not in payload:
        raise MeasurementError(f"{task}: child ended with {describe_exit(proc.returncode)}")
    payload["proc"] = {"maxrss": proc.maxrss, "tree_peak": proc.tree_peak, "wall_s": proc.wall_s}
    log(f"  {task}: {proc.wall_s:.1f} s in the child (imports {payload.get('imports_s', 0):.1f} s), "
        f"peak RSS {gb(proc.maxrss or 0):.2f} GB")
    return payload


# -- what the suites share -------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    workdir: Path
    quick: bool
    created: list[Path]
    rows: list[Row] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    measurements: list[dict] = dataclasses.field(default_factory=list)
    loads: list[float] = dataclasses.field(default_factory=list)

    def measure(self, bench: str, label: str, task: str, args: dict, timeout: float = 3600) -> dict:
        """measure(), with the raw result and the machine's load average kept for bench.json."""
        before = os.getloadavg()[0]
        m = measure(task, args, timeout)
        after = os.getloadavg()[0]
        self.loads += [before, after]
        self.measurements.append({"bench": bench, "label": label, "task": task,
                                  "loadavg_1min": [before, after], **m})
        return m

    def add(self, bench: str, what: str, figure, unit: str = "", against: str = "") -> None:
        self.rows.append(Row(bench, what, figure, unit, against))

    def fail(self, bench: str, what: str, err: Exception) -> None:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        log(f"{bench}: {what} FAILED: {message}")
        self.failures.append(f"{bench}: {what}: {message}")
        self.add(bench, what, f"failed: {message}")

    def scratch(self, name: str) -> Path:
        path = self.workdir / "scratch" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

