"""The manifest's "engines" section, typed: what `llama405 build` writes (engines/build.py) and the
TensorRT backend, the flavour checks, `inspect` and the build flow read back — one dataclass
written by `to_dict` and read by `from_dict` exactly, instead of hand-typed keys on one side and
`.get` lookups on the other (the pattern of `ExportOptions` in the manifest).

`gpu` has one shape: the GPUs (name, SM "major.minor") the engines were built and tuned on, a
list, absent for an ahead-of-time build (TensorRT-RTX, whose `targets` say where they run).
Sections written before this module (`gpu` a dict, or a list of [name, sm] pairs) still read:
that shape is unambiguous. A section missing any other field (an older format, or a hand edit)
is refused with "rebuild the engines": engines are rebuilt from the artifact without a re-export,
and guessing a field (which TensorRT, which flags, which profiles) could run wrong engines
silently.

Lives in export/ because runner/ reads it and must not import engines/.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from export.errors import ArtifactError

ENGINES_FORMAT = 2  # 2: flavour, version and targets recorded (1: TensorRT only)


@dataclasses.dataclass(frozen=True)
class BuildGpu:
    name: str
    sm: str  # "major.minor", as torch.cuda.get_device_capability gives it

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "sm": self.sm}


@dataclasses.dataclass(frozen=True)
class RankEngine:
    """One rank's engine file and how it was built."""

    file: str
    size: int
    sha256: str
    onnx_sha256: str | None  # the rank graph it was built from (None: its hash was not recorded)
    parse_s: float
    build_s: float
    seconds: float
    decomposable_attention: int  # attention layers marked decomposable for the builder
    profiles: tuple[dict[str, dict[str, list[int]]], ...] = ()  # per profile: input -> {min, opt, max}
    gpu: BuildGpu | None = None  # the GPU it was built on (TensorRT); None ahead of time

    def to_dict(self) -> dict[str, Any]:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("profiles", "gpu")}
        raw["profiles"] = [dict(p) for p in self.profiles]
        if self.gpu is not None:
            raw["gpu"] = self.gpu.to_dict()
        return raw

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> RankEngine:
        required = {f.name for f in dataclasses.fields(cls)} - {"gpu"}
        fields = _exact(raw, required, {"gpu"}, source)
        gpu = _gpus(raw.get("gpu"), source) if "gpu" in raw else ()
        fields.update(profiles=tuple(raw["profiles"]), gpu=gpu[0] if gpu else None)
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class EnginesSection:
    """What every engine of one build shares (the header), the engines by rank, and the GPUs."""

    format: int
    flavour: str  # export/trt_flavours.py name
    version: str
    targets: tuple[str, ...]  # ahead-of-time compute capabilities (TensorRT-RTX); () for TensorRT
    flags: tuple[str, ...]  # TensorRT BuilderFlag names
    builder_optimization_level: int
    workspace_bytes: int | None
    max_batch: int
    max_input_len: int
    max_seq_len: int
    opt_batch: int
    opt_input_len: int
    ranks: dict[int, RankEngine] = dataclasses.field(default_factory=dict)
    gpu: tuple[BuildGpu, ...] = ()

    HEADER = ("format", "flavour", "version", "targets", "flags", "builder_optimization_level", "workspace_bytes",
              "max_batch", "max_input_len", "max_seq_len", "opt_batch", "opt_input_len")

    def header(self) -> dict[str, Any]:
        """The fields a later build of other ranks must share to join this section."""
        return {k: getattr(self, k) for k in self.HEADER}

    def with_ranks(self, ranks: dict[int, RankEngine], record_gpus: bool) -> EnginesSection:
        """This header with `ranks`; record_gpus (a build tuned on its GPU): `gpu` = their GPUs."""
        gpus = tuple(sorted({m.gpu for m in ranks.values() if m.gpu is not None}, key=lambda g: (g.name, g.sm)))
        return dataclasses.replace(self, ranks=dict(sorted(ranks.items())), gpu=gpus if record_gpus else ())

    @property
    def engine_files(self) -> set[str]:
        return {m.file for m in self.ranks.values()}

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = self.header()
        raw["targets"], raw["flags"] = list(self.targets), list(self.flags)
        raw["ranks"] = {str(r): m.to_dict() for r, m in self.ranks.items()}
        if self.gpu:
            raw["gpu"] = [g.to_dict() for g in self.gpu]
        return raw

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> EnginesSection:
        fields = _exact(raw, set(cls.HEADER) | {"ranks"}, {"gpu"}, source)
        if raw["format"] != ENGINES_FORMAT:
            raise ArtifactError(f"{source}: engines section format {raw['format']!r}, this llama405 reads "
                                f"{ENGINES_FORMAT}; {_REBUILD}")
        ranks = raw["ranks"]
        if not isinstance(ranks, dict) or not all(isinstance(r, str) and r.isdigit() for r in ranks):
            raise ArtifactError(f"{source}: engines.ranks must map rank numbers to engines; {_REBUILD}")
        fields.update(targets=tuple(raw["targets"]), flags=tuple(raw["flags"]),
                      ranks={int(r): RankEngine.from_dict(m, f"{source}: engines.ranks.{r}") for r, m in ranks.items()},
                      gpu=_gpus(raw.get("gpu"), source) if "gpu" in raw else ())
        return cls(**fields)


_REBUILD = "rebuild the engines with `llama405 build --artifact ART`"


def _exact(raw: Any, required: set[str], optional: set[str], source: str) -> dict[str, Any]:
    """raw's required fields (all present, nothing unknown), optional ones left to the caller."""
    if not isinstance(raw, dict) or not required <= set(raw) or not set(raw) <= required | optional:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ArtifactError(f"{source}: engines record must hold {sorted(required)} (and optionally "
                            f"{sorted(optional)}), got {got}; {_REBUILD}")
    return {k: raw[k] for k in required}


def _gpus(raw: Any, source: str) -> tuple[BuildGpu, ...]:
    """The one shape from any shape a manifest holds: {name, sm}, [{name, sm}, ...] or [[name, sm], ...]."""
    items = [raw] if isinstance(raw, dict) else raw
    gpus = []
    for item in items if isinstance(items, list) else [None]:
        if isinstance(item, dict) and set(item) == {"name", "sm"}:
            gpus.append(BuildGpu(str(item["name"]), str(item["sm"])))
        elif isinstance(item, list) and len(item) == 2:
            gpus.append(BuildGpu(str(item[0]), str(item[1])))
        else:
            raise ArtifactError(f"{source}: engines gpu {raw!r} is not a list of {{name, sm}}; {_REBUILD}")
    return tuple(gpus)


def engines_section(manifest, source: str = "manifest.json") -> EnginesSection | None:
    """The artifact's engines, typed; None when none were built."""
    raw = manifest.extra.get("engines")
    return None if not raw else EnginesSection.from_dict(raw, source)
