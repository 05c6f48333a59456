"""Every artifact variant through NVIDIA's ONNX parser and builder (TensorRT-RTX, no GPU needed).

The oracle is NVIDIA's own parser and builder: each rank graph of each variant (TP 1/2/4, PP 2,
TP2xPP2, static and concat caches, fp16/bf16/fp32, FP8 default and Meta's recipe, last-position
logits, batch 4) must parse into the layers TensorRT runs an LLM with and build into an engine
that the manifest records and whose hash verifies. Then `build-engine` from a checkpoint to FP8
engines, `llama405 inspect`, and the bad-input paths (a graph the parser refuses, targets the
builder does not know, options a GPU-less build cannot honour).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines import cli as engines_cli
from engines.build import build_engines
from engines.profiles import BuildOptions
from export.manifest import load_manifest
from export.onnx_export import ExportOptions, export_artifact
from export.sharding import stage_layers
from runner.cli import main as llama405
from tests.conftest import hf_model, save_hf, tiny_config
from tests.trt_parser import parsed_layers, write_index_sources

pytestmark = pytest.mark.rtx

MAX_SEQ = 32
VARIANTS = {
    "tp1-static-fp16": dict(tp=1, dtype="float16"),
    "tp2-static-fp16": dict(tp=2, dtype="float16"),
    "tp4-static-fp16": dict(tp=4, dtype="float16"),  # 2 KV heads: replicated over 4 ranks
    "pp2-static-fp16": dict(pp=2, dtype="float16"),
    "tp2xpp2-concat-fp16": dict(tp=2, pp=2, dtype="float16", kv_cache="concat"),
    "tp1-concat-bf16": dict(dtype="bfloat16", kv_cache="concat"),
    "tp2-static-fp32": dict(tp=2, dtype="float32"),
    "tp2-fp8-all-fp16": dict(tp=2, dtype="float16", quant="fp8", fp8_recipe="all"),
    "tp1-fp8-meta-bf16": dict(dtype="bfloat16", quant="fp8", fp8_recipe="meta"),
    "tp1-logits-last-batch4": dict(dtype="float16", logits="last", max_batch=4),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """4 layers: PP2 stages hold two each, and Meta's recipe leaves layers 0 and 3 unquantized."""
    return save_hf(hf_model(tiny_config(num_hidden_layers=4)), tmp_path_factory.mktemp("rtx") / "ckpt")


