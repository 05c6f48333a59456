"""build-engine: profiles, preflight, the ONNX stage and its reuse, exit code 3 without TensorRT.

One tiny TP1 artifact is exported for the whole module (the costly part); every CLI test after
the first reuses it. The engine test is marked `gpu` and skips, naming what is missing, on
machines without TensorRT and an NVIDIA GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines import cli
from engines.build import EnginesNotBuilt, preflight
from engines.flow import artifact_differences
from engines.profiles import BuildOptions, optimization_profiles, parse_size, profile_shapes
from engines.plan import weights_bytes
from export.errors import ArtifactError, InputError
from export.kv_cache import KV_CACHE_LAYOUTS
from export.manifest import RankEntry, TensorSpec, load_manifest
from export.quantization import Fp8, Unquantized
from export.onnx_export import ExportOptions
from export.sharding import RankSpec
from tests.conftest import hf_model, save_hf, tiny_config

STATIC, CONCAT = KV_CACHE_LAYOUTS["static"], KV_CACHE_LAYOUTS["concat"]

MAX_SEQ = 64


# -- profiles (pure) -------------------------------------------------------------------------

def _entry(kv_cache: str, first: str = "input_ids", hidden: int = 64) -> RankEntry:
    past = MAX_SEQ if kv_cache == "static" else "past_seq"
    inputs = [TensorSpec(first, "int64" if first == "input_ids" else "float16",
                         ("batch", "seq") if first == "input_ids" else ("batch", "seq", hidden)),
              TensorSpec("position_ids", "int64", ("batch", "seq")),
              TensorSpec("attention_mask", "int64", ("batch", "total_seq" if kv_cache == "static" else "past_seq + seq"))]
    for i in range(2):
        for kv in ("key", "value"):
            inputs.append(TensorSpec(f"past_key_values.{i}.{kv}", "float16", ("batch", 1, past, 8)))
    return RankEntry(rank=0, tp_rank=0, pp_rank=0, layers=(0, 2), inputs=tuple(inputs), outputs=(), collectives=0)


OPTIONS = BuildOptions(max_batch=4, max_input_len=16, max_seq_len=MAX_SEQ, opt_batch=2, opt_input_len=1)


def test_static_profile_shapes():
    shapes = profile_shapes(_entry("static"), STATIC, MAX_SEQ, OPTIONS)
    assert shapes["input_ids"] == ((1, 1), (2, 1), (4, 16))
    assert shapes["position_ids"] == shapes["input_ids"]
    # W from 1 (a one-token prompt) to max_seq_len; tuned for fixed-width decode (W = max_seq_len)
    assert shapes["attention_mask"] == ((1, 1), (2, MAX_SEQ), (4, MAX_SEQ))
    # the static cache is fixed at max_seq_len: only its batch varies
    assert shapes["past_key_values.1.value"] == ((1, 1, MAX_SEQ, 8), (2, 1, MAX_SEQ, 8), (4, 1, MAX_SEQ, 8))
    assert len(optimization_profiles(_entry("static"), STATIC, MAX_SEQ, OPTIONS)) == 1


def test_later_stage_takes_hidden_states():
    shapes = profile_shapes(_entry("static", first="hidden_states"), STATIC, MAX_SEQ, OPTIONS)
    assert shapes["hidden_states"] == ((1, 1, 64), (2, 1, 64), (4, 16, 64))


def test_concat_profiles_are_consistent():
    profiles = optimization_profiles(_entry("concat"), CONCAT, MAX_SEQ, OPTIONS)
    assert len(profiles) == 2  # context (seq up to 16) and decode (seq 1, past up to 63)
    for profile in profiles:
        for point in range(3):
            seq = profile["input_ids"][point][1]
            past = profile["past_key_values.0.key"][point][2]
            assert profile["attention_mask"][point][1] == past + seq <= MAX_SEQ
    context, decode = profiles
    assert context["input_ids"][2] == (4, 16) and context["past_key_values.0.key"][2][2] == MAX_SEQ - 16
    assert decode["input_ids"][2] == (4, 1) and decode["past_key_values.0.key"][2][2] == MAX_SEQ - 1
    assert decode["past_key_values.0.key"][0][2] == 0


def test_unknown_symbolic_dim_is_refused():
    entry = RankEntry(0, 0, 0, (0, 1), (TensorSpec("input_ids", "int64", ("batch", "s17")),), (), 0)
    with pytest.raises(ArtifactError, match="s17"):
        profile_shapes(entry, STATIC, MAX_SEQ, OPTIONS)


def test_build_options_validation():
    with pytest.raises(InputError, match="--opt-batch"):
        BuildOptions(max_batch=2, opt_batch=3).validate()
    with pytest.raises(InputError, match="--max-input-len"):
        BuildOptions(max_input_len=8192, max_seq_len=4096).validate()
    with pytest.raises(InputError, match="--opt-input-len"):
        BuildOptions(max_input_len=16, opt_input_len=32, max_seq_len=64).validate()
    assert BuildOptions(max_batch=6).batch_opt == 6
    assert parse_size("16GiB") == 16 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(InputError):
        parse_size("lots")


def test_preflight_here_reports_tensorrt_and_gpu():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    missing = preflight("tensorrt", Unquantized(), tp=2)
    assert any("TensorRT is not importable" in m and "10.16" in m for m in missing)
    assert any("GPU" in m for m in missing) or _has_gpu()
    message = str(EnginesNotBuilt(missing, Path("ART")))
    assert "\n" not in message and "build-engine --artifact ART --trt tensorrt" in message and "--trt rtx" in message
    assert preflight("rtx", Fp8(), tp=8) == []  # TensorRT-RTX builds here, GPU or not


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


# -- the ONNX stage and exit code 3 ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, artifact) — the artifact made by `build-engine --stage onnx` (exit 0)."""
    root = tmp_path_factory.mktemp("build")
    checkpoint = save_hf(hf_model(tiny_config()), root / "ckpt")
    artifact = root / "art"
    code = cli.main(["--checkpoint", str(checkpoint), "--out", str(artifact), "--stage", "onnx",
                     "--max-seq-len", str(MAX_SEQ), "--max-batch", "2"])
    assert code == 0
    return checkpoint, artifact


