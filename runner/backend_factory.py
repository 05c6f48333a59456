"""Opening a Backend (runner/backends/base.py): the one factory of `generate`, `logits` and
`parity`, and the one place that knows torchrun.

  ort    an artifact's rank graphs in onnxruntime
  torch  the eager PyTorch model over an artifact's own weights; over a checkpoint at a layout
         of your choosing; or, as parity's reference, over a checkpoint at the artifact's layout
  trt    an artifact's TensorRT engines (rank{r}/engine.plan), with the runtime of the flavour
         that built them, on a GPU

Launched by torchrun, an ort or trt backend serves this process's rank (runner/dist.py:
ProcessWorld); everywhere else one process runs every rank.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from runner.backends.base import Backend

BACKEND_KINDS = ("ort", "torch", "trt")


def open_backend(kind: str, artifact: Path | None = None, *, checkpoint: Path | None = None,
                 layout: dict[str, Any] | None = None, reference: Path | None = None,
                 ort_threads=None) -> Backend:
    """The `kind` backend over `artifact`, or (kind "torch" only) over `checkpoint`.

    layout: with a checkpoint, TorchBackend's layout keywords (tp, pp, dtype, options: a
    ModelOptions); an artifact carries its own.
    reference: with an artifact and kind "torch", load that checkpoint (the one the artifact was
    exported from) at the artifact's layout instead of the artifact's weights.
    ort_threads: runner.backends.ort.OrtThreads for the ort backend (default: its own).
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; one of {', '.join(BACKEND_KINDS)}")
    if (artifact is None) == (checkpoint is None):
        raise ValueError("open_backend needs exactly one of artifact= or checkpoint=")
    if checkpoint is not None:
        if kind != "torch":
            raise ValueError(f"a checkpoint runs in the torch backend only, not {kind}")
        from export.checkpoint import Checkpoint
        from runner.backends.torch import TorchBackend
        return TorchBackend(Checkpoint(Path(checkpoint)), **(layout or {}))
    artifact = Path(artifact)
    if kind == "torch":
        if reference is not None:
            return _reference_backend(artifact, Path(reference))
        from runner.backends.torch_artifact import torch_backend_from_artifact
        return torch_backend_from_artifact(artifact)
    world = _process_world(artifact)
    if kind == "ort":
        from runner.backends.ort import OrtBackend, OrtThreads
        return OrtBackend(artifact, world=world, threads=ort_threads or OrtThreads())
    from runner.backends.trt import TrtBackend
    return TrtBackend(artifact, world=world)


def _process_world(artifact: Path):
    """This process's place among the ranks under torchrun; None in a single-process run."""
    from runner.dist import ProcessWorld, launched_by_torchrun
    if not launched_by_torchrun():
        return None
    from export.manifest import load_manifest
    manifest = load_manifest(artifact, only=[])
    return ProcessWorld(manifest.tp, manifest.pp)


def _reference_backend(artifact: Path, reference: Path) -> Backend:
    from export.checkpoint import Checkpoint
    from export.errors import InputError
    from export.manifest import load_manifest
    from runner.backends.torch import TorchBackend
    from runner.backends.torch_artifact import artifact_model_options
    manifest = load_manifest(artifact)
    checkpoint = Checkpoint(reference)
    if checkpoint.config != manifest.config:
        raise InputError(f"checkpoint {reference}: its config.json describes another model than the "
                         f"artifact {artifact} was exported from (geometry, rope or vocab differ); compare "
                         "against the checkpoint the artifact came from")
    # The reference is the checkpoint's own (unquantized) model at the artifact's layout, so an
    # FP8 artifact is measured against what it approximates.
    options = dataclasses.replace(artifact_model_options(manifest), quant=None)
    return TorchBackend(checkpoint, tp=manifest.tp, pp=manifest.pp, dtype=manifest.dtype, options=options)
