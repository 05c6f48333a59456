"""The PyTorch backend over an artifact's own weights (no checkpoint needed).

`llama405 parity --a ort --b torch` must compare two *runtimes* over the same numbers: the rank
modules of export/model.py are built on the meta device and filled with the initializers of
each rank{r}/model.onnx, read one tensor at a time from model.onnx.data (offset/length taken
from the initializer's external-data entry, so the ONNX file's weights are never all in memory).
A weight changed inside the artifact is therefore seen by *both* sides; catching that needs a
checkpoint-based reference (`TorchBackend` over `export.checkpoint.Checkpoint`).

TorchBackend only asks its weight source for `.config` and `.iter_rank_tensors(spec)`, so an
`ArtifactWeights` stands in for the Checkpoint and TorchBackend itself is reused unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from export.dtypes import COMPUTE_DTYPE_NAMES, dtype_of_onnx
from export.errors import ArtifactError, InputError
from export.manifest import Manifest, check_rank_identity, load_manifest
from export.model import ModelOptions, build_rank_module, rank_constants
from export.quantization import Unquantized
from export.rank_layout import shares_tied_head
from export.sharding import RankSpec, all_ranks
from runner.backends.options import TorchOptions
from runner.backends.torch import TorchBackend


_WEIGHT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN)


class ArtifactWeights:
    """Checkpoint-shaped view of an artifact: `config` and each rank's (name, tensor) pairs."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory = directory
        self.manifest = manifest
        self.config = manifest.config

    def iter_rank_tensors(self, spec: RankSpec) -> Iterator[tuple[str, torch.Tensor]]:
        onnx_path = self.directory / self.manifest.rank(spec.rank).onnx_path
        rank_dir = onnx_path.parent
        try:
            # Graph and initializer records only: the weight bytes stay in model.onnx.data.
            model = onnx.load(str(onnx_path), load_external_data=False)
        except (OSError, DecodeError) as err:
            raise ArtifactError(f"{onnx_path}: cannot read the rank graph ({err}); re-export the "
                                "artifact") from None
        check_rank_identity({p.key: p.value for p in model.metadata_props}, onnx_path, self.manifest,
                            self.manifest.rank(spec.rank))
        options = artifact_model_options(self.manifest)
        shapes = {name: tuple(t.shape) for name, t in build_rank_module(self.config, spec, options).state_dict().items()}
        # A tied head the graph shares is the embedding's initializer (export/sharding.py).
        shared = {"lm_head.weight"} if shares_tied_head(self.config, spec) else set()
        expected = set(shapes) - shared
        # Rank constants (RoPE tables, vocab start, hidden columns) come from the config;
        # build_rank_module computes them itself.
        derived = set(rank_constants(self.config, spec, torch.float32))
        found = {init.name for init in model.graph.initializer} - derived
        if found != expected:
            extra, missing = sorted(found - expected), sorted(expected - found)
            raise ArtifactError(f"{onnx_path}: initializers do not match rank {spec.rank} of the manifest's "
                                f"config (unexpected {extra[:3]}, missing {missing[:3]}); the artifact is "
                                "from another configuration or was edited — re-export it")
        for init in model.graph.initializer:
            if init.name not in derived and tuple(init.dims) != shapes[init.name]:
                raise ArtifactError(f"{onnx_path}: initializer {init.name} has shape {list(init.dims)}, rank "
                                    f"{spec.rank} of the manifest's config needs {list(shapes[init.name])}; the "
                                    "artifact is from another configuration or was edited — re-export it")
        data: dict[Path, np.memmap] = {}
        for init in model.graph.initializer:
            if init.name in derived:
                continue
            tensor = _read_initializer(init, rank_dir, onnx_path, data)
            yield init.name, tensor
            if init.name == "model.embed_tokens.weight" and shares_tied_head(self.config, spec):
                yield "lm_head.weight", tensor