def _argv(tiny, *extra: str) -> list[str]:
    checkpoint, artifact = tiny
    return ["--checkpoint", str(checkpoint), "--out", str(artifact), "--max-seq-len", str(MAX_SEQ),
            "--max-batch", "2", *extra]


def test_stage_onnx_leaves_a_verified_artifact(tiny):
    _, artifact = tiny
    manifest = load_manifest(artifact, verify_hashes=True)
    assert manifest.tp == 1 and manifest.max_seq_len == MAX_SEQ and manifest.max_batch == 2
    assert (artifact / "rank0" / "model.onnx").is_file() and "engines" not in manifest.extra


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_without_tensorrt_exits_3_after_reusing_the_artifact(tiny, capsys):
    _, artifact = tiny
    onnx_file = artifact / "rank0" / "model.onnx"
    before = onnx_file.stat().st_mtime_ns
    assert cli.main(_argv(tiny)) == 3
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1, captured.err
    line = err_lines[0]
    assert line.startswith("build-engine: engine stage not run: TensorRT is not importable")
    assert f"build-engine --artifact {artifact}" in line
    assert "reusing" in captured.out  # no second export
    assert onnx_file.stat().st_mtime_ns == before
    load_manifest(artifact, verify_hashes=True)  # still a finished artifact


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_artifact_source_and_json_mode_exit_3(tiny, capsys):
    _, artifact = tiny
    assert cli.main(["--artifact", str(artifact), "--json"]) == 3
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["stage"] == "onnx" and doc["artifact"] == str(artifact)
    assert any("TensorRT" in m for m in doc["missing"])
    assert len(captured.err.strip().splitlines()) == 1  # the error; hashing waits until a build can run


def test_other_export_options_are_refused_without_force(tiny, capsys):
    assert cli.main(_argv(tiny, "--tp", "2", "--stage", "onnx")) == 2
    err = capsys.readouterr().err
    assert "tp 1 (requested 2)" in err and "--force" in err and len(err.strip().splitlines()) == 1


def test_differences_list():
    cfg = tiny_config()
    from export.manifest import Manifest
    manifest = Manifest(config=cfg, options=ExportOptions(dtype="float16", max_batch=2, max_seq_len=MAX_SEQ), opset=24,
                        ranks=(RankEntry(0, 0, 0, (0, 2), (), (), 0),), files={}, source={}, toolchain={})
    same = ExportOptions(tp=1, dtype="float16", max_batch=2, max_seq_len=MAX_SEQ)
    assert artifact_differences(manifest, cfg, same) == []
    other = ExportOptions(tp=1, dtype="float32", kv_cache="concat", max_batch=2, max_seq_len=MAX_SEQ)
    diffs = artifact_differences(manifest, cfg.replace(rms_norm_eps=1e-6), other)
    assert diffs == ["the model config differs from the checkpoint's", "dtype float16 (requested float32)",
                     "kv-cache static (requested concat)"]


