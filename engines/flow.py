"""Checkpoint or artifact -> artifact (+ engines): the `build` command's flow.

Export the ONNX artifact if needed (or reuse one whose manifest matches the request and whose
hashes verify), then check the chosen TensorRT flavour (`engines.build.preflight`). When
something is missing the ONNX stage is done and `EnginesNotBuilt` (a MissingRequirement) says
what is missing and how to go on (the CLI turns it into one line and exit code 3); otherwise
every rank's engine is built (`engines.build.build_engines`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engines.build import BuildOptions, EnginesNotBuilt, build_engines, describe_flavour, preflight
from export.engines_record import EnginesSection
from export.errors import ArtifactError
from export.manifest import MANIFEST, Manifest, load_manifest
from export.scales_record import scales_record
from export.trt_flavours import flavour as trt_flavour


@dataclasses.dataclass
class BuildResult:
    artifact: Path
    exported: bool
    reused: bool
    stage: str
    engines: dict | None = None

    def summary(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "exported": self.exported, "reused": self.reused,
                "stage": self.stage, "engines": self.engines}


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    """FP8 activation calibration as requested on the command line: `text` (a file, or None for
    the shipped default) tokenized into `samples` windows of `seq_len` tokens. `source` is what
    an existing artifact's manifest is compared with."""

    source: str
    samples: int
    seq_len: int
    text: str | None = None


def artifact_differences(manifest: Manifest, config, options,
                         calibration: CalibrationRequest | None = None) -> list[str]:
    """How an existing artifact differs from what `options` (ExportOptions, the checkpoint's FP8
    exclusions resolved) would export: the manifest holds the options it was exported with."""
    diffs = []
    if manifest.config != config:
        diffs.append("the model config differs from the checkpoint's")
    diffs += manifest.options.differences(options)
    record = scales_record(manifest) if manifest.quant == options.quant else None
    if record is not None and record.calibrated:
        if calibration is None:
            diffs.append("activation scales from calibration (requested --calib-text none)")
        else:
            for key in ("source", "samples", "seq_len"):
                had, want = getattr(record.calibration, key), getattr(calibration, key)
                if had != want:
                    diffs.append(f"calibration {key} {had!r} (requested {want!r})")
    return diffs


def prepare_artifact(checkpoint: Path, out: Path, export_options, force: bool = False, progress: bool = False,
                     log: Callable[[str], None] = print,
                     calibration: CalibrationRequest | None = None) -> tuple[Path, bool]:
    """Export `checkpoint` to `out`, or reuse `out` when its manifest matches the request and
    every file's sha256 verifies. Returns (artifact, exported)."""
    from export.checkpoint import Checkpoint
    from export.onnx_export import export_artifact, with_checkpoint_exclusions
    out = Path(out)
    if out.exists() and not force:
        if not (out / MANIFEST).is_file():
            raise ArtifactError(f"{out}: exists but is not a finished artifact (no {MANIFEST}); pass --force to "
                                "replace it or choose another --out")
        manifest = load_manifest(out, only=[])
        source = Checkpoint(checkpoint)
        diffs = artifact_differences(manifest, source.config,
                                     with_checkpoint_exclusions(export_options, source.quantization), calibration)
        if diffs:
            raise ArtifactError(f"{out}: an artifact from other export options is there ({'; '.join(diffs)}); "
                                "pass --force to re-export it or choose another --out")
        try:
            load_manifest(out, verify_hashes=True, only=_onnx_files(manifest))
        except ArtifactError as err:
            raise ArtifactError(f"{err} (or pass --force to re-export)") from None
        log(f"reusing {out}: its manifest matches the requested export options and every ONNX file's "
            "sha256 verifies (pass --force to re-export)")
        return out, False
    log(f"exporting {checkpoint} -> {out} (tp {export_options.tp} x pp {export_options.pp}, "
        f"{export_options.dtype}, {export_options.kv_cache} KV cache)")
    tokens, source = _calibration_tokens(Checkpoint(checkpoint), export_options, calibration)
    export_artifact(checkpoint, out, export_options, force=force, progress=progress,
                    calibration_tokens=tokens, calibration_source=source)
    return out, True