def _export(checkpoint: Path, out: Path, **options) -> Path:
    options.setdefault("max_seq_len", MAX_SEQ)
    export_options = ExportOptions(**options)
    tokens = None
    if export_options.quant == "fp8":  # calibration windows of in-vocabulary ids (the toy vocab is 256)
        tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16))
    return export_artifact(checkpoint, out, export_options, calibration_tokens=tokens, calibration_source="seeded ids")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rank_of_every_variant_parses_and_builds(checkpoint, tmp_path, variant):
    artifact = _export(checkpoint, tmp_path / variant, **VARIANTS[variant])
    manifest = load_manifest(artifact)
    for entry in manifest.ranks:
        layers, dtypes = parsed_layers(artifact / entry.onnx_path)
        n_layers = len(range(*entry.layers))
        assert n_layers == len(stage_layers(manifest.config.num_hidden_layers, manifest.pp, entry.pp_rank))
        static = manifest.kv_cache == "static"
        assert layers.get("KV_CACHE_UPDATE", 0) == (2 * n_layers if static else 0), (entry.rank, layers)
        if static:  # each row's write slot computed from its own mask row (per-sequence writeIndices)
            assert write_index_sources(artifact / entry.onnx_path) == ["attention_mask"], entry.rank
            assert manifest.cache_writes == "per_sequence"
        assert layers.get("DIST_COLLECTIVE", 0) == entry.collectives, (entry.rank, layers)
        # One fused attention per decoder layer (ONNX Attention -> IAttention), none decomposed by us.
        assert layers.get("ATTENTION_INPUT", 0) == layers.get("ATTENTION_OUTPUT", 0) == n_layers, layers
        assert "SOFTMAX" not in layers
        # RoPE as ONNX RotaryEmbedding -> TensorRT's rotary layer: one for q, one for k per layer.
        assert layers.get("ROTARY_EMBEDDING", 0) == 2 * n_layers, layers
        compute = {"float16": "HALF", "bfloat16": "BF16", "float32": "FLOAT"}[manifest.dtype]
        assert set(dtypes["MATRIX_MULTIPLY"]) == {compute}, dtypes
        if manifest.quant == "fp8":
            quantized = manifest.extra["fp8"]["quantized_linears"] // (manifest.tp * manifest.pp)
            assert dtypes["QUANTIZE"] == {"FP8": layers["QUANTIZE"]} and layers["QUANTIZE"] > 0
            assert layers["DEQUANTIZE"] == 2 * layers["QUANTIZE"]  # the FP8 weight and the FP8 activation
            assert quantized > 0
        else:
            assert "QUANTIZE" not in layers
    options = BuildOptions.for_artifact(manifest, flavour="rtx", max_input_len=8)
    section = build_engines(artifact, options, log=lambda line: None)
    assert section["flavour"] == "rtx" and section["version"] == "1.7.1.116"
    want_targets = ["sm89", "sm120", "sm121"] if manifest.quant == "fp8" else ["sm80", "sm86", "sm89", "sm120"]
    assert section["targets"] == want_targets and "gpu" not in section
    assert sorted(section["ranks"]) == sorted(str(e.rank) for e in manifest.ranks)
    reloaded = load_manifest(artifact, verify_hashes=True)  # engines listed, hashes verify
    for entry in reloaded.ranks:
        meta = section["ranks"][str(entry.rank)]
        assert reloaded.files[entry.engine_path]["sha256"] == meta["sha256"]
        assert (artifact / entry.engine_path).stat().st_size == meta["size"] > 0
        assert meta["onnx_sha256"] == reloaded.files[entry.onnx_path]["sha256"]
        assert meta["parse_s"] > 0 and meta["build_s"] > 0 and meta["profiles"]


def test_build_engine_makes_fp8_engines_from_a_checkpoint(tmp_path, capsys):
    """The standalone `build-engine`: calibrates (export/ owns the tokenizer), exports, builds."""
    checkpoint = save_hf(hf_model(tiny_config(vocab_size=128256, num_hidden_layers=2)), tmp_path / "ckpt",
                         max_shard_size="20MB")
    artifact = tmp_path / "art"
    argv = ["--checkpoint", str(checkpoint), "--out", str(artifact), "--tp", "2", "--quant", "fp8",
            "--fp8-recipe", "all", "--calib-samples", "2", "--calib-seq-len", "16", "--max-seq-len", str(MAX_SEQ),
            "--max-batch", "2", "--trt", "rtx", "--json"]
    assert engines_cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["stage"] == "engine" and summary["exported"]
    manifest = load_manifest(artifact, verify_hashes=True)
    assert manifest.extra["fp8"]["scales_from"] == "calibration"
    assert sorted(manifest.extra["engines"]["ranks"]) == ["0", "1"]
    assert all((artifact / e.engine_path).is_file() for e in manifest.ranks)
    # Built again from the artifact (every ONNX hash verified first), one rank: the other stays recorded.
    assert engines_cli.main(["--artifact", str(artifact), "--trt", "rtx", "--ranks", "1"]) == 0
    assert sorted(load_manifest(artifact, verify_hashes=True).extra["engines"]["ranks"]) == ["0", "1"]
    # Other targets: a new build replaces the section; engines of the old one are not kept beside it.
    assert engines_cli.main(["--artifact", str(artifact), "--trt", "rtx", "--ranks", "1", "--target", "sm89"]) == 0
    out = capsys.readouterr().out
    assert "removed rank0/engine.plan" in out
    manifest = load_manifest(artifact, verify_hashes=True)
    assert sorted(manifest.extra["engines"]["ranks"]) == ["1"] and not (artifact / "rank0" / "engine.plan").exists()


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory) -> Path:
    artifact = _export(checkpoint, tmp_path_factory.mktemp("built") / "art", tp=2, dtype="float16")
    assert engines_cli.main(["--artifact", str(artifact), "--trt", "rtx", "--target", "sm86,sm120"]) == 0
    return artifact


