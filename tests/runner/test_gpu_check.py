"""`make gpu-check`'s harness (runner/gpu_check.py), run here with no GPU: `--devices cpu,cpu`.

These prove the variant list, the table, the verdicts and the exit codes — a HARNESS self-check,
not a GPU figure: both sides are the CPU. On a CUDA host `make gpu-check` runs the same code with
`--devices cuda,cpu`; tests/runner/test_gpu.py runs the same parity under pytest.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnxruntime
import pytest
import torch

from export.config import LlamaConfig
from export.synth import synthesize_checkpoint
from runner import gpu_check
from runner.backends.options import OrtOptions
from runner.backends.registry import open_backend
from runner.device import Device

pytestmark = pytest.mark.slow  # one FP8 export (~15 s of tracing on 2 cores) and 5 parity runs

FP8 = "tp1pp1-static-fp8-float16"


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    """(exit code, stdout, workdir) of `gpu_check --devices cpu,cpu` on the FP8 variant."""
    workdir = tmp_path_factory.mktemp("gpu-check")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gpu_check.main(["--devices", "cpu,cpu", "--variants", FP8, "--skip-speed", "--workdir", str(workdir)])
    return code, out.getvalue(), workdir


def test_cpu_vs_cpu_harness_passes_and_prints_one_table(harness_run):
    code, out, _ = harness_run
    lines = out.strip().splitlines()
    assert code == 0, out
    assert lines[0] == "harness self-check: cpu vs cpu — no GPU ran; nothing here is a GPU figure"
    rows = [line.split() for line in lines[3:-1]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("ort", FP8, "ok"), ("torch", FP8, "ok"),
                                                   ("fidelity", FP8, "ok"), ("calib", "28", "ok")], out
    assert lines[-1] == "all 4 checks passed"


def test_table_rows_and_label(harness_run, tmp_path):
    workdir = harness_run[2]
    devices = (Device("cpu"), Device("cpu"))
    artifact, checkpoint = workdir / FP8, workdir / "checkpoint"
    assert (artifact / "manifest.json").is_file() and (checkpoint / "config.json").is_file()
    variant = {v.name: v for v in gpu_check.VARIANTS}[FP8]
    prompt = list(range(3, 3 + gpu_check.PROMPT_TOKENS))
    rows = gpu_check.variant_rows(variant, artifact, checkpoint, devices, prompt)
    assert [r.check for r in rows] == ["ort", "torch", "fidelity"] and all(r.passed for r in rows)
    # The same runtime on the same device computes the same numbers: exactly 0 apart.
    assert rows[0].measured.startswith("max-abs 0 top-1 1.000")
    # A failing comparison: the artifact against another checkpoint's weights (same geometry).
    other = synthesize_checkpoint(LlamaConfig(**gpu_check.CHECK_CONFIG), tmp_path / "other", seed=1,
                                  progress=False, durable=False, log=lambda line: None)
    wrong = gpu_check.parity_row("ort", FP8, "cpu vs other weights", open_backend("ort", artifact, options=OrtOptions()),
                                 open_backend("torch", artifact, reference=other), variant.tolerance(), prompt)
    assert wrong.passed is False and wrong.verdict == "FAIL"
    table = gpu_check.format_table(rows + [wrong], devices)
    lines = table.splitlines()
    assert lines[0].startswith("harness self-check: cpu vs cpu — no GPU ran")
    assert lines[1].split() == ["check", "variant", "sides", "measured", "bar", "result"]
    assert lines[-1] == "1 of 4 checks failed" and lines[-2].endswith("FAIL")
    assert gpu_check.exit_code(rows) == 0 and gpu_check.exit_code(rows + [wrong]) == 1


def test_calibration_row_compares_every_amax(harness_run):
    workdir = harness_run[2]
    tokens = np.random.default_rng(0).integers(3, 2048, (2, 16))
    row = gpu_check.calibration_row(workdir / "checkpoint", (Device("cpu"), Device("cpu")), tokens)
    assert row.passed and row.measured == "amax rel diff 0" and row.variant == "28 linears"


@pytest.mark.skipif(torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this host has CUDA")
def test_without_cuda_exits_3_with_one_line(capsys):
    assert gpu_check.main(["--devices", "cuda,cpu"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpu-check: --devices cuda,cpu: "), err


@pytest.mark.parametrize("argv,what", [(["--variants", "tp9"], "--variants tp9"),
                                       (["--devices", "cpu"], "two devices"),
                                       (["--devices", "cpu,gpu"], "device 'gpu'")])
def test_bad_requests_exit_2(argv, what, capsys):
    assert gpu_check.main(argv + ["--skip-speed"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err, err


def test_speed_rows_time_decode_against_a_floor(tmp_path):
    """The speed rows' plumbing on a 2-layer toy rank on the CPU (a given bandwidth, since the CPU
    has no HBM figure): figures, never judged. The 8B-width rank is a GPU host's job."""
    toy = dict(preset="llama-3.1-tiny", num_hidden_layers=2, vocab_size=2048)
    rows = gpu_check.speed_rows(tmp_path, Device("cpu"), 1.0, prompt_len=8, config=toy)
    assert [(r.check, r.sides, r.passed) for r in rows] == [("speed", "ort cpu", None), ("speed", "torch cpu", None)]
    assert all(r.variant == "256-wide 2-layer tp1 fp16" and "x floor" in r.measured and "--hbm-tbps" in r.bar
               for r in rows), rows
    assert gpu_check.exit_code(rows) == 0 and "-" in gpu_check.format_table(rows, (Device("cpu"),) * 2)
