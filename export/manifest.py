"""manifest.json: what an artifact directory holds and how to check it is intact.

Sizes are checked on every load (cheap: catches truncation and swapped files); sha256 on request
(reads every byte). Written with sorted keys and no timestamps, so two exports of the same
inputs are byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from export.config import LlamaConfig
from export.errors import ArtifactError, ConfigError, naming
from export.kv_cache import LOCKSTEP, PER_SEQUENCE, KVCacheLayout
from export.options import ExportOptions

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"  # rank{r}/model.onnx: the rank graph
DATA_FILE = "model.onnx.data"  # rank{r}/model.onnx.data: its weights (external data)
ENGINE_FILE = "engine.plan"  # rank{r}/engine.plan, written by `llama405 build`


def rank_folder(rank: int) -> str:
    """The artifact's folder of one rank, relative to the artifact."""
    return f"rank{rank}"
FORMAT = "llama405-artifact"
FORMAT_VERSION = 2  # 2: the export options as one object ("options")
# Where the rank graphs write each row's step (export/kv_cache.py: per_sequence or lockstep).
# Recorded since per-sequence slots; an artifact without it (older ones on users' disks) writes
# every row in lockstep, so a runner that batches rows at different lengths refuses it.
CACHE_WRITES = "kv_cache_writes"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Any, ...]  # ints, or strings naming symbolic dims ("batch", "seq", ...)


@dataclasses.dataclass(frozen=True)
class RankEntry:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: tuple[int, int]  # [first, stop)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    collectives: int

    @property
    def dir(self) -> str:
        return rank_folder(self.rank)

    @property
    def onnx_path(self) -> str:
        return f"{self.dir}/{ONNX_FILE}"

    @property
    def data_path(self) -> str:
        return f"{self.dir}/{DATA_FILE}"

    @property
    def engine_path(self) -> str:
        return f"{self.dir}/{ENGINE_FILE}"


@dataclasses.dataclass(frozen=True)
class Manifest:
    config: LlamaConfig
    options: ExportOptions  # exactly what the artifact was exported with (FP8 exclusions resolved)
    opset: int
    ranks: tuple[RankEntry, ...]
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "size"}
    source: dict[str, Any]
    toolchain: dict[str, str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # The layout facts every reader asks for, read from the one options object.
    tp = property(lambda self: self.options.tp)
    pp = property(lambda self: self.options.pp)
    dtype = property(lambda self: self.options.dtype)
    quant = property(lambda self: self.options.quant)
    quantization = property(lambda self: self.options.quantization)
    kv_cache = property(lambda self: self.options.kv_cache)
    max_batch = property(lambda self: self.options.max_batch)
    max_seq_len = property(lambda self: self.options.max_seq_len)
    logits = property(lambda self: self.options.logits)

    @property
    def cache_layout(self) -> KVCacheLayout:
        return self.options.cache_layout

    @property
    def cache_writes(self) -> str:
        """PER_SEQUENCE or LOCKSTEP (export/kv_cache.py): what the graphs were exported with."""
        return self.extra.get(CACHE_WRITES, LOCKSTEP)

    def require_per_sequence_writes(self, directory: str | Path, what: str, otherwise: str = "") -> None:
        """Refuse an artifact whose graphs write every row at the same slot, for `what` (e.g.
        "continuous batching"), which needs rows at their own lengths; `otherwise`: what the
        user can run this artifact with instead (appended to the fix)."""
        if self.cache_writes != PER_SEQUENCE:
            why = ("a concat KV cache appends every row's step at the same slot" if self.cache_layout.writes == LOCKSTEP
                   else "it was exported before per-sequence cache slots: every row writes at the same slot")
            raise ArtifactError(f"{directory}: {what} needs each row to write its own cache slot, but its manifest "
                                f"records {CACHE_WRITES}={self.cache_writes!r} ({why}); re-export with --kv-cache "
                                f"static using this llama405{otherwise and ', or ' + otherwise}")

    def rank(self, rank: int) -> RankEntry:
        for entry in self.ranks:
            if entry.rank == rank:
                return entry
        have = ", ".join(str(e.rank) for e in self.ranks)
        raise ArtifactError(f"artifact has no rank {rank} (it holds ranks {have}); export it with "
                            f"`llama405 export ... --ranks {rank}`")

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["config"] = self.config.to_hf_dict()
        raw["options"] = self.options.to_dict()
        extra = raw.pop("extra")
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **raw, **extra}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{source}: not valid JSON ({err}); re-export the artifact") from None
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: not a manifest (a JSON {type(raw).__name__}); re-export the artifact")
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{source}: not a {FORMAT} v{FORMAT_VERSION} manifest "
                                f"(format={raw.get('format')!r}, version={raw.get('format_version')!r}); "
                                "re-export with this llama405")
        check_schema(raw, source)
        try:
            config = LlamaConfig.from_hf_dict(raw["config"], source=source)
            ranks = tuple(
                RankEntry(rank=r["rank"], tp_rank=r["tp_rank"], pp_rank=r["pp_rank"],
                          layers=tuple(r["layers"]),
                          inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in r["inputs"]),
                          outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in r["outputs"]),
                          collectives=r["collectives"])
                for r in raw["ranks"])
            known = {f.name for f in dataclasses.fields(cls)}
            extra = {k: v for k, v in raw.items() if k not in known | {"format", "format_version"}}
            return cls(config=config, options=ExportOptions.from_dict(raw["options"], source), opset=raw["opset"],
                       ranks=ranks, files=raw["files"], source=raw["source"], toolchain=raw["toolchain"], extra=extra)
        except (KeyError, TypeError, ConfigError) as err:
            raise ArtifactError(f"{source}: malformed manifest ({err!r}); re-export the artifact") from None


