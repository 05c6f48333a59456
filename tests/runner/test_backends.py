"""The backend base and registry (runner/backends/base.py, registry.py, options.py, runner/device.py):
flag groups reaching each backend's options, --device parsing and the refusals of what cannot
keep caches where a session writes them, writes into one row of a batch cache (the row's logits
equal to the row run alone, ORT and torch), and a step with non-finite logits stopping the run.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from export.checkpoint import Checkpoint
from export.errors import InputError, MissingRequirement
from export.model import ModelOptions
from runner import device as device_module
from runner.backends.base import NonFiniteOutput, make_feed
from runner.backends.options import OrtOptions, TorchOptions, TrtOptions
from runner.backends.ort import OrtBackend
from runner.backends.ort_threads import OrtThreads
from runner.backends.registry import BACKEND_KINDS, REGISTRY, backend_options, kind, open_backend
from runner.backends.torch import TorchBackend
from runner.cli import _parser, main
from runner.device import Device, Placement, parse_device
from tests.export.test_export_artifact import shared_artifact

FP32_MAX_ABS = 1e-4
ROW_PROMPTS = np.random.default_rng(7).integers(3, 256, size=(3, 5))  # three prompts of one length
NEXT = np.array([[11], [12], [13]])  # one decode token per row


# -- flag groups and the registry ------------------------------------------------------------

def parse(*argv):
    return _parser().parse_args(list(argv))


def test_every_kind_has_a_flag_group_path_to_its_options():
    assert set(BACKEND_KINDS) == {"ort", "torch", "trt"} == set(REGISTRY)
    args = parse("generate", "--artifact", "art", "--backend", "ort", "--prompt", "hi", "--ort-threads", "3",
                 "--ort-spinning", "off", "--device", "cpu")
    (ort_options,) = backend_options(args, [("ort", args.device)])
    assert ort_options == OrtOptions(device=Device("cpu"), threads=OrtThreads(3, "off"))
    args = parse("generate", "--artifact", "art", "--backend", "trt", "--prompt", "hi", "--trt-cuda-graph",
                 "--trt-weight-streaming-budget", "1000")
    (trt_options,) = backend_options(args, [("trt", args.device)])
    assert trt_options == TrtOptions(cuda_graph=True, weight_streaming_budget=1000)
    with pytest.raises(InputError, match="choose one of ort, torch, trt"):
        kind("onnx")


def test_a_flag_of_a_backend_not_run_is_refused(capsys):
    code = main(["logits", "--checkpoint", "ckpt", "--backend", "torch", "--ort-threads", "2", "--tokens", "1",
                 "--out", "x.npy"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--ort-threads applies to --backend ort" in err


def test_tf32_reaches_the_cuda_side_only_and_needs_one():
    args = parse("parity", "--artifact", "art", "--a", "ort", "--b", "ort", "--a-device", "cuda", "--b-device", "cpu",
                 "--tf32")
    a, b = backend_options(args, [("ort", args.a_device), ("ort", args.b_device)])
    assert (a.tf32, a.device, b.tf32, b.device) == (True, Device("cuda"), False, Device("cpu"))
    args = parse("generate", "--artifact", "art", "--backend", "torch", "--prompt", "hi", "--tf32")
    with pytest.raises(InputError, match="--tf32"):
        backend_options(args, [("torch", args.device)])
    with pytest.raises(InputError, match="TensorRT engines run on CUDA"):
        TrtOptions(device=Device("cpu"))


# -- --device ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("cpu", Device("cpu")), ("cuda", Device("cuda")),
                                           ("cuda:1", Device("cuda", 1)), ("CUDA:0", Device("cuda", 0))])
def test_device_parsing(text, expected):
    assert parse_device(text) == expected


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cpu:0", "cuda:-1", "cuda:"])
def test_bad_devices_are_refused_naming_the_flag(text, capsys):
    code = main(["logits", "--checkpoint", "ckpt", "--device", text, "--tokens", "1", "--out", "x.npy"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "argument --device" in err


def test_ranks_are_placed_on_gpus(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 2)
    spread = Device("cuda")
    assert [spread.for_rank(r) for r in range(4)] == [Placement("cuda", i) for i in (0, 1, 0, 1)]
    assert spread.for_rank(3, local_rank=1) == Placement("cuda", 1)  # torchrun: LOCAL_RANK's GPU
    assert Device("cuda", 1).for_rank(0) == Placement("cuda", 1)
    with pytest.raises(InputError, match="shows 2 GPU"):
        Device("cuda", 2).for_rank(0)
    with pytest.raises(InputError, match="LOCAL_RANK"):
        Device("cuda", 0).for_rank(0, local_rank=0)
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 0)
    with pytest.raises(MissingRequirement, match="no CUDA GPU"):
        spread.for_rank(0)
    assert Device("cpu").for_rank(5) == Placement("cpu", 0)


@pytest.fixture(scope="module")
def static_artifact(hf_checkpoint, tmp_path_factory):
    return shared_artifact(tmp_path_factory, hf_checkpoint[0], tp=1, kv_cache="static", dtype="float32")


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this onnxruntime has a CUDA provider")
def test_ort_on_cuda_without_the_cuda_provider_exits_3(static_artifact, tmp_path, capsys):
    for argv in (["logits", "--artifact", str(static_artifact), "--backend", "ort", "--device", "cuda"],
                 ["parity", "--artifact", str(static_artifact), "--a", "ort", "--b", "torch", "--a-device", "cuda"]):
        extra = ["--tokens", "1,2,3"] + (["--out", str(tmp_path / "l.npy")] if argv[0] == "logits" else [])
        code = main(argv + extra)
        err = capsys.readouterr().err.strip()
        assert code == 3 and len(err.splitlines()) == 1 and "CUDAExecutionProvider" in err, err
    assert not (tmp_path / "l.npy").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this PyTorch has CUDA")
def test_torch_on_cuda_without_cuda_exits_3(hf_checkpoint, tmp_path, capsys):
    code = main(["logits", "--checkpoint", str(hf_checkpoint[0]), "--backend", "torch", "--device", "cuda",
                 "--tokens", "1,2,3", "--out", str(tmp_path / "l.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "has no CUDA" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this PyTorch has CUDA")
def test_calibration_on_cuda_without_cuda_exits_3(hf_checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    export = ["export", "--checkpoint", str(hf_checkpoint[0]), "--out", str(out)]
    code = main(export + ["--quant", "fp8", "--calib-device", "cuda:0"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "--calib-device cuda:0" in err and "has no CUDA" in err, err
    for argv, what in ((["--quant", "fp8", "--calib-device", "gpu"], "argument --calib-device"),
                       (["--calib-device", "cuda"], "nothing is calibrated")):  # no --quant fp8: refused
        code = main(export + argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and what in err, err
    assert not out.exists()


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this onnxruntime has a CUDA provider")
def test_a_session_that_fell_back_to_the_cpu_is_refused(static_artifact, monkeypatch):
    """onnxruntime builds a session without its CUDA provider when it cannot start it (warning only):
    the backend looks at what the session really got."""
    provided = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *provided])
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 1)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"), \
            pytest.raises(MissingRequirement, match="fell back to"):
        OrtBackend(static_artifact, options=OrtOptions(device=Device("cuda")))


def test_segment_sessions_print_nothing(hf_checkpoint, tmp_path_factory, capfd):
    """One SessionOptions per segment: onnxruntime's 'Config with key ... already exists' is gone."""
    artifact = shared_artifact(tmp_path_factory, hf_checkpoint[0], tp=2, pp=2, kv_cache="static", dtype="float32")
    capfd.readouterr()
    backend = OrtBackend(artifact)
    backend.start(1)
    backend.infer(make_feed(ROW_PROMPTS[:1], np.arange(5)[None], np.ones((1, 5))))
    out, err = capfd.readouterr()
    assert out == "" and err == "", err[-2000:]