def test_inspect_reports_layers_and_engines(built, capsys):
    assert llama405(["inspect", str(built), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parser"]["flavour"] == "rtx" and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["kv_cache_writes"] == "per_sequence"
    for rank in summary["ranks"]:
        assert rank["layers"]["KV_CACHE_UPDATE"] == 8 and rank["layers"]["DIST_COLLECTIVE"] == 10
        assert rank["kv_write_indices_from"] == ["attention_mask"]
        assert rank["engine"]["file"] == f"rank{rank['rank']}/engine.plan"
    assert summary["engines"]["targets"] == ["sm86", "sm120"]
    assert llama405(["inspect", str(built), "--ranks", "1"]) == 0
    text = capsys.readouterr().out
    assert "rank 1:" in text and "rank 0:" not in text and "KV_CACHE_UPDATE 8" in text
    assert "static KV cache (per_sequence writes)" in text
    assert "KV_CACHE_UPDATE write indices: from the values of attention_mask (a slot per row)" in text
    assert "TensorRT-RTX 1.7.1.116, targets sm86, sm120" in text


def test_trt_backend_refuses_engines_this_machine_cannot_run(built):
    from export.errors import MissingRequirement
    from runner.backends.trt import TrtBackend
    with pytest.raises(MissingRequirement, match="TensorRT-RTX engines need an NVIDIA GPU"):
        TrtBackend(built)


# -- bad input -------------------------------------------------------------------------------

def test_a_graph_the_parser_refuses_is_one_line_naming_rank_node_and_message(checkpoint, tmp_path, monkeypatch,
                                                                            capsys):
    import export.onnx_export as onnx_export
    monkeypatch.setattr(onnx_export, "fold_constant_arithmetic", lambda model: model)  # the graph before the fix
    artifact = _export(checkpoint, tmp_path / "unfolded", dtype="float16")
    before = (artifact / "manifest.json").read_bytes()
    assert engines_cli.main(["--artifact", str(artifact), "--trt", "rtx"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    line = err_lines[-1]
    assert line.startswith("build-engine: error: rank 0: "), err_lines
    assert "ReduceMean" in line and "In node" in line and "build-time constant" in line
    assert not (artifact / "rank0" / "engine.plan").exists()
    assert (artifact / "manifest.json").read_bytes() == before
    assert llama405(["inspect", str(artifact)]) == 2
    assert "rank 0:" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--target", "sm90"], "no sm90"),
    (["--target", "sm80,sm7"], "no sm7"),
    (["--strip-plan"], "cannot strip weights"),
    (["--trt", "tensorrt", "--target", "sm89"], "builds for the GPU it runs on"),
], ids=["h100-target", "unknown-target", "strip-plan", "target-with-tensorrt"])
def test_options_an_rtx_build_cannot_honour_exit_2(built, argv, message, capsys):
    full = ["--artifact", str(built), *argv]
    if "--trt" not in argv:
        full += ["--trt", "rtx"]
    assert engines_cli.main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_fp8_engines_are_refused_for_targets_without_fp8(checkpoint, tmp_path, capsys):
    artifact = _export(checkpoint, tmp_path / "fp8", dtype="float16", quant="fp8")
    assert engines_cli.main(["--artifact", str(artifact), "--trt", "rtx", "--target", "sm86,sm89"]) == 2
    err = capsys.readouterr().err
    assert "will not be able to run on sm86" in err and not (artifact / "rank0" / "engine.plan").exists()


@pytest.mark.slow
def test_a_405b_width_tp8_rank_parses_and_builds(tmp_path):
    """The headline geometry (hidden 16384, 128/8 heads, FFN 53248) at one layer and a cut vocab:
    TP8 rank 0, float16, ~0.93 GB of weights, through NVIDIA's parser and builder."""
    import shutil

    from export.config import preset
    from export.synth import synthesize_checkpoint
    cfg = preset("llama-3.1-405b").replace(num_hidden_layers=1, vocab_size=16384)
    checkpoint = synthesize_checkpoint(cfg, tmp_path / "ckpt", progress=False, durable=False)
    try:
        artifact = export_artifact(checkpoint, tmp_path / "art", ExportOptions(
            tp=8, ranks=(0,), dtype="float16", max_batch=1, max_seq_len=4096))
    finally:
        shutil.rmtree(checkpoint)  # 7.5 GB
    manifest = load_manifest(artifact)
    layers, dtypes = parsed_layers(artifact / "rank0" / "model.onnx")
    assert layers["KV_CACHE_UPDATE"] == 2 and layers["DIST_COLLECTIVE"] == manifest.rank(0).collectives == 4
    assert layers["ROTARY_EMBEDDING"] == 2 and layers["ATTENTION_INPUT"] == 1
    section = build_engines(artifact, BuildOptions.for_artifact(manifest, flavour="rtx", max_input_len=512),
                            log=lambda line: None)
    weights = manifest.files["rank0/model.onnx.data"]["size"]
    assert 0.9 < section["ranks"]["0"]["size"] / weights < 1.5
    load_manifest(artifact, verify_hashes=True)


def test_an_fp8_kv_cache_is_refused_by_the_parser():
    """Why there is no --kv-cache-dtype fp8 (docs/engines.md): TensorRT's KV-cache update layer
    takes float/half/bf16 caches only. An FP8 cache written with TensorScatter after a
    QuantizeLinear, read through a DequantizeLinear into Attention, is refused at parse time.
    When a TensorRT version accepts it, this fails and the feature can be built."""
    import ml_dtypes
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from tests.trt_parser import parse_errors
    batch, heads, kv_heads, slots, dim = 1, 4, 2, 64, 64
    inputs = [h.make_tensor_value_info("q", T.FLOAT16, [batch, heads, "seq", dim]),
              h.make_tensor_value_info("k_new", T.FLOAT16, [batch, kv_heads, "seq", dim]),
              h.make_tensor_value_info("past_k", T.FLOAT8E4M3FN, [batch, kv_heads, slots, dim]),
              h.make_tensor_value_info("write_indices", T.INT64, [batch]),
              h.make_tensor_value_info("mask", T.FLOAT16, [batch, 1, "seq", slots])]
    nodes = [h.make_node("QuantizeLinear", ["k_new", "scale", "zero"], ["k_fp8"], saturate=1),
             h.make_node("TensorScatter", ["past_k", "k_fp8", "write_indices"], ["present_k"], axis=-2, mode="linear"),
             h.make_node("DequantizeLinear", ["present_k", "scale", "zero"], ["k"]),
             h.make_node("Attention", ["q", "k", "k", "mask"], ["y"], is_causal=0)]
    outputs = [h.make_tensor_value_info("y", T.FLOAT16, [batch, heads, "seq", dim]),
               h.make_tensor_value_info("present_k", T.FLOAT8E4M3FN, [batch, kv_heads, slots, dim])]
    constants = [nh.from_array(np.array(0.05, dtype=np.float16), "scale"),
                 nh.from_array(np.array(0, dtype=ml_dtypes.float8_e4m3fn), "zero")]
    model = h.make_model(h.make_graph(nodes, "fp8_cache", inputs, outputs, initializer=constants),
                         opset_imports=[h.make_opsetid("", 24)], ir_version=10)
    errors = parse_errors(model)
    assert any("cache has type FP8 but must have type Float, Half, or BFloat16" in e for e in errors), errors


def test_no_standard_onnx_form_reaches_the_packed_kv_update_or_attention(built):
    """Why prefill stays padded (docs/batching.md): TensorRT's KV-cache update and attention
    take packed tokens ([total_tokens, heads, head_dim] with cumulative lengths [batch + 1]),
    but NVIDIA's ONNX parser (TensorRT-RTX 1.7) builds every ONNX TensorScatter and Attention it
    accepts in the padded form with no lengths: a packed 3-D update is refused, and Attention's
    per-row `nonpad_kv_seqlen` is dropped rather than mapped onto the per-row key/value lengths.
    The day a parser maps either, this fails and packed prefill (or fixed-width decode that
    reads only each row's slots) can be built."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    from tests.trt_parser import parsed_forms
    batch, heads, kv_heads, slots, dim, f16 = 2, 4, 2, 64, 64, T.FLOAT16

    def model(nodes, inputs, outputs):
        return h.make_model(h.make_graph(nodes, "probe", inputs, outputs), opset_imports=[h.make_opsetid("", 24)],
                            ir_version=10)

    cache = h.make_tensor_value_info("cache", f16, [batch, kv_heads, slots, dim])
    present = h.make_tensor_value_info("present", f16, [batch, kv_heads, slots, dim])
    write_indices = h.make_tensor_value_info("write_indices", T.INT64, [batch])
    scatter = h.make_node("TensorScatter", ["cache", "update", "write_indices"], ["present"], axis=-2, mode="linear")
    # A packed update: every sequence's tokens end to end, [total_tokens, kv_heads, head_dim].
    packed = parsed_forms(model([scatter], [cache, h.make_tensor_value_info("update", f16, ["total", kv_heads, dim]),
                                            write_indices], [present]))
    assert any("The update tensor is required to be 4D, got 3D" in e for e in packed["errors"]), packed
    padded = parsed_forms(model([scatter], [cache, h.make_tensor_value_info("update", f16, [batch, kv_heads, "seq", dim]),
                                            write_indices], [present]))
    assert not padded["errors"]
    assert padded["kv_cache_update"] == [{"update_form": "PADDED_BHND", "update_lengths": False}]

    q = h.make_tensor_value_info("q", f16, [batch, heads, "seq", dim])
    kv = [h.make_tensor_value_info(n, f16, [batch, kv_heads, slots, dim]) for n in ("k", "v")]
    y = h.make_tensor_value_info("y", f16, [batch, heads, "seq", dim])
    lengths = parsed_forms(model([h.make_node("Attention", ["q", "k", "v", "", "", "", "valid"], ["y"], is_causal=0)],
                                 [q, *kv, h.make_tensor_value_info("valid", T.INT64, [batch])], [y]))
    padded_no_lengths = {"query_form": "PADDED_BHND", "key_value_form": "PADDED_BHND", "query_lengths": False,
                         "key_value_lengths": False}
    assert not lengths["errors"]
    assert lengths["attention"] == [{**padded_no_lengths, "mask": False, "causal_kind": "NONE"}]  # valid: dropped

    # What our rank graphs give it: the padded forms, the per-row mask, no lengths.
    ours = parsed_forms(onnx.load(str(built / "rank0" / "model.onnx")))  # 4 layers, weights inline
    assert not ours["errors"] and len(ours["kv_cache_update"]) == 8 and len(ours["attention"]) == 4
    assert all(u == {"update_form": "PADDED_BHND", "update_lengths": False} for u in ours["kv_cache_update"])
    assert all(a == {**padded_no_lengths, "mask": True, "causal_kind": "NONE"} for a in ours["attention"])