def _calibration_tokens(checkpoint, export_options, calibration: CalibrationRequest | None) -> tuple[Any, str]:
    if not export_options.quantization.needs_activation_scales or calibration is None:
        return None, ""
    from export.calibrate import checkpoint_calibration_tokens
    from export.rank_tensors import checkpoint_input_scales
    if checkpoint_input_scales(checkpoint):
        return None, ""  # a pre-quantized checkpoint carries its own input_scale tensors
    return checkpoint_calibration_tokens(checkpoint.directory, calibration.text, calibration.samples,
                                         calibration.seq_len)


def _onnx_files(manifest: Manifest) -> list[str]:
    """Files the export wrote (engines are verified separately, against their own metadata)."""
    engines = {e.engine_path for e in manifest.ranks}  # export/manifest.py owns the layout
    return [rel for rel in manifest.files if rel not in engines]


def build(*, checkpoint: Path | None = None, artifact: Path | None = None, out: Path | None = None,
          export_options=None, build_overrides: dict[str, Any] | None = None, stage: str = "engine",
          force: bool = False, progress: bool = False, log: Callable[[str], None] = print,
          calibration: CalibrationRequest | None = None, verify: bool = False) -> BuildResult:
    """Checkpoint or artifact -> artifact (+ engines). Raises EnginesNotBuilt after the ONNX
    stage when the chosen TensorRT flavour (or, for `tensorrt`, the GPU) is missing. An --artifact is
    hash-verified before engines are built from it, and first of all with verify=True.

    The caller's contract (the command line's flags guarantee it; ValueError otherwise): exactly
    one of checkpoint (with out) or artifact, stage "onnx" or "engine"."""
    if (checkpoint is None) == (artifact is None) or (checkpoint is not None and out is None):
        raise ValueError("build() needs checkpoint= and out=, or artifact=")
    if stage not in ("onnx", "engine"):
        raise ValueError(f"build(stage={stage!r}): onnx or engine")
    overrides = dict(build_overrides or {})
    trt_flavour(overrides.get("flavour") or "tensorrt")  # a bad --trt is refused before any export
    if checkpoint is not None:
        directory, exported = prepare_artifact(Path(checkpoint), Path(out), export_options, force, progress, log,
                                               calibration)
    else:
        directory, exported = Path(artifact), False
    result = BuildResult(directory, exported=exported, reused=not exported, stage="onnx")
    verified = artifact is None  # just exported, or reused after its hashes verified
    if artifact is not None and (verify or stage == "onnx"):
        _verify(directory, log)
        verified = True
    if stage == "onnx":
        return result
    manifest = load_manifest(directory, only=[])
    options = BuildOptions.for_artifact(manifest, **overrides)
    missing = preflight(options.flavour, manifest.quantization, manifest.tp, options.workers)
    if missing:
        raise EnginesNotBuilt(missing, directory, options.flavour, verified=verified)
    log(describe_flavour(options))
    if not verified:
        _verify(directory, log)  # here, not earlier: hashing a 405B artifact reads every byte
    result.engines = build_engines(directory, options, log=log)
    result.stage = "engine"
    return result


def _verify(directory: Path, log: Callable[[str], None]) -> None:
    load_manifest(directory, verify_hashes=True, only=_onnx_files(load_manifest(directory, only=[])))
    log(f"using {directory}: every ONNX file's sha256 verifies")


def describe(result: BuildResult) -> str:
    if result.engines is None:
        return f"ONNX artifact ready at {result.artifact} ({'exported' if result.exported else 'reused'})"
    section = EnginesSection.from_dict(result.engines, str(result.artifact / MANIFEST))
    ranks = section.ranks
    total = sum(m.size for m in ranks.values())
    title = trt_flavour(section.flavour).title
    where = f"for {', '.join(section.targets or [g.name for g in section.gpu])}"
    return (f"built {len(ranks)} engine(s) in {result.artifact} with {title} {section.version} {where}: "
            f"{total / 2**30:.2f} GiB")