# -- rows: a batch-1 step into one row of a batch cache ----------------------------------------

def alone(backend, prompt: np.ndarray) -> np.ndarray:
    """Prefill logits [5, vocab] of one prompt in a batch-1 cache."""
    backend.start(1)
    return backend.infer(make_feed(prompt[None], np.arange(5)[None], np.ones((1, 5))))["logits"][0]


def rows_then_lockstep(backend) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows 2, 0, 1 prefilled one at a time, then one decode step over all three rows."""
    backend.start(3)
    prefills = {}
    for row in (2, 0, 1):
        feed = make_feed(ROW_PROMPTS[row][None], np.arange(5)[None], np.ones((1, 5)))
        prefills[row] = backend.infer(feed, rows=slice(row, row + 1))["logits"][0]
        if row == 2:  # the other rows are untouched
            layers = backend.cache()
            assert all(not k[:2].any() and not v[:2].any() for k, v in layers) and layers[0][0][2].any()
    decode = backend.infer(make_feed(NEXT, np.full((3, 1), 5), np.ones((3, 6))))["logits"][:, 0]
    return [prefills[r] for r in range(3)], decode


def lockstep(backend) -> tuple[np.ndarray, np.ndarray]:
    backend.start(3)
    prefill = backend.infer(make_feed(ROW_PROMPTS, np.tile(np.arange(5), (3, 1)), np.ones((3, 5))))["logits"]
    decode = backend.infer(make_feed(NEXT, np.full((3, 1), 5), np.ones((3, 6))))["logits"][:, 0]
    return prefill, decode


def check_rows(backend) -> None:
    rows, decode = rows_then_lockstep(backend)
    for r in range(3):
        assert np.abs(rows[r] - alone(backend, ROW_PROMPTS[r])).max() <= FP32_MAX_ABS
    _, together = lockstep(backend)
    assert np.abs(decode - together).max() <= FP32_MAX_ABS


@pytest.mark.parametrize("layout", [dict(tp=1, pp=1), dict(tp=2, pp=2)], ids=["tp1", "tp2xpp2"])
def test_ort_rows_equal_the_row_run_alone(hf_checkpoint, tmp_path_factory, layout):
    artifact = shared_artifact(tmp_path_factory, hf_checkpoint[0], kv_cache="static", dtype="float32", **layout)
    check_rows(OrtBackend(artifact))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)], ids=["tp1", "tp2xpp2"])
def test_torch_rows_equal_the_row_run_alone(hf_checkpoint, tp, pp):
    check_rows(TorchBackend(Checkpoint(hf_checkpoint[0]), tp=tp, pp=pp, options=ModelOptions(max_seq_len=32)))


def test_rows_are_refused_where_they_cannot_be_written(hf_checkpoint):
    feed = make_feed(ROW_PROMPTS[:1], np.arange(5)[None], np.ones((1, 5)))
    concat = TorchBackend(Checkpoint(hf_checkpoint[0]), options=ModelOptions(kv_cache="concat", max_seq_len=32))
    concat.start(2)
    with pytest.raises(InputError, match="concat KV cache steps every row together"):
        concat.infer(feed, rows=slice(0, 1))
    static = TorchBackend(Checkpoint(hf_checkpoint[0]), options=ModelOptions(max_seq_len=32))
    static.start(2)
    for rows, message in ((slice(1, 3), "holds rows 0..1"), (slice(0, 2, 2), "consecutive"), (1, "slice"),
                          (slice(0, 2), "a batch of 1 for rows 0..1")):
        with pytest.raises(InputError, match=message):
            static.infer(feed, rows=rows)


# -- non-finite steps ---------------------------------------------------------------------------

def poison(artifact, tensor: str) -> None:
    """Write NaN over one float32 initializer inside rank0's model.onnx.data (sizes unchanged)."""
    rank_dir = artifact / "rank0"
    model = onnx.load(str(rank_dir / "model.onnx"), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == tensor)
    info = {e.key: e.value for e in init.external_data}
    with open(rank_dir / info["location"], "r+b") as f:
        f.seek(int(info["offset"]))
        f.write(np.full(int(info["length"]) // 4, np.nan, dtype=np.float32).tobytes())


def test_nan_weights_stop_the_run_naming_rank_and_step(static_artifact, tmp_path, capsys):
    bad = shutil.copytree(static_artifact, tmp_path / "nan")
    poison(bad, "lm_head.weight")
    out = tmp_path / "l.npy"
    code = main(["logits", "--artifact", str(bad), "--backend", "ort", "--tokens", "1,2,3", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "rank 0 (stage 0) returned non-finite logits" in err and "at step 0" in err and not out.exists()


def test_non_finite_hidden_states_name_their_stage(hf_checkpoint):
    backend = TorchBackend(Checkpoint(hf_checkpoint[0]), tp=2, pp=2, options=ModelOptions(max_seq_len=32))
    backend.start(1)
    feed = make_feed(ROW_PROMPTS[:1], np.arange(5)[None], np.ones((1, 5)))
    backend.infer(feed)
    with torch.no_grad():
        backend.modules[1].model.layers["0"].mlp.down_proj.weight.fill_(float("inf"))  # rank 1: stage 0
    with pytest.raises(NonFiniteOutput, match=r"ranks 0-1 \(stage 0\) returned non-finite hidden states .* step 1"):
        backend.infer(make_feed(NEXT[:1], np.array([[5]]), np.ones((1, 6))))


def test_open_backend_takes_its_kinds_options(static_artifact):
    with pytest.raises(ValueError, match="takes OrtOptions"):
        open_backend("ort", static_artifact, options=TorchOptions())
    backend = open_backend("ort", static_artifact, options=OrtOptions(threads=OrtThreads(1)))
    assert backend.name == "ort" and backend.device == Device("cpu")
