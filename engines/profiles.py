"""Engine build options and TensorRT optimization profiles, as pure functions (no TensorRT here).

A rank graph's inputs have symbolic dims (batch, seq, past_seq and sums of them, named by the
exporter); a profile gives each input a (min, opt, max) shape, from max-batch / max-input-len /
max-seq-len. Static-cache graphs need one profile; concat-cache graphs a context and a decode
profile, each self-consistent (attention_mask = past + seq).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from pathlib import Path

from export.errors import ArtifactError, InputError
from export.kv_cache import KVCacheLayout
from export.manifest import Manifest, RankEntry
from export.trt_flavours import flavour as trt_flavour


# -- options ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 8
    max_input_len: int = 2048  # largest tokens per step (prefill chunk); the runner chunks longer prompts
    max_seq_len: int = 4096
    opt_batch: int | None = None  # None: max_batch
    opt_input_len: int = 1  # decode steps dominate generation time
    optimization_level: int = 3
    workspace_bytes: int | None = None
    weight_streaming: bool = False
    strip_plan: bool = False
    workers: int = 1
    timing_cache: Path | None = None  # None: ART/timing.cache
    ranks: tuple[int, ...] | None = None  # None: every rank of the artifact
    flavour: str = "tensorrt"  # export/trt_flavours.py: "tensorrt" (GPU build) or "rtx" (ahead of time)
    targets: tuple[str, ...] = ()  # rtx: compute capabilities ("sm89"); resolved by for_artifact

    @property
    def batch_opt(self) -> int:
        return self.opt_batch if self.opt_batch is not None else self.max_batch

    def validate(self) -> None:
        for name in ("max_batch", "max_input_len", "max_seq_len", "opt_input_len", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if not 1 <= self.batch_opt <= self.max_batch:
            raise InputError(f"--opt-batch {self.batch_opt} must be between 1 and --max-batch {self.max_batch}")
        if self.max_input_len > self.max_seq_len:
            raise InputError(f"--max-input-len {self.max_input_len} exceeds --max-seq-len {self.max_seq_len}")
        if self.opt_input_len > self.max_input_len:
            raise InputError(f"--opt-input-len {self.opt_input_len} exceeds --max-input-len {self.max_input_len}")
        if not 0 <= self.optimization_level <= 5:
            raise InputError(f"--builder-opt-level {self.optimization_level} must be 0..5")
        if self.workspace_bytes is not None and self.workspace_bytes < 1:
            raise InputError(f"workspace_bytes={self.workspace_bytes} must be a positive size")
        chosen = trt_flavour(self.flavour)
        if chosen.targets and not self.targets:
            raise InputError(f"--trt {self.flavour} needs at least one --target ({', '.join(chosen.targets)})")
        if self.strip_plan and chosen.builds_without_gpu:
            # Measured with TensorRT-RTX 1.7 on a CPU machine: "MyelinCheckException: graph_jit.cpp:278:
            # CHECK(status == CUDA_SUCCESS) failed" (docs/engines.md).
            raise InputError(f"--strip-plan: {chosen.title} cannot strip weights from an ahead-of-time build "
                             "(its Myelin backend needs CUDA for that); drop --strip-plan")

    @classmethod
    def for_artifact(cls, manifest: Manifest, target: str | None = None, **given: Any) -> BuildOptions:
        """Options for an artifact: the manifest's max_batch / max_seq_len unless given; the
        static cache's length is fixed in the graph, so a different max_seq_len is refused.
        target: the --target text (rtx), resolved against the artifact's quantization."""
        given = {k: v for k, v in given.items() if v is not None}
        given["targets"] = trt_flavour(given.get("flavour", "tensorrt")).resolve_targets(target, manifest.quantization)
        seq = given.setdefault("max_seq_len", manifest.max_seq_len)
        if manifest.cache_layout.past_dim_name is None and seq != manifest.max_seq_len:  # length fixed in the graph
            raise InputError(f"--max-seq-len {seq}: the artifact's static KV cache holds {manifest.max_seq_len} "
                             "slots (fixed in the graph); re-export with that --max-seq-len or omit the flag")
        if seq > manifest.max_seq_len:
            raise InputError(f"--max-seq-len {seq} exceeds the artifact's {manifest.max_seq_len}")
        given.setdefault("max_batch", manifest.max_batch)
        given.setdefault("max_input_len", min(2048, seq))
        options = cls(**given)
        options.validate()
        return options


def parse_size(text: str) -> int:
    """'16GiB', '512MiB', '2G', '1000000' -> bytes (binary units for K/M/G/T with or without 'iB')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise InputError(f"{text!r}: expected a size like 16GiB, 512MiB or a byte count")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match[2].upper()]
    return int(float(match[1]) * scale)


# -- optimization profiles (pure) ------------------------------------------------------------

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def _dim_value(dim: Any, values: dict[str, int], tensor: str) -> int:
    if isinstance(dim, int):
        return dim
    total = 0
    for term in str(dim).split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in values:
            total += values[term]
        else:
            raise ArtifactError(f"input {tensor!r} has a dimension {dim!r} that llama405 does not know how to "
                                "bound (expected batch, seq, past_seq, total_seq or sums of them); re-export the artifact")
    return total


def optimization_profiles(entry: RankEntry, cache: KVCacheLayout, max_seq_len: int,
                          options: BuildOptions) -> list[Profile]:
    """{input: (min, opt, max)} for every input with a symbolic dimension, per profile; the
    cache layout says which dims its graph has and how they relate (export/kv_cache.py)."""
    profiles = []
    batch = (1, options.batch_opt, options.max_batch)
    seq = (1, options.opt_input_len, options.max_input_len)
    for points in cache.profile_points(batch, seq, max_seq_len):
        profile: Profile = {}
        for spec in entry.inputs:
            if all(isinstance(d, int) for d in spec.shape):
                continue  # static input: no profile entry needed
            profile[spec.name] = tuple(tuple(_dim_value(d, p, spec.name) for d in spec.shape)  # type: ignore
                                       for p in points)
        profiles.append(profile)
    return profiles


def profile_shapes(entry: RankEntry, cache: KVCacheLayout, max_seq_len: int, options: BuildOptions) -> Profile:
    """The first (for static artifacts: the only) optimization profile."""
    return optimization_profiles(entry, cache, max_seq_len, options)[0]