# Files a reader opens by name in the artifact folder besides the rank files: present, they must be
# listed (else an edited one would pass every size and sha256 check).
READ_BY_NAME = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                "genai_config.json")
# model.onnx metadata_props: which rank of which layout the graph is (two swapped rank graphs of
# the same shapes would otherwise run, with each other's vocab slice and columns).
RANK_PROPS = ("llama405.rank", "llama405.tp_rank", "llama405.tp", "llama405.pp_rank", "llama405.pp")


def rank_identity(entry: RankEntry, tp: int, pp: int) -> dict[str, str]:
    """The metadata_props export writes into a rank's model.onnx."""
    return dict(zip(RANK_PROPS, map(str, (entry.rank, entry.tp_rank, tp, entry.pp_rank, pp))))


def check_rank_identity(props: dict[str, str], path: Path, manifest: Manifest, entry: RankEntry) -> None:
    """Refuse a rank graph whose metadata_props say it is another rank (or another layout) than
    the manifest's entry that points at it. Reading them costs a parse of the graph without its
    weights, which every reader of the graph does anyway."""
    want = rank_identity(entry, manifest.tp, manifest.pp)
    have = {key: props.get(key) for key in RANK_PROPS}
    if have == want:
        return
    if all(v is None for v in have.values()):
        raise ArtifactError(f"{path}: the graph does not record which rank it is (exported by an older llama405, "
                            "or replaced); re-export the artifact")
    raise ArtifactError(f"{path}: the graph is rank {have['llama405.rank']} (tp {have['llama405.tp_rank']}/"
                        f"{have['llama405.tp']}, pp {have['llama405.pp_rank']}/{have['llama405.pp']}) but the "
                        f"manifest's {entry.onnx_path} is rank {entry.rank} (tp {entry.tp_rank}/{manifest.tp}, pp "
                        f"{entry.pp_rank}/{manifest.pp}); rank files were swapped or copied — re-export the artifact")


def read_rank_identity(path: Path) -> dict[str, str]:
    """A rank graph's metadata_props, reading the graph without its external data."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as err:
        raise ArtifactError(f"{path}: cannot read the rank graph ({err}); re-export the artifact") from None
    return {prop.key: prop.value for prop in model.metadata_props}


def check_complete(manifest: Manifest, directory: Path, source: str) -> None:
    """Every file the layout needs is listed: each rank's graph and data, each recorded engine, and
    any file a reader opens by name. A deleted entry would otherwise hide an altered file from
    every size and sha256 check."""
    needed = [rel for e in manifest.ranks for rel in (e.onnx_path, e.data_path)]
    engines = manifest.extra.get("engines")
    if isinstance(engines, dict) and isinstance(engines.get("ranks"), dict):
        needed += [m["file"] for m in engines["ranks"].values() if isinstance(m, dict) and isinstance(m.get("file"), str)]
    needed += [name for name in READ_BY_NAME if (directory / name).exists()]
    for rel in needed:
        if rel not in manifest.files:
            raise ArtifactError(f"{source}: {rel} is part of the artifact but has no entry in the manifest's files "
                                "(the manifest was edited); re-export the artifact")


def check_schema(raw: dict[str, Any], source: str) -> None:
    """Checked before anything reads the manifest, so an edited field is one line naming it, not a
    failure deep inside ONNX Runtime."""
    def bad(field: str, value: Any, want: str) -> ArtifactError:
        return ArtifactError(f"{source}: {field}={value!r} must be {want}; the manifest was edited or damaged — "
                             "re-export the artifact")
    try:
        ExportOptions.from_dict(raw.get("options"), source)  # names, types and choices of every option
    except ConfigError as err:
        raise ArtifactError(f"{err}; the manifest was edited or damaged — re-export the artifact") from None
    if CACHE_WRITES in raw and raw[CACHE_WRITES] not in (PER_SEQUENCE, LOCKSTEP):
        raise bad(CACHE_WRITES, raw[CACHE_WRITES], f"{PER_SEQUENCE!r} or {LOCKSTEP!r}")
    opset = raw.get("opset")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
        raise bad("opset", opset, "a positive integer")
    for field in ("config", "files", "source", "toolchain"):
        if not isinstance(raw.get(field), dict):
            raise bad(field, raw.get(field), "a JSON object")
    if not isinstance(raw.get("ranks"), list) or not raw["ranks"] or not all(isinstance(r, dict) for r in raw["ranks"]):
        raise bad("ranks", raw.get("ranks"), "a non-empty list of rank entries")
    for r in raw["ranks"]:
        for field in ("rank", "tp_rank", "pp_rank", "collectives"):
            if isinstance(r.get(field), bool) or not isinstance(r.get(field), int) or r[field] < 0:
                raise bad(f"ranks[].{field}", r.get(field), "a non-negative integer")
    for rel, entry in raw["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
                and not isinstance(entry.get("size"), bool) and entry["size"] >= 0) or ".." in Path(rel).parts \
                or Path(rel).is_absolute():
            raise bad(f"files[{rel!r}]", entry, "{sha256, size} of a file inside the artifact")


def options_digest(manifest: Manifest) -> str:
    """Fingerprint of everything that shaped the rank graphs besides the config: the export
    options, the opset and each rank's place and layers."""
    shaping = {"options": manifest.options.to_dict(), "opset": manifest.opset,
               "ranks": [[e.rank, e.tp_rank, e.pp_rank, list(e.layers), e.collectives] for e in manifest.ranks]}
    if CACHE_WRITES in manifest.extra:  # older artifacts' fingerprints stay what they were
        shaping[CACHE_WRITES] = manifest.extra[CACHE_WRITES]
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def is_finished_artifact(directory: Path) -> bool:
    """Does directory hold a finished llama405 artifact (its manifest names our format)?"""
    try:
        raw = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def artifact_files(directory: Path) -> set[str]:
    """The files llama405 wrote in a finished artifact: the manifest and every file it lists
    (what `export --force` replaces; anything else there stays)."""
    raw = json.loads((Path(directory) / MANIFEST).read_text())
    files = raw.get("files") if isinstance(raw, dict) else None
    return {MANIFEST, *(files if isinstance(files, dict) else {})}


