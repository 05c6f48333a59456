"""`make bench`: load, export, peer-exporter, decode, engine-build and genai-runtime benchmarks.

    python -m runner.bench [--quick] [--only plan,load,export,fp8,peers,decode,engines,genai] [--workdir DIR] [--no-keep]

Prints one Markdown table (what | figure | unit | against what) on stdout and writes the same
rows to WORKDIR/bench.json; progress goes to stderr. Nothing here asserts on time: the figures
are for reading, not for gating CI.

Every measurement runs in a fresh interpreter (`python -m runner.bench --child TASK ...`), so
its peak RSS is its own: the child imports what it needs, reads VmRSS (the baseline), resets
the kernel's high-water mark (`/proc/self/clear_refs` 5), does the work and reads VmHWM. A
sampler thread also records the peaks of RssAnon (heap) and RssFile (mapped checkpoint pages),
which VmHWM adds together (not in the genai suite's timing child, where it would steal a
core). Peer exporters run in their own venvs; their peak is the largest process's ru_maxrss
(what `/usr/bin/time -v` prints) and the peak of the RSS summed over the process tree, polled
every 50 ms. The engines suite measures `llama405 export` and `llama405
build --trt rtx` (TensorRT-RTX, ahead of time, no GPU) the same way, as CLI processes.

The genai suite times decode and prefill rather than memory: onnxruntime-genai on its own
model-builder graph and on our TP1 artifacts (their genai_config.json), and our runner on the
same artifacts. Each runtime runs alone in its child (one per variant and pass, the passes
alternating ours and genai so they share the machine's drift); before each measurement the
child waits until other processes leave the CPUs idle (/proc/stat less its own time) and tags
the figure with what they used meanwhile; medians of the clean figures are reported.

Synthesized checkpoints are cached under WORKDIR/checkpoints/, keyed by a digest of their
geometry, dtype and seed, so a second run reuses the ~21 GB 405B-width ones (`--no-keep`
deletes what this run synthesized at the end). Before each load/export measurement, ours and
the peers', the checkpoint's pages are dropped from the page cache (posix_fadvise DONTNEED), so
reads are cold; /proc/self/io's read_bytes says how much each child read from the disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
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

BENCHES = ("plan", "load", "export", "fp8", "peers", "decode", "engines", "genai")
DEFAULT_BENCHES = ("plan", "load", "export", "fp8", "peers", "decode", "engines", "genai")
GB = 1e9


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- rows and the table ----------------------------------------------------------------------


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


# -- child tasks (each runs in a fresh interpreter) ------------------------------------------
#
# A task is (prepare, run): prepare() imports what the work needs before the baseline is read,
# run(args) does the measured work and returns a JSON-able dict.


def _prep_torch():
    import torch  # noqa: F401

    import export.checkpoint  # noqa: F401


def task_load(args: dict) -> dict:
    """Read one rank's slices into memory (keeping them or not): what loading a rank costs.

    safetensors hands out zero-copy views of its memory map, so iterating the slices reads
    nothing by itself; each slice is cloned, which reads its bytes from the file into memory
    the way a load onto a device would.
    """
    from export.checkpoint import Checkpoint
    from export.sharding import RankSpec
    kept, count, nbytes = [], 0, 0
    started = time.perf_counter()
    ckpt = Checkpoint(args["checkpoint"])
    for _, view in ckpt.iter_rank_tensors(RankSpec(0, args["tp"])):
        tensor = view.clone()
        del view
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
        if args["keep"]:
            kept.append(tensor)
        del tensor
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tensors": count, "rank_bytes": nbytes}


def task_disk(args: dict) -> dict:
    """This disk's yardsticks, in the workdir: sequential write (64 MB os.write + fsync), cold
    sequential read, and a copy of the cold file (read and write at once, fsync) — what a
    purely I/O-bound exporter, which must read what it writes, can reach at best."""
    path, total, chunk = Path(args["path"]), args["bytes"], 64 * 1024 * 1024
    block = os.urandom(1024 * 1024) * (chunk // (1024 * 1024))  # incompressible
    view = memoryview(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        started = time.perf_counter()
        written = 0
        while written < total:
            n = os.write(fd, view[: min(chunk, total - written)])
            written += n
        os.fsync(fd)
        write_s = time.perf_counter() - started
    finally:
        os.close(fd)
    evict_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        read = 0
        while True:
            data = os.read(fd, chunk)
            if not data:
                break
            read += len(data)
        read_s = time.perf_counter() - started
    finally:
        os.close(fd)
    evict_from_page_cache(path)
    copy = path.with_suffix(".copy")
    src, dst = os.open(path, os.O_RDONLY), os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        started = time.perf_counter()
        while data := os.read(src, chunk):
            os.write(dst, data)
        os.fsync(dst)
        copy_s = time.perf_counter() - started
    finally:
        os.close(src)
        os.close(dst)
    path.unlink()
    copy.unlink()
    return {"bytes": written, "write_s": write_s, "write_gbps": written / write_s / GB,
            "read_gbps": read / read_s / GB, "copy_gbps": written / copy_s / GB}


def _prep_export():
    _prep_torch()
    import export.onnx_export  # noqa: F401 (torch.onnx, onnxscript)


def task_export(args: dict) -> dict:
    """export_artifact for the given options; tracing and weight streaming timed apart."""
    import export.onnx_export as ox
    out = Path(args["out"])
    options = ox.ExportOptions(**{k: tuple(v) if k == "ranks" and v is not None else v
                                  for k, v in args["options"].items()})
    started = time.perf_counter()
    tokens = None
    if args.get("calibrate"):
        import numpy as np
        from export.checkpoint import Checkpoint
        vocab = Checkpoint(args["checkpoint"]).config.vocab_size
        tokens = np.random.default_rng(0).integers(0, vocab, (4, 128))
    stats: dict[str, float] = {}
    ox.export_artifact(args["checkpoint"], out, options, force=True, calibration_tokens=tokens,
                       calibration_source="random tokens", stats=stats)
    wall = time.perf_counter() - started
    # The exporter leaves writeback to the kernel; time getting the bytes onto the disk too.
    started = time.perf_counter()
    for path in out.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    flush = time.perf_counter() - started
    return {"wall_s": wall, "flush_s": flush, "trace_s": stats.get("trace_s", 0.0),
            "weights_s": stats.get("weights_s", 0.0),
            "bytes": dir_bytes(out), "data_bytes": dir_bytes(out, ".onnx.data")}


def task_membw(args: dict) -> dict:
    """Memory read bandwidth: numpy sum over a ~1 GB array, best of 3; 1 thread and all cores."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    n = args["bytes"] // 4
    array = np.ones(n, dtype=np.float32)  # pages committed, not lazily zero
    threads = os.cpu_count() or 1
    parts = np.array_split(array, threads)
    best = {"1": float("inf"), "all": float("inf")}
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            started = time.perf_counter()
            array.sum()
            best["1"] = min(best["1"], time.perf_counter() - started)
            started = time.perf_counter()
            list(pool.map(np.sum, parts))  # numpy releases the GIL in the reduction loop
            best["all"] = min(best["all"], time.perf_counter() - started)
    return {"gbps_1thread": array.nbytes / best["1"] / GB,
            "gbps_all": array.nbytes / best["all"] / GB, "threads": threads}


def _decode_prompt(vocab: int, length: int) -> list[int]:
    import numpy as np
    return [int(t) for t in np.random.default_rng(0).integers(3, vocab, size=length)]


def _time_generate(backend, prompt: list[int], new_tokens: int) -> tuple[dict, list[int]]:
    from runner.generate import SamplingOptions, generate
    options = SamplingOptions(max_new_tokens=new_tokens + 1)  # +1: the prefill's token
    generate(backend, [prompt], SamplingOptions(max_new_tokens=4))  # warm-up
    result = generate(backend, [prompt], options)
    return ({"tokens_per_s": result.decode_tokens_per_second, "decode_steps": result.decode_steps,
             "prefill_s": result.prefill_seconds, "decode_s": result.decode_seconds},
            result.tokens[0])


def _prep_ort():
    _prep_torch()
    import onnxruntime  # noqa: F401

    import runner.backends.ort
    import runner.generate  # noqa: F401


def task_decode_ort(args: dict) -> dict:
    from runner.backends.ort import OrtBackend
    started = time.perf_counter()
    backend = OrtBackend(args["artifact"])
    load = time.perf_counter() - started
    stats, tokens = _time_generate(backend, args["prompt"], args["new_tokens"])
    return {**stats, "load_s": load, "tokens": tokens}


def _prep_torch_backend():
    _prep_torch()
    import runner.backends.torch
    import runner.generate  # noqa: F401


def task_decode_torch(args: dict) -> dict:
    from export.checkpoint import Checkpoint
    from export.model import ModelOptions
    from runner.backends.torch import TorchBackend
    backend = TorchBackend(Checkpoint(args["checkpoint"]), tp=1, dtype="float32",
                           options=ModelOptions(kv_cache="static", max_seq_len=args["max_seq_len"]))
    stats, tokens = _time_generate(backend, args["prompt"], args["new_tokens"])
    return {**stats, "tokens": tokens}


def _prep_hf():
    import torch  # noqa: F401
    import transformers  # noqa: F401


def task_decode_hf(args: dict) -> dict:
    """transformers LlamaForCausalLM greedy generate; decode time = t(1 + N tokens) - t(1 token)."""
    import torch
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(args["checkpoint"], dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # exactly N new tokens, nothing suppressed
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([args["prompt"]], dtype=torch.int64)
    n = args["new_tokens"]

    def run(new: int):
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False)
        return time.perf_counter() - started, out[0, ids.shape[1]:].tolist()

    run(4)  # warm-up
    prefill_s, _ = min(run(1) for _ in range(2))
    total_s, tokens = run(n + 1)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"tokens_per_s": n / decode_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "tokens": tokens, "transformers": transformers.__version__}