def _read_initializer(init: TensorProto, rank_dir: Path, onnx_path: Path,
                      data: dict[Path, np.memmap]) -> torch.Tensor:
    if init.data_type not in _WEIGHT_TYPES:
        kind = TensorProto.DataType.Name(init.data_type)
        raise ArtifactError(f"{onnx_path}: initializer {init.name} is {kind}; the torch backend reads "
                            "float32/float16/bfloat16 artifacts (FP8 artifacts are compared with "
                            "--a ort --b trt, or against --reference CHECKPOINT at the compute dtype)")
    element = dtype_of_onnx(init.data_type)
    shape = tuple(init.dims)
    if init.data_location != TensorProto.EXTERNAL:
        if element.name == "bfloat16":
            raw = bytearray(init.raw_data)
            return torch.frombuffer(raw, dtype=element.torch).reshape(shape).clone()
        return torch.from_numpy(numpy_helper.to_array(init).copy())
    info = {entry.key: entry.value for entry in init.external_data}
    location = info.get("location", "")
    path = (rank_dir / location).resolve()
    if not location or path.parent != rank_dir.resolve() or not path.is_file():
        raise ArtifactError(f"{onnx_path}: initializer {init.name} points at external data "
                            f"{location!r}, which is not a file beside the graph; re-export the artifact")
    if path not in data:
        data[path] = np.memmap(path, dtype=np.uint8, mode="r")
    blob = data[path]
    itemsize = element.itemsize
    offset = int(info.get("offset", 0))
    length = int(info.get("length", int(np.prod(shape, dtype=np.int64)) * itemsize))
    if length != int(np.prod(shape, dtype=np.int64)) * itemsize or offset + length > blob.size:
        raise ArtifactError(f"{path}: initializer {init.name} {list(shape)} needs bytes "
                            f"[{offset}, {offset + length}) but the file has {blob.size}; the data "
                            "file was truncated or replaced — re-export the artifact")
    # One tensor copied out of the mapping; bytearray so torch owns writable memory.
    raw = bytearray(blob[offset:offset + length])
    return torch.frombuffer(raw, dtype=element.torch).reshape(shape)


def torch_backend_from_artifact(artifact: str | Path, verify_hashes: bool = False,
                                options: TorchOptions | None = None) -> TorchBackend:
    """TorchBackend with the artifact's layout (tp/pp/dtype/kv-cache/logits) and its weights."""
    directory = Path(artifact)
    manifest = load_manifest(directory, verify_hashes=verify_hashes)
    if manifest.dtype not in COMPUTE_DTYPE_NAMES:
        raise ArtifactError(f"{directory}: manifest dtype {manifest.dtype!r} is not one of "
                            f"{', '.join(COMPUTE_DTYPE_NAMES)}; re-export the artifact")
    held = {entry.rank for entry in manifest.ranks}
    missing = [s.rank for s in all_ranks(manifest.tp, manifest.pp) if s.rank not in held]
    if missing:
        raise ArtifactError(f"{directory}: ranks {missing} were not exported, and the torch backend runs "
                            "every rank in one process; export all ranks (omit --ranks)")
    return TorchBackend(ArtifactWeights(directory, manifest), tp=manifest.tp, pp=manifest.pp,
                        dtype=manifest.dtype, options=artifact_model_options(manifest), run=options)


def reference_backend(artifact: Path, reference: Path, options: TorchOptions | None = None) -> TorchBackend:
    """The checkpoint the artifact was exported from, unquantized, at the artifact's layout:
    parity's reference, so an FP8 artifact is measured against what it approximates."""
    from export.checkpoint import Checkpoint
    manifest = load_manifest(artifact)
    checkpoint = Checkpoint(reference)
    if checkpoint.config != manifest.config:
        raise InputError(f"checkpoint {reference}: its config.json describes another model than the "
                         f"artifact {artifact} was exported from (geometry, rope or vocab differ); compare "
                         "against the checkpoint the artifact came from")
    model = dataclasses.replace(artifact_model_options(manifest), quant=Unquantized())
    return TorchBackend(checkpoint, tp=manifest.tp, pp=manifest.pp, dtype=manifest.dtype, options=model, run=options)


def artifact_model_options(manifest: Manifest) -> ModelOptions:
    return manifest.options.model_options
