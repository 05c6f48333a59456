"""The backends a command can open (Polygraphy's runner registry): each kind with its flag
groups and its options type, and `open_backend`, the one way `generate`, `logits` and `parity`
open a Backend (runner/backends/base.py) — torchrun included.

  ort    an artifact's rank graphs in onnxruntime, on the CPU or CUDA
  torch  the eager PyTorch model over an artifact's own weights; over a checkpoint at a layout
         of your choosing; or, as parity's reference, over a checkpoint at the artifact's layout
  trt    an artifact's TensorRT engines (rank{r}/engine.plan), with the runtime of the flavour
         that built them, on a GPU

Launched by torchrun, an ort or trt backend serves this process's rank (runner/dist.py:
ProcessWorld); everywhere else one process runs every rank. Backend modules are imported when a
kind is opened, so building the command line loads neither onnxruntime nor TensorRT.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from export.errors import InputError
from runner.backends.base import Backend
from runner.backends.options import (DeviceFlags, FlagGroup, OrtFlags, OrtOptions, TorchOptions, TrtFlags,
                                     TrtOptions)
from runner.device import Device


@dataclasses.dataclass(frozen=True)
class BackendKind:
    name: str
    summary: str
    groups: tuple[FlagGroup, ...]  # its own flag groups (DEVICE_FLAGS is every kind's)
    options_type: type
    open: Callable[[Path, Any, Any], Backend]  # (artifact, options, world or None)
    one_rank_per_process: bool  # under torchrun each process serves its own rank
    cuda_only: bool = False

    def options(self, args: argparse.Namespace, device: Device | None) -> Any:
        """This kind's options from the parsed flags; `device` is the side's --device."""
        fields = {"device": device, **DEVICE_FLAGS.tf32_for(args, device, self.options_type)}
        for group in self.groups:
            fields.update(group.parse(args))
        return self.options_type(**fields)


def _open_ort(artifact: Path, options: OrtOptions, world) -> Backend:
    from runner.backends.ort import OrtBackend
    return OrtBackend(artifact, options=options, world=world)


def _open_torch(artifact: Path, options: TorchOptions, world) -> Backend:
    from runner.backends.torch_artifact import torch_backend_from_artifact
    return torch_backend_from_artifact(artifact, options=options)


def _open_trt(artifact: Path, options: TrtOptions, world) -> Backend:
    from runner.backends.trt import TrtBackend
    return TrtBackend(artifact, options=options, world=world)


DEVICE_FLAGS = DeviceFlags()
REGISTRY: dict[str, BackendKind] = {kind.name: kind for kind in (
    BackendKind("ort", "onnxruntime over the artifact's rank graphs", (OrtFlags(),), OrtOptions, _open_ort, True),
    BackendKind("torch", "eager PyTorch over the artifact's (or a checkpoint's) weights", (), TorchOptions,
                _open_torch, False),
    BackendKind("trt", "TensorRT engines built from the artifact", (TrtFlags(),), TrtOptions, _open_trt, True,
                cuda_only=True),
)}
BACKEND_KINDS = tuple(REGISTRY)


def kind(name: str) -> BackendKind:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"backend {name!r}: choose one of {', '.join(BACKEND_KINDS)}") from None


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    """--device/--tf32 and every kind's own flags, each once."""
    for group in _all_groups():
        group.add_flags(parser)


def refuse_other_backends_flags(args: argparse.Namespace, kinds: Iterable[str]) -> None:
    """A flag of a backend the command does not run cannot take effect: refuse it, naming it."""
    chosen = {group for name in kinds for group in kind(name).groups}
    for name, entry in REGISTRY.items():
        for group in entry.groups:
            given = group.given(args) if group not in chosen else []
            if given:
                raise InputError(f"{given[0]} applies to --backend {name}, which this command does not run; drop it")


def backend_options(args: argparse.Namespace, sides: Iterable[tuple[str, Device | None]]) -> list[Any]:
    """Each (kind, device) side's options from a command's flags, after refusing every flag that
    cannot take effect: another backend's, or --tf32 where no side runs float32 matmuls on CUDA."""
    sides = list(sides)
    refuse_other_backends_flags(args, [name for name, _ in sides])
    options = [kind(name).options(args, device) for name, device in sides]
    if args.tf32 and not any(getattr(o, "tf32", False) for o in options):
        raise InputError("--tf32 changes float32 matmuls on CUDA (ort, torch); no backend of this command runs "
                         "there: add --device cuda[:N] or drop --tf32")
    return options


def _all_groups() -> list[FlagGroup]:
    return [DEVICE_FLAGS] + [group for entry in REGISTRY.values() for group in entry.groups]


def open_backend(name: str, artifact: Path | None = None, *, checkpoint: Path | None = None,
                 layout: dict[str, Any] | None = None, reference: Path | None = None, options: Any = None) -> Backend:
    """The `name` backend over `artifact`, or (torch only) over `checkpoint`.

    options: the kind's options (OrtOptions, TorchOptions, TrtOptions; default: its defaults).
    layout: with a checkpoint, TorchBackend's layout keywords (tp, pp, dtype, options: a
    ModelOptions); an artifact carries its own.
    reference: with an artifact and kind torch, load that checkpoint (the one the artifact was
    exported from) at the artifact's layout instead of the artifact's weights.
    """
    entry = kind(name)
    options = options if options is not None else entry.options_type()
    if not isinstance(options, entry.options_type):
        raise ValueError(f"the {name} backend takes {entry.options_type.__name__}, not {type(options).__name__}")
    if (artifact is None) == (checkpoint is None):
        raise ValueError("open_backend needs exactly one of artifact= or checkpoint=")
    if checkpoint is not None or reference is not None:
        if name != "torch":
            raise InputError(f"a checkpoint runs in the torch backend only, not {name}")
        from runner.backends.torch import TorchBackend
        from runner.backends.torch_artifact import reference_backend
        if checkpoint is not None:
            from export.checkpoint import Checkpoint
            return TorchBackend(Checkpoint(Path(checkpoint)), **(layout or {}), run=options)
        return reference_backend(Path(artifact), Path(reference), options)
    artifact = Path(artifact)
    cuda = entry.cuda_only or (options.device is not None and options.device.is_cuda)
    world = _process_world(artifact, cuda) if entry.one_rank_per_process else None
    return entry.open(artifact, options, world)


def _process_world(artifact: Path, cuda: bool):
    """This process's place among the ranks under torchrun; None in a single-process run."""
    from runner.dist import ProcessWorld, launched_by_torchrun
    if not launched_by_torchrun():
        return None
    from export.manifest import load_manifest
    manifest = load_manifest(artifact, only=[])
    return ProcessWorld(manifest.tp, manifest.pp, cuda=cuda)