def config_digest(config: LlamaConfig) -> str:
    """Fingerprint of the model geometry the rank graphs were traced for."""
    return hashlib.sha256(json.dumps(config.to_hf_dict(), sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, sha256: str | None = None) -> dict[str, Any]:
    return {"sha256": sha256 or sha256_file(path), "size": path.stat().st_size}


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    with naming(tmp):
        tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
    return path


def load_manifest(directory: str | Path, verify_hashes: bool = False,
                  only: list[str] | None = None) -> Manifest:
    """Read and check an artifact: every listed file present with its recorded size (and hash).

    `only` limits the checks to some files (a process serving rank 3 need not read rank 5).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        what = "is a file, not an artifact folder" if directory.exists() else "no such folder"
        raise ArtifactError(f"{directory}: {what}; pass the folder `llama405 export --out` wrote")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a folder, not the artifact's manifest file; re-export the artifact")
    if not path.is_file():
        partial = sorted(directory.parent.glob(f".{directory.name}.tmp-*")) if directory.parent.is_dir() else []
        hint = f" (an unfinished export was left in {partial[0]})" if partial else ""
        raise ArtifactError(f"{path}: no manifest{hint}; this is not a finished artifact — run "
                            "`llama405 export` again")
    manifest = Manifest.from_json(path.read_text(), str(path))
    if manifest.source.get("config_sha256") != config_digest(manifest.config):
        raise ArtifactError(f"{path}: the config recorded in the manifest does not match the one the rank "
                            "graphs were exported for (the manifest was edited or comes from another "
                            "export); re-export the artifact")
    if manifest.source.get("options_sha256") != options_digest(manifest):
        raise ArtifactError(f"{path}: tp/pp, dtype, quant, kv-cache, max-batch, max-seq-len, logits or the rank "
                            "list differ from what the rank graphs were exported with (the manifest was edited); "
                            "re-export the artifact")
    check_complete(manifest, directory, str(path))
    for rel, entry in manifest.files.items():
        if only is not None and rel not in only:
            continue
        file = directory / rel
        if not file.is_file():
            what = "is a folder, not a file" if file.is_dir() else "missing"
            raise ArtifactError(f"{file}: listed in the manifest but {what}; re-export the artifact "
                                "or copy the file back")
        size = file.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(f"{file}: {size} bytes but the manifest records {entry['size']}; "
                                "the file was truncated or replaced — re-export the artifact")
        if verify_hashes and sha256_file(file) != entry["sha256"]:
            raise ArtifactError(f"{file}: sha256 differs from the manifest; the file was modified — "
                                "re-export the artifact")
    if verify_hashes:  # every byte was just read: the graphs' rank identity is cheap beside it
        for entry in manifest.ranks:
            if only is None or entry.onnx_path in only:
                check_rank_identity(read_rank_identity(directory / entry.onnx_path), directory / entry.onnx_path,
                                    manifest, entry)
    return manifest
