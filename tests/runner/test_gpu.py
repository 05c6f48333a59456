"""On a CUDA GPU the runtimes compute what they compute on the CPU: teacher-forced parity (16
prompt tokens, 16 decode steps, the CPU's greedy token fed to both) of ORT CUDA vs ORT CPU on the
same artifact and torch CUDA vs torch CPU on the same checkpoint; and a row prefill into a
device-resident batch cache equals the row run alone.

Bars: fp16 top-1 1.0 and logits max-abs <= 2e-3; fp32 with TF32 off <= 1e-4 (measured on an
H200: fp16 1.1e-3, TP2 2.0e-3; fp32 3e-5 with TF32 off). Skipped, with the reason, where
onnxruntime has no CUDA provider, PyTorch no CUDA, or no GPU shows.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from export.checkpoint import Checkpoint
from export.model import ModelOptions
from runner.backends.options import OrtOptions, TorchOptions
from runner.backends.ort import OrtBackend
from runner.backends.torch import TorchBackend
from runner.compare import Tolerance
from runner.device import Device, cuda_device_count
from runner.parity import run_parity
from tests.export.test_export_artifact import shared_artifact
from tests.runner.test_backends import check_rows

pytestmark = pytest.mark.gpu

PROMPT = [int(t) for t in np.random.default_rng(16).integers(3, 256, size=16)]
STEPS = 16
MAX_SEQ_LEN = 32  # the prompt and every decode step, exactly
BARS = {"float16": (2e-3, 1.0), "float32": (1e-4, 1.0)}  # (logits max-abs, top-1)
ANYTHING = Tolerance(max_abs=1e9, rel_l2=1e9, min_cosine=-1.0, min_top1=0.0, kv_max_abs=1e9)


def _ort_cuda_missing() -> str | None:
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (make setup-gpu installs it)"
    return None if cuda_device_count() else "no CUDA GPU shows"


ort_cuda = pytest.mark.skipif(_ort_cuda_missing() is not None, reason=f"ORT on CUDA: {_ort_cuda_missing()}")
torch_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason=f"PyTorch {torch.__version__} has no CUDA (or no GPU shows)")


def assert_same_numbers(on_gpu, on_cpu, dtype: str) -> None:
    report = run_parity(on_gpu, on_cpu, PROMPT, STEPS, ANYTHING)
    worst = max(row.logits["max_abs"] for row in report.rows)
    top1 = min(row.logits["top1"] for row in report.rows)
    print(f"{on_gpu.name} cuda vs cpu, {dtype}: logits max-abs {worst:.3g}, top-1 {top1}")
    max_abs, min_top1 = BARS[dtype]
    assert len(report.rows) == STEPS + 1 and worst <= max_abs and top1 >= min_top1, (worst, top1)


@ort_cuda
@pytest.mark.parametrize("layout", [
    dict(tp=1, kv_cache="static", dtype="float16"), dict(tp=1, kv_cache="concat", dtype="float16"),
    dict(tp=2, kv_cache="static", dtype="float16"), dict(tp=1, kv_cache="static", dtype="float32"),
    dict(tp=1, pp=2, kv_cache="concat", dtype="float32"),
], ids=["tp1-static-fp16", "tp1-concat-fp16", "tp2-static-fp16", "tp1-static-fp32", "pp2-concat-fp32"])
def test_ort_cuda_equals_ort_cpu(hf_checkpoint, tmp_path_factory, layout):
    artifact = shared_artifact(tmp_path_factory, hf_checkpoint[0], max_seq_len=MAX_SEQ_LEN, **layout)
    assert_same_numbers(OrtBackend(artifact, options=OrtOptions(device=Device("cuda"))), OrtBackend(artifact),
                        layout["dtype"])


@ort_cuda
def test_ort_cuda_rows_equal_the_row_run_alone(hf_checkpoint, tmp_path_factory):
    artifact = shared_artifact(tmp_path_factory, hf_checkpoint[0], kv_cache="static", dtype="float32")
    check_rows(OrtBackend(artifact, options=OrtOptions(device=Device("cuda"))))


@torch_cuda
@pytest.mark.parametrize("tp,dtype,kv_cache", [(1, "float32", "static"), (2, "float32", "concat"),
                                               (1, "float16", "static")])
def test_torch_cuda_equals_torch_cpu(hf_checkpoint, tp, dtype, kv_cache):
    def backend(device: str) -> TorchBackend:
        return TorchBackend(Checkpoint(hf_checkpoint[0]), tp=tp, dtype=dtype,
                            options=ModelOptions(kv_cache=kv_cache, max_seq_len=MAX_SEQ_LEN),
                            run=TorchOptions(device=Device(device)))
    assert_same_numbers(backend("cuda"), backend("cpu"), dtype)


@torch_cuda
def test_torch_cuda_rows_equal_the_row_run_alone(hf_checkpoint):
    check_rows(TorchBackend(Checkpoint(hf_checkpoint[0]), options=ModelOptions(max_seq_len=32),
                            run=TorchOptions(device=Device("cuda"))))


@torch_cuda
def test_calibration_on_cuda_equals_the_cpu(hf_checkpoint):
    """--calib-device cuda: the same amax as the CPU within fp32 rounding (TF32 off)."""
    from export.calibrate import calibrate
    tokens = np.random.default_rng(0).integers(3, 256, (4, 32))
    on_gpu, on_cpu = (calibrate(Checkpoint(hf_checkpoint[0]), tokens, device=d).amax for d in ("cuda:0", "cpu"))
    assert on_gpu.keys() == on_cpu.keys()
    assert all(on_gpu[n] == pytest.approx(on_cpu[n], rel=1e-5) for n in on_cpu), (on_gpu, on_cpu)


@ort_cuda
@torch_cuda
def test_make_gpu_check_passes(tmp_path):
    """`make gpu-check` without the 4 GB speed rows: every variant, ORT/torch/fidelity/calibration."""
    from runner import gpu_check
    assert gpu_check.main(["--devices", "cuda,cpu", "--skip-speed", "--workdir", str(tmp_path)]) == 0