def task_calibrate(args: dict) -> dict:
    """Calibrate a checkpoint (layer by layer) for FP8; the measurement is its time and RSS."""
    import numpy as np
    from export.calibrate import calibrate
    from export.checkpoint import Checkpoint
    tokens = np.random.default_rng(0).integers(0, args["vocab"], (args["samples"], args["seq_len"]))
    started = time.perf_counter()
    result = calibrate(Checkpoint(args["checkpoint"]), tokens)
    return {"seconds": time.perf_counter() - started, "linears": len(result.amax)}


def task_fidelity(args: dict) -> dict:
    """Top-1 agreement and perplexity of an artifact against the checkpoint's fp32 model."""
    import numpy as np
    from export.checkpoint import Checkpoint
    from export.model import ModelOptions
    from runner.backends.ort import OrtBackend
    from runner.backends.torch import TorchBackend
    from runner.fidelity import fidelity_report
    text = np.random.default_rng(1).integers(0, args["vocab"], args["tokens"]).tolist()
    reference = TorchBackend(Checkpoint(args["checkpoint"]), dtype="float32",
                             options=ModelOptions(max_seq_len=args["max_seq_len"]))
    report = fidelity_report(OrtBackend(args["artifact"]), reference, text, window=len(text))
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str))}


# -- genai suite children: onnxruntime-genai and our runner, in one process, alternated ------


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


class _GenaiRun:
    """onnxruntime-genai: og.Model on a directory holding genai_config.json."""

    def __init__(self, path: str):
        import onnxruntime_genai as og
        self.og, self.model = og, og.Model(path)

    def _generator(self, prompt: list[int], new_tokens: int, max_len: int):
        import numpy as np
        params = self.og.GeneratorParams(self.model)
        # min_length: no early stop on an end-of-text id (ours runs without stop ids).
        params.set_search_options(max_length=max_len, min_length=len(prompt) + new_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        started = time.perf_counter()
        generator.append_tokens(np.array([prompt], dtype=np.int32))  # the prefill: runs the model
        return generator, time.perf_counter() - started

    def decode(self, prompt: list[int], new_tokens: int, max_len: int) -> tuple[float, list[int]]:
        """tokens/s over new_tokens - 1 forward steps (the first token comes from the prefill), as
        our Generation.decode_tokens_per_second counts them."""
        generator, _ = self._generator(prompt, new_tokens, max_len)
        generator.generate_next_token()  # picks from the prefill's logits, no forward
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        seconds = time.perf_counter() - started
        return (new_tokens - 1) / seconds, [int(t) for t in generator.get_sequence(0)][len(prompt):]

    def prefill(self, prompt: list[int], max_len: int) -> float:
        return self._generator(prompt, 1, max_len)[1]


class _OursRun:
    """Our runner: OrtBackend with OrtThreads(threads) where this checkout has it."""

    def __init__(self, path: str, threads: int):
        from runner.backends import ort as ours
        threads_api = getattr(ours, "OrtThreads", None)
        self.threads_api = threads_api is not None
        kwargs = {"threads": threads_api(threads=threads)} if threads_api is not None else {}
        self.backend = ours.OrtBackend(path, **kwargs)

    def decode(self, prompt: list[int], new_tokens: int, max_len: int) -> tuple[float, list[int]]:
        from runner.generate import SamplingOptions, generate
        result = generate(self.backend, [prompt], SamplingOptions(max_new_tokens=new_tokens))
        return result.decode_tokens_per_second, result.tokens[0]

    def prefill(self, prompt: list[int], max_len: int) -> float:
        from runner.generate import SamplingOptions, generate
        return generate(self.backend, [prompt], SamplingOptions(max_new_tokens=1)).prefill_seconds


def _prep_genai_speed():
    try:  # genai first (as tests/runner/test_genai.py): it finds onnxruntime's library itself
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        pass  # its variants fail one by one, with the reason
    import onnxruntime  # noqa: F401

    import runner.backends.ort
    import runner.generate  # noqa: F401


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def task_genai_speed(args: dict) -> dict:
    """Every variant loaded in this one process and warmed up once; then rounds in which each
    variant runs a decode (prompt + new_tokens greedy) and, where asked, a long-prompt prefill.
    Rounds alternate the order (ours and genai interleaved, reversed every other round) so all
    share the machine's noise; every measurement is idle-gated and tagged with the CPU others
    used meanwhile. A variant leaves the rounds once it has `repeats` clean measurements of
    each kind; the rounds end there, or after `max_rounds`, or past `budget_s`."""
    gate = IdleGate(args["idle_cores"], args["idle_wait_s"])
    prompt, long_prompt, new_tokens = args["prompt"], args["long_prompt"], args["new_tokens"]
    repeats, started_all = args["repeats"], time.perf_counter()
    runs, out = {}, {}
    for v in args["variants"]:
        key = v["key"]
        out[key] = {"decode_tps": [], "prefill_s": [], "decode_others": [], "prefill_others": []}
        started = time.perf_counter()
        try:
            runs[key] = _GenaiRun(v["path"]) if v["kind"] == "genai" else _OursRun(v["path"], args["threads"])
            out[key]["load_s"] = time.perf_counter() - started
            if v["kind"] == "ours":
                out[key]["threads_api"] = runs[key].threads_api
            runs[key].decode(prompt, min(4, new_tokens), v["max_len"])  # warm-up
            if v["prefill"]:
                runs[key].prefill(long_prompt, v["max_len"])
        except Exception as err:  # noqa: BLE001 — one variant failing leaves the others measured
            runs.pop(key, None)
            out[key]["error"] = _one_line(err)
            log(f"  genai_speed: {key} failed: {out[key]['error']}")

    def complete(v: dict) -> bool:
        r = out[v["key"]]
        return (gate.clean(r["decode_others"]) >= repeats
                and (not v["prefill"] or gate.clean(r["prefill_others"]) >= repeats))

    order = [v for v in args["variants"] if v["key"] in runs]
    rounds = 0
    while rounds < args["max_rounds"] and (rounds < repeats or time.perf_counter() - started_all < args["budget_s"]):
        todo = [v for v in order if v["key"] in runs and not complete(v)]
        if not todo:
            break
        for v in todo if rounds % 2 == 0 else todo[::-1]:
            key, run, r = v["key"], runs[v["key"]], out[v["key"]]
            try:
                if gate.clean(r["decode_others"]) < repeats:
                    (tps, tokens), others = gate.measure(lambda: run.decode(prompt, new_tokens, v["max_len"]))  # noqa: B023
                    r["decode_tps"].append(tps)
                    r["decode_others"].append(others)
                    r.setdefault("tokens", tokens)
                if v["prefill"] and gate.clean(r["prefill_others"]) < repeats:
                    seconds, others = gate.measure(lambda: run.prefill(long_prompt, v["max_len"]))  # noqa: B023
                    r["prefill_s"].append(seconds)
                    r["prefill_others"].append(others)
            except Exception as err:  # noqa: BLE001
                r["error"] = _one_line(err)
                log(f"  genai_speed: {key} failed in round {rounds + 1}: {r['error']}")
                runs.pop(key)
        rounds += 1
        log(f"  genai_speed: round {rounds}: " + ", ".join(
            f"{v['key']} {out[v['key']]['decode_tps'][-1]:.1f}@{out[v['key']]['decode_others'][-1]:.2f}"
            for v in todo if out[v["key"]]["decode_tps"]) + " tokens/s@others' cores")
    return {"variants": out, "gate": {"cores": gate.cores, "waited_s": gate.waited, "wait_budget_s": gate.budget,
                                      "rounds": rounds, "seconds": time.perf_counter() - started_all}}


def _prep_none():
    pass


TASKS: dict[str, tuple[Callable[[], None], Callable[[dict], dict]]] = {
    "load": (_prep_torch, task_load),
    "disk": (_prep_none, task_disk),
    "export": (_prep_export, task_export),
    "membw": (_prep_none, task_membw),
    "decode_ort": (_prep_ort, task_decode_ort),
    "decode_torch": (_prep_torch_backend, task_decode_torch),
    "decode_hf": (_prep_hf, task_decode_hf),
    "calibrate": (_prep_export, task_calibrate),
    "fidelity": (_prep_ort, task_fidelity),
    "genai_speed": (_prep_genai_speed, task_genai_speed),
}
UNSAMPLED_TASKS = {"genai_speed"}


def child_main(task: str, args_json: str, out_path: str) -> int:
    """Entry point of a measurement subprocess: result JSON into out_path."""
    prepare, run = TASKS[task]
    try:
        started = time.perf_counter()
        prepare()
        prepare_s = time.perf_counter() - started
        baseline = proc_status()
        io_before = proc_io()
        reset = reset_peak_rss()
        # Timing tasks go without the sampler: a thread waking at 100 Hz on a 2-core machine
        # preempts a pool thread mid parallel-for (VmHWM still gives their peak).
        with (RssSampler() if task not in UNSAMPLED_TASKS else NoSampler()) as sampler:
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
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        payload = {"error": f"{type(err).__name__}: {first}"[:300]}
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
            _kill_tree(proc.pid)
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


def _kill_tree(pid: int) -> None:
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
        cmd = [sys.executable, "-m", "runner.bench", "--child", task, "--child-args",
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


# -- checkpoints -----------------------------------------------------------------------------


def geometry_key(label: str, cfg, dtype: str, seed: int) -> str:
    """Directory name of a cached checkpoint: readable label + digest of everything that shapes it."""
    payload = json.dumps({"config": cfg.to_hf_dict(), "dtype": dtype, "seed": seed}, sort_keys=True)
    return f"{label}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def cached_checkpoint(workdir: Path, label: str, cfg, dtype: str, seed: int = 0,
                      created: list[Path] | None = None) -> Path:
    """A synthesized checkpoint under workdir/checkpoints/, written only when not there yet.

    synthesize_checkpoint publishes by renaming a finished temp dir, so a directory that exists
    is complete; a run killed half-way leaves only a dot-named temp dir, which is removed here.
    """
    from export.synth import synthesize_checkpoint
    root = workdir / "checkpoints"
    path = root / geometry_key(label, cfg, dtype, seed)
    if (path / "config.json").is_file():
        log(f"checkpoint {path.name}: cached")
        return path
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    log(f"checkpoint {path.name}: synthesizing ({cfg.num_parameters() / 1e9:.2f} B params, {dtype})")
    started = time.perf_counter()
    synthesize_checkpoint(cfg, path, dtype=dtype, seed=seed, force=True, progress=False, durable=False)
    log(f"checkpoint {path.name}: written in {time.perf_counter() - started:.0f} s")
    if created is not None:
        created.append(path)
    return path


def checkpoint_bytes(path: Path) -> int:
    return dir_bytes(path, ".safetensors")


# -- geometries ------------------------------------------------------------------------------


def wide_config(layers: int, quick: bool):
    """405B width (hidden 16384, ffn 53248, 128 heads, 8 KV heads) with `layers` layers.

    quick: hidden 1024 / ffn 3328 / 8 heads / vocab 32000 — the same TP8 layout at 1/16 width.
    """
    from export.synth import synth_config
    cfg = synth_config("llama-3.1-405b", None, layers, None)
    if quick:
        cfg = cfg.replace(hidden_size=1024, intermediate_size=3328, num_attention_heads=8,
                          num_key_value_heads=8, head_dim=128, vocab_size=32000)
    return cfg


def peers_config(layers: int, quick: bool):
    """~1B parameters at 8 layers: Llama 3.2 1B's width, untied, Llama 3 vocabulary."""
    from export.config import LlamaConfig
    if quick:
        return LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                           bos_token_id=1, eos_token_id=(2,))
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def decode_config(quick: bool):
    """~100M parameters (fp32 ~0.5 GB): hidden 768, 12 layers, 12 heads / 4 KV, vocab 32000."""
    from export.config import LlamaConfig
    if quick:
        return LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                           bos_token_id=1, eos_token_id=(2,))
    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                       bos_token_id=1, eos_token_id=(2,))