def test_tampered_artifact_is_not_reused(tiny, tmp_path, capsys):
    checkpoint, artifact = tiny
    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    data = copy / "rank0" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0xFF
    data.write_bytes(bytes(raw))
    argv = ["--checkpoint", str(checkpoint), "--out", str(copy), "--max-seq-len", str(MAX_SEQ), "--max-batch", "2",
            "--stage", "onnx"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.onnx.data" in err and "sha256" in err and "--force" in err


def test_bad_invocations_exit_2(tiny, capsys):
    checkpoint, artifact = tiny
    assert cli.main(["--checkpoint", str(checkpoint), "--stage", "onnx"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["--artifact", str(artifact), "--max-seq-len", "32"]) == 2
    assert "fixed in the graph" in capsys.readouterr().err  # checked before preflight


def test_fp8_differences_name_recipe_and_calibration(tiny):
    from engines.flow import CalibrationRequest
    cfg = tiny_config()
    from export.manifest import Manifest
    info = {"recipe": "all", "exclude": [], "quantized_linears": 1, "scales_from": "calibration",
            "input_scales": {"model.layers.0.mlp.up_proj": 0.01},
            "calibration": {"source": "llama405 default calibration text", "samples": 8, "seq_len": 256,
                            "max_activation": 1.0}}  # a complete record (export/scales_record.py)
    manifest = Manifest(config=cfg, options=ExportOptions(quant="fp8", fp8_recipe="all", max_batch=2,
                                                                max_seq_len=MAX_SEQ), opset=24,
                        ranks=(RankEntry(0, 0, 0, (0, 2), (), (), 0),), files={}, source={}, toolchain={},
                        extra={"fp8": info})
    options = ExportOptions(quant="fp8", fp8_recipe="all", max_batch=2, max_seq_len=MAX_SEQ)
    same = CalibrationRequest("llama405 default calibration text", 8, 256)
    assert artifact_differences(manifest, cfg, options, same) == []
    meta = ExportOptions(quant="fp8", max_batch=2, max_seq_len=MAX_SEQ, fp8_recipe="meta")
    diffs = artifact_differences(manifest, cfg, meta, CalibrationRequest("my.txt", 8, 256))
    assert diffs[0] == "fp8-recipe all (requested meta)"
    assert any("calibration source" in d for d in diffs)
    excluded = dataclasses.replace(options, fp8_exclude=("*.o_proj",))
    assert artifact_differences(manifest, cfg, excluded, same) == ["fp8-exclude none (requested *.o_proj)"]
    assert artifact_differences(manifest, cfg, options, None) == [
        "activation scales from calibration (requested --calib-text none)"]


def test_planner_weights_match_the_exported_bytes(tiny):
    """engines/plan.py's count equals what the exporter wrote for the rank (fp16, no padding)."""
    _, artifact = tiny
    model = onnx.load(str(artifact / "rank0" / "model.onnx"), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in init.external_data}["length"])
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    assert total == weights_bytes(tiny_config(), RankSpec(0, 1), "none", "float16")


def test_trt_backend_refuses_an_artifact_without_engines(tiny):
    from runner.backends.trt import TrtBackend
    _, artifact = tiny
    with pytest.raises(ArtifactError, match="no TensorRT engines.*llama405 build"):
        TrtBackend(artifact)


# -- on a GPU machine with TensorRT ----------------------------------------------------------

def _gpu_skip_reason() -> str | None:
    missing = preflight("tensorrt", Unquantized(), tp=1)
    return "; ".join(missing) if missing else None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=f"needs TensorRT and an NVIDIA GPU: {_gpu_skip_reason()}")
def test_tp1_engine_matches_onnxruntime(tiny, tmp_path):
    from engines.build import build_engines
    from runner.backends.base import make_feed
    from runner.backends.ort import OrtBackend
    from runner.backends.trt import TrtBackend
    _, artifact = tiny
    work = tmp_path / "art"
    shutil.copytree(artifact, work)
    manifest = load_manifest(work)
    section = build_engines(work, BuildOptions.for_artifact(manifest, max_input_len=16), log=lambda line: None)
    assert (work / "rank0" / "engine.plan").stat().st_size == section["ranks"]["0"]["size"]
    assert (work / "timing.cache").is_file()
    load_manifest(work, verify_hashes=True)  # the engine is listed and its hash verifies

    trt_backend, ort_backend = TrtBackend(work), OrtBackend(work)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 256, size=(1, 24))  # longer than --max-input-len 16: chunked prefill
    for backend in (trt_backend, ort_backend):
        backend.start(1)
    feed = make_feed(prompt, np.arange(24)[None], np.ones_like(prompt))
    a, b = trt_backend.infer(feed)["logits"], ort_backend.infer(feed)["logits"]
    np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)
    token = a[:, -1].argmax(-1)
    for step in range(4):
        mask = np.ones((1, 25 + step), dtype=np.int64)
        feed = make_feed(token[:, None], np.array([[24 + step]]), mask)
        a, b = trt_backend.infer(feed)["logits"], ort_backend.infer(feed)["logits"]
        np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)
        token = b[:, -1].argmax(-1)
    for (ka, va), (kb, vb) in zip(trt_backend.cache(), ort_backend.cache(), strict=True):
        np.testing.assert_allclose(ka[:, :, :28], kb[:, :, :28], atol=2e-2)
        np.testing.assert_allclose(va[:, :, :28], vb[:, :, :28], atol=2e-2)
