"""Outputs that would overwrite inputs: every path a command writes (`--out`, `--report`,
`--timing-cache`) checked against every path it reads, once, before anything is written.

One rule for every command (runner/cli.py and engines/cli.py call `refuse_outputs_over_inputs`
before the command runs; export/output_dir.py's `check_replaceable` calls `refuse_overlap` for
callers of the Python API): an output may not be, contain or lie inside a path the command reads.
Paths are compared resolved (symlinks, `..`, relative paths) and, for files that exist, by
device and inode (a hard link is the same file under another name).

What "reads" means per input:
- a checkpoint folder, a config / GGUF / tokenizer / text file: the whole path — nothing is
  written into a checkpoint.
- an artifact: its manifest and the files the manifest lists (engines included). `build` writes
  engines into the artifact by design, and a report beside the rank folders reads nothing back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from export.errors import ArtifactError, Llama405Error

FILE, FOLDER = "file", "folder"

# Per command: the flags naming what it writes (a file or a folder it creates or replaces).
OUTPUTS: dict[str, dict[str, str]] = {
    "logits": {"out": FILE},
    "parity": {"report": FILE},
    "export": {"out": FOLDER},
    "synth": {"out": FOLDER},
    "convert-gguf": {"out": FOLDER},
    "build": {"out": FOLDER, "timing_cache": FILE},
}
# Flags naming what a command reads, and the values that name no path.
WHOLE_INPUTS = ("checkpoint", "reference", "config", "gguf", "tokenizer", "calib_text", "fidelity_text")
NOT_PATHS = {"calib_text": ("default", "none"), "fidelity_text": ("heldout",)}
ARTIFACT_INPUT = "artifact"


@dataclasses.dataclass(frozen=True)
class Read:
    """One path a command reads: `flag` names where it came from in the message."""
    flag: str
    path: Path


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside b (both resolved)."""
    return a == b or b in a.parents


def artifact_reads(directory: Path) -> list[Path]:
    """An artifact's manifest and every file it lists; the whole folder when the manifest cannot
    be read (then nothing inside it is known not to be read)."""
    manifest = directory / "manifest.json"
    try:
        raw = json.loads(manifest.read_text())
        listed = list(raw["files"]) if isinstance(raw, dict) and isinstance(raw.get("files"), dict) else None
    except (OSError, ValueError):
        listed = None
    if listed is None:
        return [directory]
    return [manifest, *(directory / rel for rel in listed if isinstance(rel, str))]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files_under(path: Path) -> Iterable[Path]:
    if path.is_dir():
        yield from (p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        yield path


def refuse_overlap(flag: str, out: Path, reads: Sequence[Read], error: type[Llama405Error] = ArtifactError) -> None:
    """Refuse (with `error`) an output `out` that is, contains or lies inside something in `reads`,
    or that is a hard link of a file in it."""
    resolved = Path(out).resolve()
    for read in reads:
        guarded = Path(read.path).resolve()
        if _inside(resolved, guarded) or _inside(guarded, resolved):
            raise error(f"{flag} {out}: is, contains or lies inside {read.path} ({read.flag}), which this command "
                        "reads; choose a path outside it")
    identity = _identity(resolved) if resolved.is_file() else None
    if identity is None:
        return
    for read in reads:
        for file in _files_under(Path(read.path)):
            if _identity(file) == identity:
                raise error(f"{flag} {out}: is the same file as {file} ({read.flag}), which this command reads "
                            "(a hard link); choose another path")


def command_reads(args: argparse.Namespace) -> list[Read]:
    """What the parsed command line `args` reads, by flag."""
    reads = []
    for name in WHOLE_INPUTS:
        value = getattr(args, name, None)
        if value is None or str(value) in NOT_PATHS.get(name, ()):
            continue
        reads.append(Read(_flag(name), Path(value)))
    artifact = getattr(args, ARTIFACT_INPUT, None)
    if artifact is not None:
        reads += [Read(_flag(ARTIFACT_INPUT), p) for p in artifact_reads(Path(artifact))]
    return reads


def refuse_outputs_over_inputs(command: str, args: argparse.Namespace) -> None:
    """Refuse, before anything is written, a command line whose outputs overlap its inputs."""
    outputs = OUTPUTS.get(command, {})
    if not outputs:
        return
    reads = command_reads(args)
    for name in outputs:
        value = getattr(args, name, None)
        if value is not None:
            refuse_overlap(_flag(name), Path(value), reads)
