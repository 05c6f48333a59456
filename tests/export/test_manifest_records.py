"""The manifest's typed sections: the engines section (export/engines_record.py) and a quantized
export's activation-scales record (export/scales_record.py) are written and read back exactly,
what older manifests hold still reads (one `gpu` shape whatever they hold), and a section missing
a field is refused with the fix (rebuild the engines / re-export)."""

from __future__ import annotations

import copy

import pytest

from export.engines_record import BuildGpu, EnginesSection, RankEngine
from export.errors import ArtifactError
from export.scales_record import CalibrationRecord, ScalesRecord

PROFILE = {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [2, 8]}}


def section(**changes) -> EnginesSection:
    ranks = {r: RankEngine(file=f"rank{r}/engine.plan", size=10 + r, sha256="ab" * 32, onnx_sha256="cd" * 32,
                           parse_s=0.5, build_s=1.5, seconds=2.25, decomposable_attention=2, profiles=(PROFILE,),
                           gpu=BuildGpu("NVIDIA H100 80GB HBM3", "9.0")) for r in (0, 1)}
    fields = dict(format=2, flavour="tensorrt", version="10.16.0", targets=(), flags=("STRIP_PLAN", "REFIT_IDENTICAL"),
                  builder_optimization_level=3, workspace_bytes=None, max_batch=2, max_input_len=8, max_seq_len=32,
                  opt_batch=2, opt_input_len=1)
    return EnginesSection(**{**fields, **changes}).with_ranks(ranks, record_gpus=True)


def test_section_round_trips_exactly_with_one_gpu_shape():
    written = section()
    raw = written.to_dict()
    assert raw["gpu"] == [{"name": "NVIDIA H100 80GB HBM3", "sm": "9.0"}]  # a list, however many GPUs
    assert sorted(raw["ranks"]) == ["0", "1"] and raw["ranks"]["1"]["size"] == 11
    assert EnginesSection.from_dict(copy.deepcopy(raw), "m") == written
    rtx = section(flavour="rtx", targets=("sm89", "sm120")).with_ranks({}, record_gpus=False)
    assert "gpu" not in rtx.to_dict() and EnginesSection.from_dict(rtx.to_dict(), "m") == rtx


@pytest.mark.parametrize("old", [{"name": "NVIDIA H100 80GB HBM3", "sm": "9.0"},  # one GPU (a dict)
                                 [["NVIDIA H100 80GB HBM3", "9.0"]]])  # several GPUs (pairs)
def test_older_gpu_shapes_still_read(old):
    raw = section().to_dict()
    raw["gpu"] = old
    assert EnginesSection.from_dict(raw, "m").gpu == (BuildGpu("NVIDIA H100 80GB HBM3", "9.0"),)


@pytest.mark.parametrize("damage", ["drop header", "drop rank field", "unknown field", "format 1", "bad gpu"])
def test_a_section_missing_a_field_is_refused_with_rebuild(damage):
    raw = section().to_dict()
    if damage == "drop header":
        del raw["flavour"]
    elif damage == "drop rank field":
        del raw["ranks"]["0"]["onnx_sha256"]
    elif damage == "unknown field":
        raw["ranks"]["0"]["tuned"] = True
    elif damage == "format 1":
        raw["format"] = 1
    else:
        raw["gpu"] = "H100"
    with pytest.raises(ArtifactError, match=r"m.*rebuild the engines with `llama405 build --artifact"):
        EnginesSection.from_dict(raw, "m")


# What artifacts exported before the typed record hold in extra.fp8 (the exporter's dict, verbatim).
CALIBRATED = {"recipe": "meta", "exclude": ["*.self_attn.*", "model.layers.0.*", "model.layers.3.*"],
              "quantized_linears": 6, "scales_from": "calibration",
              "input_scales": {"model.layers.1.mlp.up_proj": 0.0125}, "amax": {"model.layers.1.mlp.up_proj": 5.6},
              "calibration": {"source": "llama405 default calibration text", "samples": 8, "seq_len": 256,
                              "max_activation": 88.5},
              "checkpoint_weights": "unquantized"}
FROM_CHECKPOINT = {"recipe": "default", "exclude": ["lm_head"], "quantized_linears": 7,
                   "checkpoint_exclusions": {"quant_method": "fp8", "key": "ignore", "modules": ["lm_head"],
                                             "honoured": True},
                   "scales_from": "checkpoint input_scale tensors", "input_scales": {"model.layers.0.mlp.up_proj": 0.5}}


@pytest.mark.parametrize("raw", [CALIBRATED, FROM_CHECKPOINT], ids=["calibrated", "from-checkpoint"])
def test_scales_record_of_earlier_artifacts_reads_and_round_trips(raw):
    record = ScalesRecord.from_dict(copy.deepcopy(raw), "m")
    assert record.to_dict() == raw
    assert record.calibrated == (raw is CALIBRATED)
    if record.calibrated:
        assert record.calibration == CalibrationRecord("llama405 default calibration text", 8, 256, 88.5)


@pytest.mark.parametrize("damage", ["input_scales", "calibration", "samples", "unknown"])
def test_a_scales_record_missing_a_field_is_refused_with_reexport(damage):
    raw = copy.deepcopy(CALIBRATED)
    if damage == "samples":
        del raw["calibration"]["samples"]
    elif damage == "unknown":
        raw["scale_dtype"] = "float16"
    else:
        del raw[damage]
    with pytest.raises(ArtifactError, match="m.*re-export the artifact"):
        ScalesRecord.from_dict(raw, "m")