# -- the benchmarks --------------------------------------------------------------------------


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


TP_WIDE = 8


def bench_load(ctx: Context) -> None:
    cfg = wide_config(2, ctx.quick)
    ckpt = cached_checkpoint(ctx.workdir, f"405b-width-2L{'-quick' if ctx.quick else ''}", cfg,
                             "bfloat16", created=ctx.created)
    total = checkpoint_bytes(ckpt)
    rank = None
    width = "hidden 1024 (quick)" if ctx.quick else "405B width"
    for keep in (False, True):
        label = "keep all slices" if keep else "streaming (keep nothing)"
        evict_from_page_cache(ckpt)
        log(f"load: TP{TP_WIDE} rank 0 of {width}, 2 layers, {label}, cold page cache")
        what = f"rank 0/{TP_WIDE}, {label}"
        try:
            m = ctx.measure("load", what, "load", {"checkpoint": str(ckpt), "tp": TP_WIDE, "keep": keep})
        except MeasurementError as err:
            ctx.fail("load", what, err)
            continue
        r, rss = m["result"], m["rss"]
        rank = r["rank_bytes"]
        read = m.get("io", {}).get("read_bytes")
        ctx.add("load", f"{what}: wall", r["wall_s"], "s",
                f"{gb(rank) / r['wall_s']:.2f} GB/s of rank weights, cold page cache"
                + (f"; read {gb(read):.2f} GB from disk ({ratio(read, rank):.1f}x the rank's weights)"
                   if read is not None else ""))
        ctx.add("load", f"{what}: peak RSS - baseline", gb(rss["peak_delta"]), "GB",
                f"{ratio(rss['peak_delta'], rank):.2f}x the rank's weights ({gb(rank):.2f} GB)")
        ctx.add("load", f"{what}: peak RSS, absolute", gb(rss["peak"]), "GB",
                f"baseline after imports {gb(rss['baseline']):.2f} GB; peaks: heap (RssAnon) "
                f"{gb(rss['peak_anon']):.2f} GB, mapped checkpoint pages (RssFile) {gb(rss['peak_file']):.2f} GB")
    if rank is not None:
        ctx.add("load", f"rank 0/{TP_WIDE} weights", gb(rank), "GB",
                f"1/{total / rank:.1f} of the checkpoint")
    ctx.add("load", "checkpoint", gb(total), "GB",
            f"{width}, 2 layers, bf16, {cfg.num_parameters() / 1e9:.1f} B params")


def _export_rows(ctx: Context, bench: str, what: str, m: dict, disk: dict | None) -> None:
    r, rss = m["result"], m["rss"]
    written = r["bytes"]
    ctx.add(bench, f"{what}: wall", r["wall_s"], "s",
            f"weights {r['weights_s']:.1f} s + graph trace {r['trace_s']:.1f} s + save/check; "
            f"fsync afterwards {r['flush_s']:.1f} s")
    read = m.get("io", {}).get("read_bytes")
    if read is not None:
        ctx.add(bench, f"{what}: read from disk", gb(read), "GB",
                f"{ratio(read, written):.2f}x the bytes written ({gb(written):.2f} GB): column slices "
                "(o_proj, down_proj, lm_head) are read row by row, ~2 of each row's 8 pages at TP8")
    ctx.add(bench, f"{what}: peak RSS - baseline", gb(rss["peak_delta"]), "GB",
            f"absolute {gb(rss['peak']):.2f} GB (baseline after imports {gb(rss['baseline']):.2f} GB); "
            f"peaks: heap {gb(rss['peak_anon']):.2f} GB, mapped checkpoint pages "
            f"{gb(rss['peak_file']):.2f} GB; process tree {gb(m['proc']['tree_peak']):.2f} GB; "
            f"wrote {gb(written):.2f} GB")
    if disk is None:
        return
    write, copy = disk["write_gbps"], disk.get("copy_gbps")
    whole = written / GB / (r["wall_s"] + r["flush_s"])
    weights = r["data_bytes"] / GB / max(r["weights_s"] + r["flush_s"], 1e-9)
    ctx.add(bench, f"{what}: GB written / (wall + fsync)", whole, "GB/s",
            f"{100 * whole / write:.0f}% of the disk's sequential write (goal >= 70%)"
            + (f"; {100 * whole / copy:.0f}% of its copy rate" if copy else ""))
    ctx.add(bench, f"{what}: weight stream alone, (weights + fsync)", weights, "GB/s",
            f"{100 * weights / write:.0f}% of sequential write"
            + (f", {100 * weights / copy:.0f}% of the copy rate" if copy else "")
            + ": the part that grows with the model")


def _disk_rows(ctx: Context) -> dict | None:
    size = 256 * 1024**2 if ctx.quick else 2 * 1024**3
    log(f"export: disk sequential write/read/copy speed ({size / GB:.1f} GB file in {ctx.workdir})")
    try:
        disk = ctx.measure("export", "disk speed", "disk",
                           {"path": str(ctx.workdir / "disk-speed.tmp"), "bytes": size})["result"]
    except MeasurementError as err:
        ctx.fail("export", "disk sequential write", err)
        return None
    ctx.add("export", "disk sequential write (64 MB os.write + fsync)", disk["write_gbps"], "GB/s",
            f"{disk['bytes'] / GB:.1f} GB file in the workdir, measured after the exports: the yardstick")
    ctx.add("export", "disk sequential read (cold, 64 MB reads)", disk["read_gbps"], "GB/s",
            "the export reads the checkpoint from the same disk")
    ctx.add("export", "disk copy (cold read + write of the same file, fsync)", disk["copy_gbps"], "GB/s",
            "GB written per second when reads and writes share the disk: an I/O-bound export's ceiling")
    return disk


def bench_export(ctx: Context) -> None:
    width = "hidden 1024 (quick)" if ctx.quick else "405B width"
    runs = [(1, "bfloat16"), (2, "bfloat16")] + ([] if ctx.quick else [(2, "float16")])
    measured: dict[tuple[int, str], tuple[str, dict]] = {}
    for layers, dtype in runs:
        cfg = wide_config(layers, ctx.quick)
        ckpt = cached_checkpoint(ctx.workdir, f"405b-width-{layers}L{'-quick' if ctx.quick else ''}",
                                 cfg, "bfloat16", created=ctx.created)
        out = ctx.scratch("export-wide")
        evict_from_page_cache(ckpt)
        cast = "no cast" if dtype == "bfloat16" else "cast from bf16"
        what = f"rank 0/{TP_WIDE}, {layers} layer{'s' if layers > 1 else ''}, {dtype} ({cast})"
        log(f"export: TP{TP_WIDE} rank 0 of {width}: {what}, cold page cache")
        try:
            m = ctx.measure("export", what, "export", {"checkpoint": str(ckpt), "out": str(out), "options": {
                "tp": TP_WIDE, "dtype": dtype, "ranks": [0]}})
        except MeasurementError as err:
            ctx.fail("export", what, err)
            continue
        finally:
            shutil.rmtree(out, ignore_errors=True)
        measured[(layers, dtype)] = (what, m)
    all_ranks_run = None if ctx.quick else _export_all_ranks(ctx)
    # The yardsticks last: the disk test's own writeback must not slow the first export.
    disk = _disk_rows(ctx)
    for what, m in measured.values():
        _export_rows(ctx, "export", what, m, disk)
    if all_ranks_run is not None:
        what, m = all_ranks_run
        ctx.add("export", f"{what}: graph traces", m["result"]["trace_s"], "s",
                f"one trace for the stage, copied to its {TP_WIDE} ranks (was one per rank)")
        _export_rows(ctx, "export", what, m, disk)
    if (1, "bfloat16") in measured and (2, "bfloat16") in measured:
        one, two = measured[(1, "bfloat16")][1]["rss"], measured[(2, "bfloat16")][1]["rss"]
        ctx.add("export", "peak RSS - baseline, 2 layers / 1 layer (bf16)",
                ratio(two["peak_delta"], one["peak_delta"]), "x",
                f"flat in layers = 1.0 ({width}, TP{TP_WIDE} rank 0, cold page cache)")
        ctx.add("export", "peak heap (RssAnon), 2 layers / 1 layer (bf16)",
                ratio(two["peak_anon"], one["peak_anon"]), "x",
                "the part of the peak that is not mapped checkpoint pages")


