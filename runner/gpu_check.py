"""`make gpu-check`: on a CUDA host, every small artifact variant computes on the GPU what it
computes on the CPU, and how far decode is from the memory-bandwidth floor. One table; exit 1 on
any parity failure, 3 (one line) where this host has no CUDA GPU, provider or PyTorch.

    python -m runner.gpu_check [--devices cuda,cpu] [--variants NAME,...] [--skip-speed]

The device pair is data (`--devices A,B`, B the reference whose greedy tokens drive the decode
steps): `--devices cpu,cpu` runs the same harness with no GPU (tests/runner/test_gpu_check.py
does, to test the table and the verdicts; it proves nothing about a GPU and says so). Checks:

- ort:      the artifact on ORT device A vs ORT device B, teacher-forced (16 prompt tokens,
            16 decode steps; runner/parity.py, runner/compare.py);
- torch:    the torch backend over the same artifact's weights, device A vs device B;
- fidelity: (FP8) the artifact on ORT device A, and on ORT device B, vs the unquantized
            checkpoint (torch, CPU) — the quantization error must be the same on both devices;
- calib:    FP8 calibration (export/calibrate.py) on device A vs device B: every amax;
- speed:    decode ms/step of an 8B-width 8-layer TP1 fp16 rank on ORT device A (128-token
            prompt) and torch eager, against the time to read the rank's weights once at the
            GPU's memory bandwidth (`--hbm-tbps`, else the GPU's datasheet figure below).

Bars (docs/deployment.md): fp16 top-1 1.0 and logits max-abs <= 2e-3; fp32 (TF32 off) <= 1e-4;
FP8 the project's fp8 presets (runner/compare.py); calibration amax relative difference <= 1e-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.errors import InputError
from runner.compare import DEFAULT_TOLERANCES, Tolerance, default_preset
from runner.device import Device, parse_device

PROMPT_TOKENS, STEPS = 16, 16
MAX_SEQ_LEN = PROMPT_TOKENS + STEPS
CALIB_RTOL = 1e-5
# Logit bars of two devices on the same artifact (max-abs, top-1), by compute dtype; FP8 takes the
# project's preset for its compute dtype. The other limits are loose: the bar is these two.
BARS = {"float16": (2e-3, 1.0), "float32": (1e-4, 1.0)}
_ANYTHING = dict(rel_l2=1e9, min_cosine=-1.0, kv_max_abs=1e9)
# Datasheet HBM bandwidth (TB/s) by the name CUDA reports; --hbm-tbps overrides or fills in.
HBM_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "A100-SXM4-80GB": 2.04}


@dataclasses.dataclass(frozen=True)
class Variant:
    tp: int
    pp: int
    kv_cache: str
    dtype: str
    quant: str = "none"  # an --quant name

    @property
    def name(self) -> str:
        scheme = f"{self.quant}-" if self.quantization.quantized else ""
        return f"tp{self.tp}pp{self.pp}-{self.kv_cache}-{scheme}{self.dtype}"

    @property
    def quantization(self):
        from export.quantization import quantization_named
        return quantization_named(self.quant)

    def tolerance(self) -> Tolerance:
        if self.quantization.quantized:
            return DEFAULT_TOLERANCES[default_preset(self.dtype, self.quantization)]
        max_abs, top1 = BARS[self.dtype]
        return Tolerance(max_abs=max_abs, min_top1=top1, **_ANYTHING)


VARIANTS = tuple(Variant(tp, pp, kv, dt, quant) for tp, pp, kv, dt, quant in (
    (1, 1, "static", "float16", "none"), (1, 1, "concat", "float16", "none"),
    (1, 1, "static", "float32", "none"), (1, 1, "concat", "float32", "none"),
    (2, 1, "static", "float16", "none"), (2, 1, "concat", "float32", "none"),
    (1, 2, "static", "float16", "none"), (1, 2, "concat", "float32", "none"),
    (1, 1, "static", "float16", "fp8"), (2, 1, "concat", "float32", "fp8")))
# Random weights at a width where every kernel path runs (GQA 8/2 heads: TP2 splits them).
CHECK_CONFIG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=2048)
SPEED_CONFIG = dict(preset="llama-3.1-8b", num_hidden_layers=8, vocab_size=32000)  # 4.01 GB of fp16 weights


@dataclasses.dataclass
class Row:
    check: str
    variant: str
    sides: str
    measured: str
    bar: str
    passed: bool | None  # None: a figure, not judged

    @property
    def verdict(self) -> str:
        return "-" if self.passed is None else "ok" if self.passed else "FAIL"


# -- what runs where ------------------------------------------------------------------------------

def cuda_missing(devices: tuple[Device, Device]) -> str | None:
    """Why this host cannot run the CUDA side(s) (one line), or None."""
    if not any(d.is_cuda for d in devices):
        return None
    import onnxruntime
    import torch
    from runner.backends.ort import CUDA_PROVIDER
    from runner.device import cuda_device_count
    if not torch.cuda.is_available():
        return f"this PyTorch ({torch.__version__}) has no CUDA (make setup-gpu builds the venv over the host's CUDA PyTorch)"
    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        return f"onnxruntime {onnxruntime.__version__} has no {CUDA_PROVIDER} (make setup-gpu installs onnxruntime-gpu)"
    return None if cuda_device_count() else "no CUDA GPU shows (driver, CUDA_VISIBLE_DEVICES)"


def _options(kind: str, device: Device):
    from runner.backends.options import OrtOptions, TorchOptions
    return (OrtOptions if kind == "ort" else TorchOptions)(device=device)


def parity_row(check: str, variant: str, sides: str, backend_a, backend_b, tolerance: Tolerance,
               prompt: list[int]) -> Row:
    """One teacher-forced parity run (runner/parity.py) judged by runner/compare.py."""
    from runner.parity import run_parity
    report = run_parity(backend_a, backend_b, prompt, STEPS, tolerance)
    o = report.overall
    measured = f"max-abs {o['max_abs']:.2g} top-1 {o['top1']:.3f} rel-l2 {o['rel_l2']:.2g}"
    bar = f"max-abs <= {tolerance.max_abs:.2g} top-1 >= {tolerance.min_top1:g}"
    if tolerance.rel_l2 < 1e9:
        bar += f" rel-l2 <= {tolerance.rel_l2:.2g}"
    return Row(check, variant, sides, measured, bar, report.passed)


def variant_rows(v: Variant, artifact: Path, checkpoint: Path, devices: tuple[Device, Device],
                 prompt: list[int]) -> list[Row]:
    from runner.backends.registry import open_backend
    a, b = devices
    sides = f"{a} vs {b}"
    rows = [parity_row(kind, v.name, sides, open_backend(kind, artifact, options=_options(kind, a)),
                       open_backend(kind, artifact, options=_options(kind, b)), v.tolerance(), prompt)
            for kind in ("ort", "torch")]
    if v.quantization.quantized:
        reference = open_backend("torch", artifact, reference=checkpoint, options=_options("torch", Device("cpu")))
        fidelity = DEFAULT_TOLERANCES[default_preset(v.dtype, v.quantization, reference=True)]
        rows += [parity_row("fidelity", v.name, f"ort {d} vs checkpoint (torch cpu)",
                            open_backend("ort", artifact, options=_options("ort", d)), reference, fidelity, prompt)
                 for d in dict.fromkeys(devices)]
    return rows


def calibration_row(checkpoint: Path, devices: tuple[Device, Device], tokens: np.ndarray) -> Row:
    from export.calibrate import calibrate
    from export.checkpoint import Checkpoint
    amax = [calibrate(Checkpoint(checkpoint), tokens, device=d.for_rank(0).torch).amax for d in devices]
    worst = max(abs(amax[0][n] - amax[1][n]) / amax[1][n] for n in amax[1])
    passed = amax[0].keys() == amax[1].keys() and worst <= CALIB_RTOL
    return Row("calib", f"{len(amax[1])} linears", f"{devices[0]} vs {devices[1]}",
               f"amax rel diff {worst:.2g}", f"<= {CALIB_RTOL:g}", passed)


# -- speed ------------------------------------------------------------------------------------------

def _decode_ms(backend, prompt_len: int, steps: int = 32, warmup: int = 4) -> float:
    from runner.backends.base import make_feed
    backend.start(1)
    tokens = np.arange(3, 3 + prompt_len)[None] % backend.config.vocab_size
    backend.infer(make_feed(tokens, np.arange(prompt_len)[None], np.ones((1, prompt_len))))
    times = []
    for k in range(warmup + steps):
        filled = prompt_len + k
        feed = make_feed(np.array([[5]]), np.array([[filled]]), np.ones((1, filled + 1)))
        started = time.perf_counter()
        backend.infer(feed)  # logits come back to the host: the step is done
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times[warmup:])


def hbm_tbps(device: Device, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "--hbm-tbps"
    if not device.is_cuda:
        return None, "no HBM on the CPU"
    import torch
    name = torch.cuda.get_device_name(device.for_rank(0).index)
    for key, tbps in HBM_TBPS.items():
        if key in name:
            return tbps, f"{name} datasheet"
    return None, f"{name}: unknown bandwidth, pass --hbm-tbps"


def speed_rows(workdir: Path, device: Device, given_tbps: float | None, prompt_len: int = 128,
               config: dict | None = None) -> list[Row]:
    """Decode ms/step on ORT and torch eager over one TP1 fp16 static rank of `config` (default
    SPEED_CONFIG), and the HBM floor; figures, not judged."""
    from export.config import preset
    from export.manifest import load_manifest
    from export.onnx_export import ExportOptions, export_artifact
    from export.synth import synthesize_checkpoint
    from runner.backends.registry import open_backend
    fields = dict(config or SPEED_CONFIG)
    cfg = preset(fields.pop("preset")).replace(**fields)
    width = f"{cfg.hidden_size}-wide {cfg.num_hidden_layers}-layer tp1 fp16"
    checkpoint = synthesize_checkpoint(cfg, workdir / "speed-ckpt", force=True, progress=False, durable=False,
                                       log=lambda line: None)
    artifact = export_artifact(checkpoint, workdir / "speed-art", ExportOptions(
        dtype="float16", kv_cache="static", max_seq_len=prompt_len + 64), force=True, log=lambda line: None)
    weights = sum(f["size"] for name, f in load_manifest(artifact).files.items() if name.endswith(".data"))
    tbps, source = hbm_tbps(device, given_tbps)
    floor_ms = None if tbps is None else 1e3 * weights / (tbps * 1e12)
    bar = "-" if floor_ms is None else f"floor {floor_ms:.2f} ms ({weights / 1e9:.2f} GB at {tbps} TB/s, {source})"
    rows = []
    for kind in ("ort", "torch"):
        ms = _decode_ms(open_backend(kind, artifact, options=_options(kind, device)), prompt_len)
        ratio = "" if floor_ms is None else f" = {ms / floor_ms:.1f}x floor"
        rows.append(Row("speed", width, f"{kind} {device}", f"decode {ms:.2f} ms/step{ratio}", bar, None))
    return rows


# -- the run ------------------------------------------------------------------------------------------

def format_table(rows: list[Row], devices: tuple[Device, Device]) -> str:
    head = ("check", "variant", "sides", "measured", "bar", "result")
    cells = [head] + [(r.check, r.variant, r.sides, r.measured, r.bar, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not any(d.is_cuda for d in devices):
        lines.insert(0, f"harness self-check: {devices[0]} vs {devices[1]} — no GPU ran; nothing here is a GPU figure")
    failed = [r for r in rows if r.passed is False]
    lines.append(f"{len(failed)} of {sum(r.passed is not None for r in rows)} checks failed" if failed
                 else f"all {sum(r.passed is not None for r in rows)} checks passed")
    return "\n".join(lines)


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.passed is False for r in rows) else 0


def _variants(text: str | None) -> list[Variant]:
    if text is None:
        return list(VARIANTS)
    by_name = {v.name: v for v in VARIANTS}
    unknown = [n for n in text.split(",") if n not in by_name]
    if unknown:
        raise InputError(f"--variants {unknown[0]}: choose among {', '.join(by_name)}")
    return [by_name[n] for n in text.split(",")]


def _devices(text: str) -> tuple[Device, Device]:
    parts = text.split(",")
    if len(parts) != 2:
        raise InputError(f"--devices {text!r}: two devices, A,B (B the reference), e.g. cuda,cpu")
    return parse_device(parts[0]), parse_device(parts[1])


def run_check(args) -> int:
    from export.config import LlamaConfig
    from export.onnx_export import ExportOptions, export_artifact
    from export.synth import synthesize_checkpoint
    devices, variants = _devices(args.devices), _variants(args.variants)
    missing = cuda_missing(devices)
    if missing is not None:
        from export.errors import MissingRequirement
        raise MissingRequirement(f"--devices {args.devices}: {missing}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    rng = np.random.default_rng(0)
    cfg = LlamaConfig(**CHECK_CONFIG)
    prompt = [int(t) for t in rng.integers(3, cfg.vocab_size, PROMPT_TOKENS)]
    tokens = rng.integers(3, cfg.vocab_size, (4, 32))
    checkpoint = synthesize_checkpoint(cfg, workdir / "checkpoint", force=True, progress=False, durable=False,
                                       log=lambda line: None)
    rows: list[Row] = []
    for v in variants:
        artifact = export_artifact(checkpoint, workdir / v.name, ExportOptions(
            tp=v.tp, pp=v.pp, kv_cache=v.kv_cache, dtype=v.dtype, quant=v.quant, max_seq_len=MAX_SEQ_LEN),
            force=True, calibration_tokens=tokens if v.quantization.needs_activation_scales else None,
            calibration_source="gpu-check tokens", log=lambda line: None)
        rows += variant_rows(v, artifact, checkpoint, devices, prompt)
        print(f"{v.name}: {', '.join(r.verdict for r in rows[-2:])}", file=sys.stderr, flush=True)
    rows.append(calibration_row(checkpoint, devices, tokens))
    if not args.skip_speed:
        rows += speed_rows(workdir, devices[0], args.hbm_tbps)
    print(format_table(rows, devices))
    return exit_code(rows)


def parser() -> argparse.ArgumentParser:
    from export.cli_flags import ArgumentParser
    p = ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="cuda,cpu", help="A,B: the device checked and the reference (default cuda,cpu)")
    p.add_argument("--variants", help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS))
    p.add_argument("--skip-speed", action="store_true", help="no 8B-width decode timing (4 GB of weights)")
    p.add_argument("--hbm-tbps", type=float, help="the GPU's memory bandwidth in TB/s for the floor")
    p.add_argument("--workdir", help="where checkpoints and artifacts go (default: a new temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    from export.cli_run import run_command
    args = parser().parse_args(argv)
    return run_command("gpu-check", lambda: run_check(args))


if __name__ == "__main__":
    sys.exit(main())
