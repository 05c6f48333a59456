"""The manifest's record of a quantized export's static activation scales (`extra.fp8`: the key is
the scheme's `Quantization.record_key`), typed: written by the exporter (onnx_export.py
`resolve_input_scales`) and read back exactly by the build flow (does an existing artifact match
the requested calibration?), and the CLI summary.

The JSON is the one artifacts have always held, so every earlier artifact reads; a record missing
a field, or holding an unknown one, is refused with "re-export": the scales come from the
checkpoint or a calibration run, and cannot be rebuilt from the artifact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from export.errors import ArtifactError

FROM_CHECKPOINT = "checkpoint input_scale tensors"
FROM_CALIBRATION = "calibration"


@dataclasses.dataclass(frozen=True)
class CalibrationRecord:
    source: str  # the text's file, or the shipped default's name
    samples: int
    seq_len: int
    max_activation: float  # largest |hidden state| seen (float16 headroom)


@dataclasses.dataclass(frozen=True)
class ScalesRecord:
    recipe: str
    exclude: tuple[str, ...]  # every exclusion pattern the export applied (flags, recipe, checkpoint)
    quantized_linears: int  # over all ranks' layers
    scales_from: str  # FROM_CHECKPOINT or FROM_CALIBRATION
    input_scales: dict[str, float]  # linear module path -> static per-tensor scale
    checkpoint_exclusions: dict[str, Any] | None = None  # export/checkpoint_quant.py manifest_record
    amax: dict[str, float] | None = None  # calibration only: max |input| per linear
    calibration: CalibrationRecord | None = None  # calibration only
    checkpoint_weights: str | None = None  # calibration only: "fp8" (stored FP8 weights) or "unquantized"
    smoothing: dict[str, Any] | None = None  # --fp8-smoothing: export/smoothing.py Smoothing.manifest_record

    @property
    def calibrated(self) -> bool:
        return self.scales_from == FROM_CALIBRATION

    def to_dict(self) -> dict[str, Any]:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        raw["exclude"] = list(self.exclude)
        if self.calibration is not None:
            raw["calibration"] = dataclasses.asdict(self.calibration)
        return raw

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> ScalesRecord:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {name for name, f in fields.items() if f.default is dataclasses.MISSING}
        if not isinstance(raw, dict) or not required <= set(raw) or not set(raw) <= set(fields):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ArtifactError(f"{source}: the activation-scales record must hold {sorted(required)} (optionally "
                                f"{sorted(set(fields) - required)}), got {got}; re-export the artifact")
        calibration = raw.get("calibration")
        if calibration is not None:
            if not isinstance(calibration, dict) or set(calibration) != {f.name for f in dataclasses.fields(CalibrationRecord)}:
                raise ArtifactError(f"{source}: calibration record {calibration!r} is incomplete; re-export the artifact")
            calibration = CalibrationRecord(**calibration)
        elif raw["scales_from"] == FROM_CALIBRATION:
            raise ArtifactError(f"{source}: scales from calibration without its calibration record; re-export the artifact")
        return cls(**{**raw, "exclude": tuple(raw["exclude"]), "calibration": calibration})


def scales_record(manifest, source: str = "manifest.json") -> ScalesRecord | None:
    """The artifact's activation-scales record; None for a scheme without one."""
    key = manifest.quantization.record_key
    raw = manifest.extra.get(key) if key is not None else None
    return None if raw is None else ScalesRecord.from_dict(raw, f"{source}: {key}")