def _export_all_ranks(ctx: Context) -> tuple[str, dict] | None:
    """All TP8 ranks of the 1-layer 405B-width checkpoint in one export: one trace serves them."""
    ckpt = cached_checkpoint(ctx.workdir, "405b-width-1L", wide_config(1, False), "bfloat16", created=ctx.created)
    out = ctx.scratch("export-wide-all")
    evict_from_page_cache(ckpt)
    what = f"all {TP_WIDE} ranks, 1 layer, bfloat16"
    log(f"export: TP{TP_WIDE} {what} of 405B width, cold page cache")
    try:
        return what, ctx.measure("export", what, "export", {"checkpoint": str(ckpt), "out": str(out),
                                                           "options": {"tp": TP_WIDE, "dtype": "bfloat16"}})
    except MeasurementError as err:
        ctx.fail("export", what, err)
        return None
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _peer_command(name: str, python: Path, ckpt: Path, out: Path) -> list[str]:
    if name == "genai":
        return [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                "-p", "fp32", "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")]
    # --no-post-process: no merge of with/without-past graphs; validation against PyTorch is
    # skipped too where the CLI offers it, so the time is the export's.
    return [str(python), "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(ckpt),
            "--task", "text-generation-with-past", *OPTIMUM_EXTRA_FLAGS, str(out)]


OPTIMUM_EXTRA_FLAGS: list[str] = []
PEER_TIMEOUT = 1800


def whole_peak(proc: dict) -> int:
    """Peak RSS of a command's process tree: the polled sum, or the largest single process's
    exact ru_maxrss where polling missed a short peak."""
    return max(proc.get("maxrss") or 0, proc.get("tree_peak") or 0)


def run_peer(ctx: Context, name: str, ckpt: Path) -> dict | str:
    """{"wall_s", "maxrss", "tree_peak", "bytes"} or the one-line reason it is unavailable."""
    python, why = peer_venv(ctx.workdir, name)
    if python is None:
        return why
    out = ctx.scratch(f"peer-{name}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(ctx.workdir / "peers" / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    cmd = _peer_command(name, python, ckpt, out)
    log(f"peers: {name}: {' '.join(cmd[1:])}")
    limit = int(0.85 * available_memory())
    evict_from_page_cache(ckpt)
    try:
        proc = run_watched(cmd, PEER_TIMEOUT, env=env, cwd=out.parent, rss_limit=limit)
        if proc.timed_out:
            return f"timed out after {PEER_TIMEOUT} s"
        if proc.over_limit:
            return f"stopped at {gb(limit):.1f} GB RSS (85% of the memory available)"
        if proc.returncode != 0:
            lines = [ln for ln in proc.output_tail.splitlines() if ln.strip()]
            return f"{describe_exit(proc.returncode)}: {(lines[-1] if lines else '').strip()[:200]}"
        written = dir_bytes(out) if out.exists() else 0
        if not written:
            return "exited 0 but wrote nothing"
        return {"wall_s": proc.wall_s, "maxrss": proc.maxrss, "tree_peak": proc.tree_peak,
                "bytes": written}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f"{out.name}-cache", ignore_errors=True)


