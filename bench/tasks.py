"""The child tasks of `python -m bench`: what runs inside each fresh interpreter, and their registry.

A task is (prepare, run): prepare() imports what the work needs before the baseline is read,
run(args) does the measured work and returns a JSON-able dict. The parent starts one with
bench.harness.measure (`python -m bench --child TASK --child-args JSON --child-out PATH`);
child_main is that command's body.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import dir_bytes, evict_from_page_cache, run_child
from bench.report import GB
from bench.suites.batching import prep_decode_width, task_decode_width
from bench.suites.genai_speed import prep_genai_speed, task_genai_overhead, task_genai_speed
from bench.suites.serving import prep_serving, task_serving


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


def calibration_ids(vocab: int, shape):
    """Seeded calibration windows [samples, seq_len] of in-vocabulary ids (seed 0)."""
    import numpy as np
    return np.random.default_rng(0).integers(0, vocab, tuple(shape))


class TraceCounter:
    """Counts and times the exporter's torch.onnx traces (export.onnx_export.trace_rank_graph,
    one call per traced one-layer template: rank_graph looks it up as a module global, so
    wrapping it there sees every call) while the `with` block runs."""

    def __init__(self, module):
        self.module, self.calls, self.seconds = module, 0, 0.0

    def __enter__(self):
        self._original = original = self.module.trace_rank_graph

        def counted(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - started

        self.module.trace_rank_graph = counted
        return self

    def __exit__(self, *exc):
        self.module.trace_rank_graph = self._original
        return False


def task_export(args: dict) -> dict:
    """export_artifact for the given options; tracing and weight streaming timed apart.

    calibrate: True for 4 x 128 random ids, or [samples, seq_len]; calib_source names them in
    the manifest. The result counts the one-layer traces the export made (traces, traces_s)."""
    import export.onnx_export as ox
    out = Path(args["out"])
    options = ox.ExportOptions(**{k: tuple(v) if k == "ranks" and v is not None else v
                                  for k, v in args["options"].items()})
    started = time.perf_counter()
    tokens = None
    if args.get("calib_text"):  # the shipped calibration text, tokenized with the model's own tokenizer
        from export.calibrate import checkpoint_calibration_tokens
        samples, seq_len = args["calib_text"]
        tokens, args["calib_source"] = checkpoint_calibration_tokens(args["checkpoint"], None, samples, seq_len)
    elif args.get("calibrate"):
        from export.checkpoint import Checkpoint
        vocab = Checkpoint(args["checkpoint"]).config.vocab_size
        shape = (4, 128) if args["calibrate"] is True else args["calibrate"]
        tokens = calibration_ids(vocab, shape)
    stats: dict[str, float] = {}
    with TraceCounter(ox) as traces:
        ox.export_artifact(args["checkpoint"], out, options, force=True, calibration_tokens=tokens,
                           calibration_source=args.get("calib_source", "random tokens"), stats=stats)
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
            "weights_s": stats.get("weights_s", 0.0), "traces": traces.calls, "traces_s": traces.seconds,
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
    from export.options import ExportOptions
    from runner.backends.torch import TorchBackend
    backend = TorchBackend(Checkpoint(args["checkpoint"]), tp=1, dtype="float32",
                           options=ExportOptions(kv_cache="static", max_seq_len=args["max_seq_len"]).model_options)
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
    from export.options import ExportOptions
    from runner.backends.ort import OrtBackend
    from runner.backends.torch import TorchBackend
    from runner.fidelity import fidelity_report
    text = np.random.default_rng(1).integers(0, args["vocab"], args["tokens"]).tolist()
    reference = TorchBackend(Checkpoint(args["checkpoint"]), dtype="float32",
                             options=ExportOptions(max_seq_len=args["max_seq_len"]).model_options)
    report = fidelity_report(OrtBackend(args["artifact"]), reference, text, window=len(text))
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str))}


def task_fidelity_heldout(args: dict) -> dict:
    """What `llama405 parity --reference CKPT --fidelity-text heldout` measures: the artifact in
    onnxruntime against the unquantized checkpoint (torch, the artifact's dtype and layout) on the
    shipped held-out text, tokenized with the artifact's tokenizer; plus how many of its linears
    are FP8."""
    from importlib import resources
    from export.manifest import load_manifest
    from export.tokenizer import model_tokenizer
    from runner.backends.ort import OrtBackend
    from runner.backends.torch_artifact import reference_backend
    from runner.fidelity import fidelity_report
    artifact = Path(args["artifact"])
    text = resources.files("export").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    ids = model_tokenizer(artifact).encode(text, bos=True)
    reference = reference_backend(artifact, Path(args["checkpoint"]))
    report = fidelity_report(OrtBackend(artifact), reference, ids, window=len(ids))
    result = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
    result["quantized_linears"] = load_manifest(artifact).extra["fp8"]["quantized_linears"]
    return result


def onnx_node_counts(path: Path) -> dict[str, int]:
    """{op type: count} of a graph's top-level nodes, its weights not loaded."""
    from collections import Counter

    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(node.op_type for node in model.graph.node))