def bench_peers(ctx: Context) -> None:
    layers = 2 if ctx.quick else 8
    cfg = peers_config(layers, ctx.quick)
    label = f"peers-1b-{layers}L{'-quick' if ctx.quick else ''}"
    ckpt = cached_checkpoint(ctx.workdir, label, cfg, "bfloat16", created=ctx.created)
    geometry = (f"{cfg.num_parameters() / 1e9:.2f} B params, hidden {cfg.hidden_size}, {layers} layers, "
                f"vocab {cfg.vocab_size}, bf16")
    ctx.add("peers", "checkpoint", gb(checkpoint_bytes(ckpt)), "GB", geometry)
    ours: dict[str, dict] = {}
    for dtype, n_layers in (("float32", layers), ("bfloat16", layers), ("float32", layers // 2)):
        c = ckpt if n_layers == layers else cached_checkpoint(
            ctx.workdir, f"peers-1b-{n_layers}L{'-quick' if ctx.quick else ''}",
            peers_config(n_layers, ctx.quick), "bfloat16", created=ctx.created)
        out = ctx.scratch("export-peers")
        key = f"{dtype}-{n_layers}L"
        evict_from_page_cache(c)  # every exporter, ours and the peers, starts from a cold cache
        log(f"peers: our export, TP1 {dtype}, {n_layers} layers")
        try:
            ours[key] = ctx.measure("peers", f"ours {key}", "export", {
                "checkpoint": str(c), "out": str(out), "options": {"tp": 1, "dtype": dtype}})
        except MeasurementError as err:
            ctx.fail("peers", f"our export TP1 {dtype} {n_layers} layers", err)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    for key, m in ours.items():
        rss = m["rss"]
        dtype, n = key.split("-")
        ctx.add("peers", f"ours, TP1 {dtype}, {n[:-1]} layers: peak RSS", gb(whole_peak(m["proc"])), "GB",
                f"whole process tree (target <= 1.5 GB); {gb(rss['peak_delta']):.2f} GB above the "
                f"baseline after imports; peaks: heap {gb(rss['peak_anon']):.2f} GB, mapped "
                f"checkpoint pages {gb(rss['peak_file']):.2f} GB")
    f32 = ours.get(f"float32-{layers}L")
    f32_half = ours.get(f"float32-{layers // 2}L")
    if f32 and f32_half:
        ctx.add("peers", f"ours, peak RSS {layers} layers / {layers // 2} layers (fp32)",
                ratio(whole_peak(f32["proc"]), whole_peak(f32_half["proc"])), "x", "flat in layers = 1.0")
    peers = {}
    titles = {"genai": "onnxruntime-genai model builder (-p fp32 -e cpu)",
              "optimum": "Optimum export onnx (fp32, text-generation-with-past)"}
    for name in ("genai", "optimum"):
        try:
            peers[name] = run_peer(ctx, name, ckpt)
        except Exception as err:  # noqa: BLE001 — a peer never takes the bench down
            peers[name] = f"{type(err).__name__}: {err}"
        result = peers[name]
        if isinstance(result, str):
            log(f"peers: {name} unavailable: {result}")
            ctx.add("peers", f"{titles[name]}: peak RSS", f"unavailable: {result}")
            continue
        ctx.add("peers", f"{titles[name]}: peak RSS", gb(whole_peak(result)), "GB",
                f"whole process tree (largest process {gb(result['maxrss']):.2f} GB); "
                f"wrote {gb(result['bytes']):.2f} GB")
    for name, title, target in (("genai", "genai", "target <= 0.5"), ("optimum", "Optimum", "")):
        result = peers.get(name)
        if not isinstance(result, dict):
            continue
        for key, m in ours.items():
            if not key.endswith(f"-{layers}L"):
                continue
            dtype = key.split("-")[0]
            # The peers leave writeback to the kernel; so does the comparison (the bench's own
            # fsync after our export is taken out of our process wall).
            r = m["result"]
            ours_wall = m["proc"]["wall_s"] - r["flush_s"]
            ctx.add("peers", f"wall, ours TP1 {dtype} / {title} fp32", ratio(ours_wall, result["wall_s"]), "x",
                    "; ".join(x for x in (target, f"process wall, interpreter start included: ours {ours_wall:.1f} s "
                                          f"(trace {r['trace_s']:.1f} s, weights {r['weights_s']:.1f} s), "
                                          f"{name} {result['wall_s']:.1f} s") if x))
            ctx.add("peers", f"peak RSS, ours TP1 {dtype} / {title} fp32",
                    ratio(whole_peak(m["proc"]), whole_peak(result)), "x", "process-tree peaks")


def bench_decode(ctx: Context) -> None:
    cfg = decode_config(ctx.quick)
    ckpt = cached_checkpoint(ctx.workdir, f"decode-{'quick' if ctx.quick else '100m'}", cfg, "float32",
                             created=ctx.created)
    prompt_len, new_tokens = (16, 16) if ctx.quick else (16, 64)
    max_seq_len = 128
    prompt = _decode_prompt(cfg.vocab_size, prompt_len)
    geometry = (f"fp32, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}; "
                f"batch 1, {prompt_len}-token prompt, {new_tokens} greedy steps, max_seq_len {max_seq_len}")
    ctx.add("decode", "model", cfg.num_parameters() / 1e6, "M params", geometry)
    artifact = ctx.workdir / "scratch" / "decode-artifact"
    shutil.rmtree(artifact, ignore_errors=True)
    log("decode: export TP1 fp32 static cache")
    results: dict[str, dict] = {}
    try:
        ctx.measure("decode", "export", "export", {"checkpoint": str(ckpt), "out": str(artifact), "options": {
            "tp": 1, "dtype": "float32", "kv_cache": "static", "max_seq_len": max_seq_len,
            "max_batch": 1}})
        log("decode: onnxruntime")
        results["ort"] = ctx.measure("decode", "ort", "decode_ort", {"artifact": str(artifact), "prompt": prompt,
                                                "new_tokens": new_tokens})
    except MeasurementError as err:
        ctx.fail("decode", "onnxruntime", err)
    finally:
        shutil.rmtree(artifact, ignore_errors=True)
    for key, task in (("hf", "decode_hf"), ("torch", "decode_torch")):
        log(f"decode: {key}")
        try:
            results[key] = ctx.measure("decode", key, task, {"checkpoint": str(ckpt), "prompt": prompt,
                                          "new_tokens": new_tokens, "max_seq_len": max_seq_len})
        except MeasurementError as err:
            ctx.fail("decode", key, err)
    bw = None
    try:
        log("decode: memory read bandwidth")
        bw = ctx.measure("decode", "membw", "membw", {"bytes": 256 * 1024**2 if ctx.quick else 1024**3})["result"]
    except MeasurementError as err:
        ctx.fail("decode", "memory bandwidth", err)
    # Bytes a decode step must read: every weight once, except the embedding (one row).
    per_token = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * 4
    bound = None
    if bw is not None:
        best = max(bw["gbps_1thread"], bw["gbps_all"])
        bound = best * GB / per_token
        ctx.add("decode", "memory read bandwidth (numpy sum of 1 GB, best of 3)", best, "GB/s",
                f"1 thread {bw['gbps_1thread']:.1f} GB/s, {bw['threads']} threads {bw['gbps_all']:.1f} GB/s")
        ctx.add("decode", "bandwidth bound", bound, "tokens/s",
                f"{per_token / GB:.2f} GB of weights read per token (all but the embedding)")
    hf = results.get("hf", {}).get("result", {}).get("tokens_per_s")
    titles = {"ort": "onnxruntime, our artifact (static cache)", "hf": "HF transformers generate (PyTorch eager)",
              "torch": "our torch backend (eager)"}
    for key in ("ort", "hf", "torch"):
        if key not in results:
            continue
        r = results[key]["result"]
        against = []
        if key != "hf" and hf:
            against.append(f"{r['tokens_per_s'] / hf:.2f}x HF")
        if bound:
            against.append(f"{100 * r['tokens_per_s'] / bound:.0f}% of the bandwidth bound")
        ctx.add("decode", f"{titles[key]}: decode", r["tokens_per_s"], "tokens/s", ", ".join(against))
        ctx.add("decode", f"{titles[key]}: peak RSS - baseline", gb(results[key]["rss"]["peak_delta"]),
                "GB", f"absolute {gb(results[key]['rss']['peak']):.2f} GB")
    if "ort" in results and "hf" in results:
        a, b = results["ort"]["result"]["tokens"], results["hf"]["result"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        ctx.add("decode", "greedy tokens equal to HF's (prefix)", f"{same}/{len(b)}", "tokens",
                "a sanity check that both ran the same model")


H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3 peak; decode reads every weight once per token


def bench_plan(ctx: Context) -> None:
    """Paper numbers until a GPU with TensorRT is here: 405B FP8 TP8 memory per rank and the
    memory-bandwidth floor of one decode step that a measured engine will be held against."""
    from engines.plan import PlanRequest, plan
    from export.config import preset
    for seq_len, batch in ((131072, 1), (8192, 8)):
        result = plan(PlanRequest(config=preset("llama-3.1-405b"), tp=8, quant="fp8", dtype="float16",
                                  max_batch=batch, max_seq_len=seq_len, max_input_len=512))
        peak = result.peak
        label = f"405B fp8 TP8, batch {batch}, context {seq_len}, 512 tokens/step"
        ctx.add("plan", f"{label}: weights per GPU", gb(peak.weights_bytes), "GB", "rank 0 (all ranks equal)")
        ctx.add("plan", f"{label}: KV cache per GPU", gb(peak.kv_cache_bytes), "GB",
                f"{batch} x {seq_len} x 126 layers x 1 KV head x 128 x 2 x 2 B")
        ctx.add("plan", f"{label}: activations per GPU", gb(peak.activation_bytes), "GB", "unfused attention scores included")
        ctx.add("plan", f"{label}: total per GPU", gb(peak.total_bytes), "GB",
                f"{'fits' if result.fits else 'does NOT fit'} 80 GiB H100 with 2 GiB reserve")
        if batch == 1:
            floor_ms = peak.weights_bytes / H100_HBM_BYTES_PER_S * 1e3
            ctx.add("plan", "405B fp8 TP8: roofline decode latency per token", round(floor_ms, 2), "ms",
                    f"{peak.weights_bytes / 1e9:.1f} GB weights per rank / 3.35 TB/s HBM (+ 2 all-reduces per layer, "
                    "not counted); the engine's measured latency is held against this")


def bench_fp8(ctx: Context) -> None:
    """Artifact size fp16 vs fp8; calibration time and RSS vs layers; fidelity fp8 vs fp16."""
    width = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=32000)
    from export.synth import synth_config
    layer_counts = (2, 4) if ctx.quick else (4, 16)
    ckpts = {}
    for layers in layer_counts:
        cfg = synth_config("llama-3.1-8b", None, layers, None).replace(**width)
        ckpts[layers] = cached_checkpoint(ctx.workdir, f"fp8-{layers}l", cfg, "bfloat16", created=ctx.created)
    small = ckpts[layer_counts[0]]
    sizes = {}
    for quant in ("none", "fp8"):
        out = ctx.workdir / "scratch" / f"fp8-bench-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        options = {"tp": 1, "dtype": "float16", "quant": quant, "max_seq_len": 256, "max_batch": 1}
        try:
            ctx.measure("fp8", f"export {quant}", "export", {"checkpoint": str(small), "out": str(out),
                                                            "options": options, "calibrate": quant == "fp8"})
            sizes[quant] = dir_bytes(out, ".data")
            if quant != "none":
                m = ctx.measure("fp8", "fidelity", "fidelity", {"checkpoint": str(small), "artifact": str(out),
                                                                "vocab": width["vocab_size"], "tokens": 96,
                                                                "max_seq_len": 256})
                ref16 = ctx.workdir / "scratch" / "fp8-bench-none"
                m16 = ctx.measure("fp8", "fidelity fp16", "fidelity", {"checkpoint": str(small), "artifact": str(ref16),
                                                                     "vocab": width["vocab_size"], "tokens": 96,
                                                                     "max_seq_len": 256})
                for tag, res in (("fp8", m["result"]), ("fp16", m16["result"])):
                    ctx.add("fp8", f"fidelity vs fp32 checkpoint, {tag} artifact: top-1 agreement",
                            round(res.get("top1_agreement", float("nan")), 4), "",
                            f"{layer_counts[0]} layers, hidden 512, random weights, 96 random tokens")
                    ctx.add("fp8", f"fidelity vs fp32 checkpoint, {tag} artifact: perplexity delta",
                            round(res.get("perplexity_delta_rel", float("nan")) * 100, 3), "%",
                            f"perplexity {res.get('perplexity', float('nan')):.3f} vs "
                            f"{res.get('reference_perplexity', float('nan')):.3f}")
        except MeasurementError as err:
            ctx.fail("fp8", f"export/fidelity {quant}", err)
    if len(sizes) == 2:
        ctx.add("fp8", "artifact weights, fp8 / fp16", round(sizes["fp8"] / sizes["none"], 3), "x",
                f"{sizes['fp8'] / 1e9:.3f} GB vs {sizes['none'] / 1e9:.3f} GB; embedding and lm_head stay fp16 "
                "and dominate this small model; quantized linears themselves shrink 2x")
    for layers, path in ckpts.items():
        try:
            m = ctx.measure("fp8", f"calibrate {layers}", "calibrate", {"checkpoint": str(path), "vocab": width["vocab_size"],
                                                                         "samples": 4, "seq_len": 128})
            ctx.add("fp8", f"calibration, {layers} layers: wall", round(m["result"]["seconds"], 2), "s",
                    "4 x 128 tokens, one layer in memory at a time")
            ctx.add("fp8", f"calibration, {layers} layers: peak RSS - baseline", gb(m["rss"]["peak_delta"]),
                    "GB", f"checkpoint {checkpoint_bytes(path) / 1e9:.3f} GB")
        except (MeasurementError, KeyError) as err:
            ctx.fail("fp8", f"calibrate {layers}", err)
    shutil.rmtree(ctx.workdir / "scratch" / "fp8-bench-none", ignore_errors=True)
    shutil.rmtree(ctx.workdir / "scratch" / "fp8-bench-fp8", ignore_errors=True)


# -- engines: TensorRT-RTX build of a 405B-width rank ----------------------------------------

ENGINES_VOCAB = 16384  # a cut vocabulary: the layer, not the embedding, dominates the rank's bytes
# Calibration text for the cut vocabulary: the shipped text tokenizes to ids up to ~97k, past
# 16384; every token of this one is below 16384 (the largest is 16181).
ENGINES_CALIB_TEXT = ("The model reads the text and writes the next word, one word at a time, until it is done. "
                      "Then it ends, and the people who asked for it read what it wrote. ")
ENGINES_TIMEOUT = 3600


def engines_config(quick: bool):
    """405B width (hidden 1024 when quick), 1 layer, vocab ENGINES_VOCAB."""
    return wide_config(1, quick).replace(vocab_size=ENGINES_VOCAB)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner.cli", *args]


def engines_export_cmd(ckpt: Path, art: Path, quant: str, calib_text: Path | None) -> list[str]:
    cmd = _cli("export", "--checkpoint", str(ckpt), "--out", str(art), "--tp", str(TP_WIDE), "--ranks", "0",
               "--dtype", "float16", "--max-seq-len", "4096", "--max-batch", "1", "--force", "--json")
    if quant == "fp8":
        cmd += ["--quant", "fp8", "--calib-text", str(calib_text), "--calib-samples", "1", "--calib-seq-len", "16"]
    return cmd


def engines_build_cmd(art: Path) -> list[str]:
    return _cli("build", "--artifact", str(art), "--trt", "rtx")


def build_cli_has_trt_flag() -> bool:
    done = subprocess.run(_cli("build", "--help"), capture_output=True, text=True, timeout=300, check=False)
    return "--trt" in done.stdout


def _tail_line(proc: ProcResult) -> str:
    lines = [ln.strip() for ln in proc.output_tail.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def run_cli_measured(ctx: Context, label: str, cmd: list[str], timeout: float = ENGINES_TIMEOUT) -> ProcResult:
    """One CLI command with its process tree's peak RSS polled; stopped at 85 % of the memory
    available (the machine is shared). Kept in bench.json's measurements."""
    limit = int(0.85 * available_memory())
    before = os.getloadavg()[0]
    log(f"engines: {label}: {' '.join(cmd[1:])}")
    proc = run_watched(cmd, timeout, rss_limit=limit)
    after = os.getloadavg()[0]
    ctx.loads += [before, after]
    ctx.measurements.append({"bench": "engines", "label": label, "cmd": cmd[1:], "loadavg_1min": [before, after],
                             "proc": {"returncode": proc.returncode, "wall_s": proc.wall_s, "maxrss": proc.maxrss,
                                      "tree_peak": proc.tree_peak, "rss_limit": limit,
                                      "timed_out": proc.timed_out, "over_limit": proc.over_limit},
                             "output_tail": proc.output_tail[-1000:]})
    log(f"  {label}: {proc.wall_s:.1f} s, exit {proc.returncode}, process-tree peak RSS "
        f"{gb(whole_peak(dataclasses.asdict(proc))):.2f} GB")
    if proc.timed_out:
        raise MeasurementError(f"timed out after {timeout:.0f} s")
    if proc.over_limit:
        raise MeasurementError(f"stopped at {gb(limit):.1f} GB process-tree RSS (85% of the memory available)")
    return proc


def _engine_section(art: Path) -> tuple[dict, dict, int]:
    """(manifest["engines"], its rank-0 entry, rank 0's weight bytes from the manifest's files)."""
    manifest = json.loads((art / "manifest.json").read_text())
    files = manifest.get("files", {})
    weights = files.get("rank0/model.onnx.data", {}).get("size")
    if not weights:
        raise MeasurementError(f"{art}/manifest.json: no rank0/model.onnx.data in its files")
    engines = manifest.get("engines")
    if not isinstance(engines, dict):
        return {}, {}, weights
    ranks = engines.get("ranks", {})
    return engines, ranks.get("0") or ranks.get(0) or {}, weights


def _engine_rows(ctx: Context, what: str, r: dict) -> None:
    """parse s, build s, builder RSS / weights, engine / weights."""
    e, engines, weights = r["entry"], r["engines"], r["weights"]
    targets = ", ".join(str(t) for t in engines.get("targets") or []) or "default"
    flavour = f"TensorRT-{str(engines.get('flavour', 'rtx')).upper()} {engines.get('version', '?')}"
    size = e.get("size")
    ctx.rows += [
        Row("engines", f"{what}: parse", e.get("parse_s"), "s", f"OnnxParser.parse_from_file, {flavour}"),
        Row("engines", f"{what}: build", e.get("build_s"), "s",
            f"build_serialized_network ahead of time for {targets}; rank total {e.get('seconds', float('nan')):.1f} s, "
            f"`llama405 build` process wall {r['wall_s']:.1f} s"),
        Row("engines", f"{what}: builder peak RSS / rank weight bytes", ratio(r["peak"], weights), "x",
            f"process-tree peak {gb(r['peak']):.2f} GB (largest process {gb(r['maxrss'] or 0):.2f} GB), "
            f"interpreter and TensorRT libraries included, vs weights {gb(weights):.3f} GB"),
        Row("engines", f"{what}: engine bytes / rank weight bytes", ratio(size, weights), "x",
            f"engine {gb(size) if size is not None else float('nan'):.3f} GB vs weights {gb(weights):.3f} GB"),
    ]


def bench_engines(ctx: Context) -> None:
    """TP8 rank 0 of a 405B-width 1-layer checkpoint (cut vocabulary), float16 and FP8: export,
    then `llama405 build --trt rtx` (TensorRT-RTX, ahead of time, no GPU needed): parse and
    build seconds, the builder's process-tree peak RSS and the engine's size, each against the
    rank's weight bytes (rank0/model.onnx.data)."""
    cfg = engines_config(ctx.quick)
    width = "hidden 1024 (quick)" if ctx.quick else "405B width"
    label = f"405b-width-1L-v{ENGINES_VOCAB}{'-quick' if ctx.quick else ''}"
    fresh = len(ctx.created)
    started = time.perf_counter()
    ckpt = cached_checkpoint(ctx.workdir, label, cfg, "bfloat16", created=ctx.created)
    synth_s = time.perf_counter() - started
    made = len(ctx.created) > fresh
    ctx.add("engines", "checkpoint", gb(checkpoint_bytes(ckpt)), "GB",
            f"{width}, 1 layer, vocab {cfg.vocab_size}, bf16, {cfg.num_parameters() / 1e9:.2f} B params; "
            + (f"synthesized in {synth_s:.0f} s" if made else "cached from an earlier run"))
    layer_fp32 = (cfg.num_parameters() - 2 * cfg.vocab_size * cfg.hidden_size - cfg.hidden_size) * 4 / GB
    has_trt = build_cli_has_trt_flag()
    calib = ctx.scratch("engines-calib.txt")
    calib.write_text(ENGINES_CALIB_TEXT, encoding="utf-8")
    results: dict[str, dict] = {}
    for quant, tag in (("none", "fp16"), ("fp8", "fp8")):
        art = ctx.scratch(f"engines-{tag}")
        what = f"{tag}, rank 0/{TP_WIDE}"
        try:
            evict_from_page_cache(ckpt)
            try:
                exp = run_cli_measured(ctx, f"export {tag}", engines_export_cmd(ckpt, art, quant, calib))
            except MeasurementError as err:
                hint = f"; FP8 calibration holds one unsharded layer in fp32 ({layer_fp32:.1f} GB)" if quant == "fp8" else ""
                raise MeasurementError(f"export: {err}{hint}") from None
            if exp.returncode != 0:
                raise MeasurementError(f"export: {describe_exit(exp.returncode)}: {_tail_line(exp)}")
            _, _, weights = _engine_section(art)
            ctx.add("engines", f"{what}: export wall", exp.wall_s, "s",
                    f"process wall, cold page cache; process-tree peak RSS {gb(whole_peak(dataclasses.asdict(exp))):.2f} GB"
                    + (f"; FP8 calibration (1 x 16 tokens) holds one unsharded layer in fp32 ({layer_fp32:.1f} GB)"
                       if quant == "fp8" else ""))
            ctx.add("engines", f"{what}: rank weight bytes (rank0/model.onnx.data)", gb(weights), "GB",
                    "float16, max_seq_len 4096, max_batch 1" if quant == "none"
                    else "FP8 E4M3 linears, float16 embedding / lm_head / norms")
            if not has_trt:
                raise MeasurementError("build: `llama405 build` has no --trt flag (TensorRT-RTX build not available)")
            evict_from_page_cache(art)
            build = run_cli_measured(ctx, f"build {tag}", engines_build_cmd(art))
            if build.returncode == 3:  # MissingRequirement: TensorRT-RTX bindings absent
                reason = _tail_line(build)
                log(f"engines: {tag} build unavailable: {reason}")
                ctx.add("engines", f"{what}: build", f"unavailable: {reason}")
                continue
            if build.returncode != 0:
                raise MeasurementError(f"build: {describe_exit(build.returncode)}: {_tail_line(build)}")
            engines, entry, weights = _engine_section(art)
            if not entry:
                raise MeasurementError("build: exited 0 but manifest.json has no engines.ranks['0']")
            results[tag] = {"engines": engines, "entry": entry, "weights": weights,
                            "peak": whole_peak(dataclasses.asdict(build)), "maxrss": build.maxrss,
                            "wall_s": build.wall_s}
            _engine_rows(ctx, what, results[tag])
        except MeasurementError as err:
            ctx.fail("engines", what, err)
        finally:
            shutil.rmtree(art, ignore_errors=True)
    if "fp16" in results and "fp8" in results:
        a, b = results["fp8"]["entry"].get("size"), results["fp16"]["entry"].get("size")
        ctx.add("engines", "engine bytes, fp8 / fp16", ratio(a, b), "x",
                f"weights fp8 / fp16 {ratio(results['fp8']['weights'], results['fp16']['weights']):.3f}x")


# -- genai: onnxruntime-genai on its own graph and on ours, against our runner ---------------

GENAI_THREADS = 2  # intra-op threads for every session of the suite (genai's own default is 1)
GENAI_IDLE_CORES = 0.25  # clean: other processes used fewer CPUs than this during the measurement
GENAI_IDLE_WAIT_S = 30  # at most this long, per child, waiting for the machine to go idle...
GENAI_IDLE_WAIT_TOTAL_S = 240  # ...and this long over the whole suite
GENAI_REPEATS = 3  # clean measurements wanted per variant and kind (decode, prefill)
GENAI_TIMEOUT = 1800


@dataclasses.dataclass(frozen=True)
class GenaiPlan:
    prompt_len: int
    new_tokens: int
    prefill_len: int
    max_seq_len: int  # the static / concat artifacts every runtime shares
    ratio_lens: tuple[int, int]  # static decode at these two max_seq_len, ours
    repeats: int = GENAI_REPEATS
    passes: int = 2  # each variant in a fresh child once per pass, the order reversed every other pass
    per_pass: int = 2  # measurements of each kind per child; one extra child where clean ones are short


def genai_plan(quick: bool) -> GenaiPlan:
    if quick:
        return GenaiPlan(prompt_len=8, new_tokens=8, prefill_len=64, max_seq_len=96, ratio_lens=(128, 4096))
    return GenaiPlan(prompt_len=32, new_tokens=64, prefill_len=512, max_seq_len=640, ratio_lens=(128, 4096))


def genai_models(quick: bool) -> dict[str, tuple[str, Any]]:
    """name -> (checkpoint cache label, config): the decode suite's ~125M model (vocab 32000,
    same cache entry) and the same with Llama 3's vocabulary (~272M)."""
    a = decode_config(quick)
    return {"A": (f"decode-{'quick' if quick else '100m'}", a),
            "B": (f"genai-{'quick' if quick else '272m'}-v128256", a.replace(vocab_size=128256))}


def genai_config_copy(src: Path, dst: Path, threads: int, max_length: int) -> dict[str, Any]:
    """dst/: src's genai_config.json with session_options.intra_op_num_threads = threads and
    search.max_length = max_length, every other entry of src symlinked (the graph and its data
    stay where they are); end-of-text ids outside the vocabulary are dropped (the model builder
    adds Llama 3's tokenizer's 128001 to a 32000-token model, which genai refuses). Returns what
    was changed."""
    cfg = json.loads((src / "genai_config.json").read_text())
    model = cfg["model"]
    model["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg.setdefault("search", {})["max_length"] = max_length
    vocab = model["vocab_size"]
    eos = model.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    kept = [i for i in ids if isinstance(i, int) and 0 <= i < vocab]
    dropped = [i for i in ids if i not in kept]
    if dropped and kept:
        model["eos_token_id"] = kept if len(kept) > 1 else kept[0]
    pad = model.get("pad_token_id")
    pad_fixed = isinstance(pad, int) and not 0 <= pad < vocab and bool(kept)
    if pad_fixed:
        model["pad_token_id"] = kept[0]
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name != "genai_config.json":
            (dst / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    (dst / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"threads": threads, "max_length": max_length, "eos_dropped": dropped,
            "pad_token_id": model.get("pad_token_id") if pad_fixed else None}


def genai_builder_python(workdir: Path) -> tuple[Path, str]:
    """The peers suite's genai venv where it is installed already; else this interpreter, which
    has onnxruntime-genai (the `test` extra) and what its model builder imports. Never installs."""
    venv = workdir / "peers" / "genai"
    python, marker = venv / "bin" / "python", venv / ".bench-installed"
    spec = json.dumps([PEER_TORCH, *PEER_PACKAGES["genai"]])
    if marker.is_file() and marker.read_text() == spec and python.is_file():
        return python, "the peers suite's genai venv"
    return Path(sys.executable), "this venv"


def run_genai_builder(ctx: Context, ckpt: Path, out: Path) -> dict | str:
    """The peers suite's model-builder command (-p fp32 -e cpu) on ckpt: {"wall_s", "python"} or why not."""
    python, where = genai_builder_python(ctx.workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(ctx.workdir / "peers" / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    cmd = _peer_command("genai", python, ckpt, out)
    log(f"genai: model builder ({where}): {' '.join(cmd[1:])}")
    before = os.getloadavg()[0]
    proc = run_watched(cmd, PEER_TIMEOUT, env=env, cwd=out.parent, rss_limit=int(0.85 * available_memory()))
    ctx.loads += [before, os.getloadavg()[0]]
    shutil.rmtree(out.parent / f"{out.name}-cache", ignore_errors=True)
    if proc.timed_out:
        return f"model builder timed out after {PEER_TIMEOUT} s"
    if proc.over_limit:
        return "model builder stopped at 85% of the memory available"
    if proc.returncode != 0:
        return f"model builder ({where}): {describe_exit(proc.returncode)}: {_tail_line(proc)}"
    if not (out / "genai_config.json").is_file():
        return f"model builder ({where}) exited 0 but wrote no genai_config.json"
    return {"wall_s": proc.wall_s, "python": where, "peak": whole_peak(dataclasses.asdict(proc))}


def _median(values: list[float]) -> float | None:
    import statistics
    return statistics.median(values) if values else None


def clean_values(values: list[float], others: list[float], cores: float) -> tuple[list[float], str]:
    """The measurements during which other processes used under `cores` CPUs, and a note; all
    of them, flagged, when none was clean."""
    kept = [x for x, o in zip(values, others, strict=True) if o < cores]
    if kept:
        return kept, f"{len(kept)} clean of {len(values)}"
    return list(values), f"none of {len(values)} clean (others used >= {cores} cores): inflated"


def _spread(values: list[float], note: str, digits: int = 1) -> str:
    if not values:
        return "no measurement"
    return f"median, {note} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


GENAI_TITLES = {
    "genai_own": "onnxruntime-genai, its own graph (model builder -p fp32 -e cpu)",
    "genai_static": "onnxruntime-genai, our static graph",
    "genai_concat": "onnxruntime-genai, our concat graph",
    "ours_static": "ours (OrtBackend), static graph",
    "ours_concat": "ours (OrtBackend), concat graph",
}


def measure_genai_variants(ctx: Context, name: str, variants: list[dict], common: dict,
                           plan: GenaiPlan, waited: list[float]) -> dict:
    """Each variant in its own fresh child (one runtime per process, as it would be deployed:
    onnxruntime-genai's sessions in the same process slowed our 128K-vocabulary prefill 1.5x),
    `plan.passes` times, alternating: ours and genai interleaved, the order reversed every other
    pass, so they share the machine's drift. A variant still short of `plan.repeats` clean
    measurements gets one more child. waited[0]: idle-gate seconds spent so far in the suite
    (added to). Returns task_genai_speed's shape, merged."""
    lists = ("decode_tps", "prefill_s", "decode_others", "prefill_others")
    merged: dict[str, dict] = {v["key"]: {k: [] for k in lists} for v in variants}
    gate = {"cores": common["idle_cores"], "waited_s": 0.0, "children": 0}

    def run(v: dict, label: str) -> None:
        r = merged[v["key"]]
        if "error" in r:
            return
        wait = max(0.0, min(GENAI_IDLE_WAIT_S, GENAI_IDLE_WAIT_TOTAL_S - waited[0]))
        try:
            m = ctx.measure("genai", f"{name} {v['key']} {label}", "genai_speed", {
                **common, "variants": [v], "repeats": plan.per_pass, "max_rounds": plan.per_pass + 1,
                "budget_s": 30, "idle_wait_s": wait}, timeout=GENAI_TIMEOUT)
        except MeasurementError as err:
            r["error"] = str(err)
            return
        got = m["result"]["variants"][v["key"]]
        for k in lists:
            r[k] += got[k]
        for k in ("load_s", "threads_api", "tokens", "error"):
            if k in got:
                r.setdefault(k, got[k])
        gate["waited_s"] += m["result"]["gate"]["waited_s"]
        waited[0] += m["result"]["gate"]["waited_s"]
        gate["children"] += 1

    for p in range(plan.passes):
        for v in variants if p % 2 == 0 else variants[::-1]:
            run(v, f"pass {p + 1}")
    def clean(r: dict, key: str) -> int:
        return sum(o < gate["cores"] for o in r[key])

    for v in variants:
        r = merged[v["key"]]
        if clean(r, "decode_others") < plan.repeats or (v["prefill"] and clean(r, "prefill_others") < plan.repeats):
            run(v, "extra")
    return {"variants": merged, "gate": gate}


def genai_rows(ctx: Context, name: str, cfg, plan: GenaiPlan, result: dict, notes: dict[str, str]) -> None:
    """Rows of one model's genai_speed result: decode and prefill per variant, ours / genai."""
    v, cores = result["variants"], result["gate"]["cores"]
    model = f"model {name} ({cfg.num_parameters() / 1e6:.0f} M, vocab {cfg.vocab_size})"
    per_token = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * 4  # bytes a step reads

    def pick(key: str, what: str) -> tuple[list[float], str]:
        r = v.get(key, {})
        return clean_values(r.get(what, []), r.get(what.split("_")[0] + "_others", []), cores)

    def med(key: str, what: str) -> float | None:
        return _median(pick(key, what)[0])

    for key, title in GENAI_TITLES.items():
        if key not in v and key not in notes:
            continue
        r = v.get(key, {})
        if not r.get("decode_tps"):
            why = r.get("error") or notes.get(key) or "not measured"
            ctx.add("genai", f"{model}, {title}: decode", f"not measured: {why}")
            continue
        tps = med(key, "decode_tps")
        against = [_spread(*pick(key, "decode_tps")), f"{GENAI_THREADS} intra-op threads",
                   f"{per_token * tps / GB:.1f} GB/s of weights"]
        if key in notes:
            against.append(notes[key])
        ctx.add("genai", f"{model}, {title}: decode", tps, "tokens/s", "; ".join(against))
        if r.get("prefill_s"):
            ctx.add("genai", f"{model}, {title}: {plan.prefill_len}-token prefill", med(key, "prefill_s"), "s",
                    _spread(*pick(key, "prefill_s"), digits=2))
    for mode in ("static", "concat"):
        ours, theirs = f"ours_{mode}", f"genai_{mode}"
        ctx.add("genai", f"{model}: decode, ours / genai on our {mode} graph",
                ratio(med(ours, "decode_tps"), med(theirs, "decode_tps")), "x",
                "target >= 1 (ours at least as fast as genai on the same graph); medians")
        ctx.add("genai", f"{model}: {plan.prefill_len}-token prefill seconds, ours / genai on our {mode} graph",
                ratio(med(ours, "prefill_s"), med(theirs, "prefill_s")), "x", "target <= 1; medians")
    ctx.add("genai", f"{model}: decode, ours static / genai on its own graph",
            ratio(med("ours_static", "decode_tps"), med("genai_own", "decode_tps")), "x",
            "its graph: GroupQueryAttention over a shared KV buffer" if "genai_own" in v
            else f"genai's own graph not measured: {notes.get('genai_own', 'no export')}")
    ctx.add("genai", f"{model}: {plan.prefill_len}-token prefill seconds, ours static / genai on its own graph",
            ratio(med("ours_static", "prefill_s"), med("genai_own", "prefill_s")), "x", "")
    a, b = plan.ratio_lens
    short, long = f"ours_static_{a}", f"ours_static_{b}"
    if short in v or long in v:
        for key, n in ((short, a), (long, b)):
            r = v.get(key, {})
            ctx.add("genai", f"{model}, ours static graph, max_seq_len {n}: decode",
                    med(key, "decode_tps") if r.get("decode_tps") else f"failed: {r.get('error', 'not measured')}",
                    "tokens/s", _spread(*pick(key, "decode_tps")))
        ctx.add("genai", f"{model}: static decode, max_seq_len {b} / {a} (ours)",
                ratio(med(long, "decode_tps"), med(short, "decode_tps")), "x",
                "target >= 0.90 (within 10%): the static graph's attention spans the whole buffer")
    reference = v.get("ours_static", {}).get("tokens")
    if reference:
        same = [f"{k.replace('_', ' ')} {_same_prefix(reference, v[k]['tokens'])}/{len(reference)}"
                for k in ("genai_own", "genai_static", "genai_concat", "ours_concat") if v.get(k, {}).get("tokens")]
        if same:
            ctx.add("genai", f"{model}: greedy tokens equal to ours static (prefix)", ", ".join(same), "tokens",
                    "a sanity check that every runtime ran the same weights")


def bench_genai(ctx: Context) -> None:
    """Decode tokens/s and long-prompt prefill seconds, batch 1, greedy, fp32, for
    onnxruntime-genai on its own model-builder graph and on our TP1 artifacts (genai_config.json
    copies with the same thread count), and our runner on the same artifacts, static and concat;
    plus our static decode at two max_seq_len. Each variant runs in fresh children, alternated
    (measure_genai_variants); medians of the clean measurements are reported."""
    plan = genai_plan(ctx.quick)
    gate_rows: list[dict] = []
    waited = [0.0]
    for name, (label, cfg) in genai_models(ctx.quick).items():
        ckpt = cached_checkpoint(ctx.workdir, label, cfg, "float32", created=ctx.created)
        model = f"model {name} ({cfg.num_parameters() / 1e6:.0f} M, vocab {cfg.vocab_size})"
        ctx.add("genai", model, cfg.num_parameters() / 1e6, "M params",
                f"fp32, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
                f"{cfg.num_key_value_heads} heads; batch 1, {plan.prompt_len}-token prompt, {plan.new_tokens} "
                f"greedy tokens ({plan.new_tokens - 1} timed steps), {plan.prefill_len}-token prefill, "
                f"max_seq_len {plan.max_seq_len}")
        root = ctx.scratch(f"genai-{name}")
        root.mkdir(parents=True)
        notes: dict[str, str] = {}
        variants: list[dict] = []
        try:
            arts: dict[str, Path] = {}
            exports = [("static", plan.max_seq_len), ("concat", plan.max_seq_len)]
            if name == "A":
                exports += [("static", n) for n in plan.ratio_lens]
            for mode, n in exports:
                art = root / f"ours-{mode}-{n}"
                log(f"genai: {model}: export TP1 fp32 {mode} cache, max_seq_len {n}")
                try:
                    ctx.measure("genai", f"{name} export {mode} {n}", "export", {
                        "checkpoint": str(ckpt), "out": str(art),
                        "options": {"tp": 1, "dtype": "float32", "kv_cache": mode, "max_seq_len": n}})
                    arts[f"{mode}-{n}"] = art
                except MeasurementError as err:
                    ctx.fail("genai", f"{model}: export {mode} max_seq_len {n}", err)
            own = root / "genai-own"
            try:
                built = run_genai_builder(ctx, ckpt, own)
            except Exception as err:  # noqa: BLE001 — the peer never takes the suite down
                built = _one_line(err)
            if isinstance(built, str):
                notes["genai_own"] = built
                log(f"genai: {model}: genai's own graph not measured: {built}")
            else:
                ctx.add("genai", f"{model}: genai model builder export", built["wall_s"], "s",
                        f"process wall (run with {built['python']}); process-tree peak RSS {gb(built['peak']):.2f} GB")
                changed = genai_config_copy(own, root / "genai-own-run", GENAI_THREADS, plan.max_seq_len)
                notes["genai_own"] = (f"config copy: intra_op_num_threads {GENAI_THREADS}, max_length "
                                      f"{plan.max_seq_len}" + (f", out-of-vocab eos {changed['eos_dropped']} dropped"
                                                              if changed["eos_dropped"] else ""))
                variants.append({"key": "genai_own", "kind": "genai", "path": str(root / "genai-own-run"),
                                 "max_len": plan.max_seq_len, "prefill": True})
            for mode in ("static", "concat"):
                art = arts.get(f"{mode}-{plan.max_seq_len}")
                if art is None:
                    continue
                variants.append({"key": f"ours_{mode}", "kind": "ours", "path": str(art),
                                 "max_len": plan.max_seq_len, "prefill": True})
                run_dir = root / f"genai-ours-{mode}"
                genai_config_copy(art, run_dir, GENAI_THREADS, plan.max_seq_len)
                notes[f"genai_{mode}"] = (f"copy of our genai_config.json with session_options.intra_op_num_threads "
                                          f"{GENAI_THREADS} (genai runs 1 thread without it)")
                variants.append({"key": f"genai_{mode}", "kind": "genai", "path": str(run_dir),
                                 "max_len": plan.max_seq_len, "prefill": True})
            for n in plan.ratio_lens if name == "A" else ():
                if f"static-{n}" in arts:
                    variants.append({"key": f"ours_static_{n}", "kind": "ours", "path": str(arts[f"static-{n}"]),
                                     "max_len": n, "prefill": False})
            os.sync()  # the exports' writeback must not run under the measurements
            log(f"genai: {model}: {len(variants)} variants, each in a fresh child {plan.passes} times "
                f"(order alternating), {plan.per_pass} idle-gated measurements per child")
            result = measure_genai_variants(ctx, name, variants, {
                "prompt": _decode_prompt(cfg.vocab_size, plan.prompt_len),
                "long_prompt": _decode_prompt(cfg.vocab_size, plan.prefill_len), "new_tokens": plan.new_tokens,
                "threads": GENAI_THREADS, "idle_cores": GENAI_IDLE_CORES}, plan, waited)
            for key, r in result["variants"].items():
                if key.startswith("ours") and r.get("threads_api") is False:
                    notes[key] = "this checkout's OrtBackend has no OrtThreads: its default threads"
            genai_rows(ctx, name, cfg, plan, result, notes)
            gate_rows.append({**result["gate"], "others": [o for r in result["variants"].values()
                                                           for o in r["decode_others"] + r["prefill_others"]]})
            for key, r in result["variants"].items():
                if r.get("error"):
                    ctx.failures.append(f"genai: {model}: {key}: {r['error']}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    others = [o for g in gate_rows for o in g["others"]]
    if others:
        clean = [o for o in others if o < GENAI_IDLE_CORES]
        ctx.add("genai", "idle gate: clean measurements / all", f"{len(clean)}/{len(others)}", "",
                f"clean: other processes used < {GENAI_IDLE_CORES} cores meanwhile (/proc/stat less this "
                f"process; median {_median(others):.2f}, max {max(others):.2f} cores over all); "
                f"{sum(g['children'] for g in gate_rows)} children, {plan.per_pass} measurements each "
                f"(>= {plan.repeats} clean wanted per variant); "
                f"{sum(g['waited_s'] for g in gate_rows):.0f} s waited for idle (<= {GENAI_IDLE_WAIT_S} s per child, "
                f"{GENAI_IDLE_WAIT_TOTAL_S} s in all); "
                f"{os.cpu_count()} cores")


BENCH_FUNCS = {"plan": bench_plan, "load": bench_load, "export": bench_export, "fp8": bench_fp8,
               "peers": bench_peers, "decode": bench_decode, "engines": bench_engines, "genai": bench_genai}


# -- peer virtual environments ---------------------------------------------------------------

# Each peer in its own venv: they pin transformers versions that differ from ours (and each
# other). torch first, pinned: it resolves to the CPU wheel on local disk, where a bare `torch`
# requirement would pull the multi-GB CUDA build.
PEER_TORCH = "torch==2.13.0"
PEER_PACKAGES = {
    # optimum[onnx] is optimum + optimum-onnx; optimum-onnx pins optimum~=2.1 and
    # transformers<4.58, so asking for optimum-onnx lets pip pick the matching optimum.
    "optimum": ["optimum-onnx[onnxruntime]"],
    # The model builder imports torch, transformers (AutoConfig/AutoTokenizer and the HF model
    # for weights), onnx_ir and onnx at run time but declares none of them.
    "genai": ["onnxruntime-genai", "transformers", "onnx", "onnx_ir", "sentencepiece", "protobuf"],
}
PEER_INSTALL_TIMEOUT = 1200


def peer_venv(workdir: Path, name: str) -> tuple[Path | None, str]:
    """(python of workdir/peers/NAME, "") once installed, or (None, one-line reason)."""
    venv = workdir / "peers" / name
    python = venv / "bin" / "python"
    marker = venv / ".bench-installed"
    spec = json.dumps([PEER_TORCH, *PEER_PACKAGES[name]])
    if marker.is_file() and marker.read_text() == spec and python.is_file():
        return python, ""
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"peer {name}: creating {venv} and installing {' '.join(PEER_PACKAGES[name])} (minutes)")
    steps = [["python3", "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
             [str(python), "-m", "pip", "install", "-q", PEER_TORCH],
             [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[name]]]
    deadline = time.monotonic() + PEER_INSTALL_TIMEOUT
    for cmd in steps:
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None, f"install timed out after {PEER_INSTALL_TIMEOUT} s ({' '.join(cmd[3:])})"
        except OSError as err:
            return None, f"install failed: {err}"
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            return None, f"`pip install {' '.join(cmd[5:])}` failed: {lines[-1] if lines else done.returncode}"
    marker.write_text(spec)
    return python, ""


# -- main ------------------------------------------------------------------------------------


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runner.bench", description=__doc__.split("\n\n")[0])
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
        selected = [b for b in DEFAULT_BENCHES if not (args.quick and b == "peers")]
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
                BENCH_FUNCS[name](ctx)
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
    if ctx.loads:
        # Wall times on a shared machine stretch with whatever else runs: say how busy it was.
        ctx.rows.insert(0, Row("machine", "1-min load average around the measurements",
                               f"{min(ctx.loads):.1f}-{max(ctx.loads):.1f}", "",
                               f"{os.cpu_count()} cores; above that, other jobs were competing "
                               "and the times are inflated"))
    payload = {"rows": [r.as_dict() for r in ctx.rows], "benches": selected, "quick": args.quick,
               "failures": ctx.failures, "measurements": ctx.measurements, "seconds": time.perf_counter() - started,
               "machine": machine_info(),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (workdir / "bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown_table(ctx.rows), flush=True)
    log(f"rows written to {workdir / 'bench.json'}; {len(ctx.failures)} failure(s)")
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