def _prep_graph_counts():
    import onnx  # noqa: F401

    import engines.inspect
    try:
        engines.inspect.parser_module()  # TensorRT's libraries, before the baseline
    except engines.inspect.NoParser:
        pass


def task_graph_counts(args: dict) -> dict:
    """Per artifact: rank `rank`'s ONNX op-type counts and what TensorRT's parser makes of it
    (engines/inspect.py: layer-type counts); "trt" is {"unavailable": why} without a parser."""
    from engines.inspect import NoParser, inspect_artifact
    from export.manifest import load_manifest
    out = {}
    for artifact in args["artifacts"]:
        entry = next(e for e in load_manifest(artifact, only=[]).ranks if e.rank == args["rank"])
        counts = {"onnx_ops": onnx_node_counts(Path(artifact) / entry.onnx_path)}
        try:
            summary = inspect_artifact(artifact, ranks=[args["rank"]])
        except NoParser as err:
            counts["trt"] = {"unavailable": str(err)}
        else:
            (rank,) = summary["ranks"]
            counts["trt"] = {"layers": rank["layers"], "parse_s": rank["parse_s"], **summary["parser"]}
        out[artifact] = counts
    return out


def _prep_none():
    pass


def task_convert_smollm2(args: dict) -> dict:
    """The demo model's checkpoint (convert-gguf --smollm2), written once into args["out"]."""
    from export.demo_model import GGUF_SHA256, smollm2_gguf
    from export.gguf_checkpoint import convert_gguf
    from export.tokenizer import model_tokenizer
    result = convert_gguf(smollm2_gguf(), args["out"], expected_sha256=GGUF_SHA256, log=lambda line: None)
    return {"cached": result.cached, "prompt": model_tokenizer(args["out"]).encode(args["prompt"])}


TASKS: dict[str, tuple[Callable[[], None], Callable[[dict], dict]]] = {
    "convert_smollm2": (_prep_export, task_convert_smollm2),
    "load": (_prep_torch, task_load),
    "disk": (_prep_none, task_disk),
    "export": (_prep_export, task_export),
    "membw": (_prep_none, task_membw),
    "decode_ort": (_prep_ort, task_decode_ort),
    "decode_torch": (_prep_torch_backend, task_decode_torch),
    "decode_hf": (_prep_hf, task_decode_hf),
    "calibrate": (_prep_export, task_calibrate),
    "fidelity": (_prep_ort, task_fidelity),
    "fidelity_heldout": (_prep_ort, task_fidelity_heldout),
    "genai_speed": (prep_genai_speed, task_genai_speed),
    "genai_overhead": (prep_genai_speed, task_genai_overhead),
    "graph_counts": (_prep_graph_counts, task_graph_counts),
    "decode_width": (prep_decode_width, task_decode_width),
    "serving": (prep_serving, task_serving),
}
UNSAMPLED_TASKS = {"genai_speed", "genai_overhead"}


def child_main(task: str, args_json: str, out_path: str) -> int:
    """Entry point of a measurement subprocess: result JSON into out_path."""
    prepare, run = TASKS[task]
    return run_child(prepare, run, args_json, out_path, sampled=task not in UNSAMPLED_TASKS)
