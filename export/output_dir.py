"""The directories llama405 writes (an artifact, a synthesized checkpoint): what `--force` may
replace, one writer at a time, temporary siblings that say whose they are.

- `--force` replaces only what llama405 itself finished there (its marker says so: an artifact's
  manifest, a synthesized checkpoint's index) or an empty folder. Anything else — a user's folder,
  a file, the checkpoint being read or any folder that contains it or lies inside it — is refused
  before anything is touched.
- A writer holds an exclusive `flock` on `.NAME.lock` beside `--out` for its whole run; a second
  writer to the same `--out` is refused, naming the process that holds it.
- Temporary siblings are `.NAME.tmp-PID-*` (and `.NAME.old-PID` while swapping): a later writer
  removes those whose process is gone, and says so. They get the permissions the user's umask
  gives a new folder (mkdtemp alone makes them 0700).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from export.errors import ArtifactError, Llama405Error
from export.io_guard import Read, refuse_overlap


def check_replaceable(out: Path, force: bool, is_ours: Callable[[Path], bool], what: str,
                      protected: Sequence[Path] = (), error: type[Llama405Error] = ArtifactError) -> None:
    """Refuse (with `error`) an --out that --force may not replace, or that exists without --force."""
    refuse_overlap("--out", out, [Read("an input", Path(p)) for p in protected], error)
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise error(f"--out {out}: exists and is not a folder; llama405 never replaces it — remove it "
                            "yourself or choose another --out")
    empty = not any(out.iterdir())
    if not force:
        hint = "pass --force to replace it" if empty or is_ours(out) else "llama405 will not replace it"
        raise error(f"--out {out}: already exists; {hint}, or choose another --out")
    if not (empty or is_ours(out)):
        raise error(f"--out {out}: exists and is not {what} (nor an empty folder); --force replaces only "
                            "those — remove it yourself or choose another --out")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(out: Path, log: Callable[[str], None]) -> None:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` left by writers that are gone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)(?:-.*)?$")
    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if match and int(match[1]) != os.getpid() and not _pid_alive(int(match[1])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            log(f"removed {entry}: left by an earlier run (process {match[1]}) that did not finish")


@contextlib.contextmanager
def exclusive_writer(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside out exclusively for the block; refuse when another process does.
    The lock file is removed on the way out (while held); a writer that locked a file already
    unlinked that way sees another inode at the path and tries again."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ArtifactError(f"--out {out}: process {holder} is writing it right now; wait for it to finish "
                                "or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still holding the lock
        os.close(fd)


def temporary_sibling(out: Path) -> Path:
    """A new empty `.NAME.tmp-PID-*` folder beside out, with umask permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out, replacing out (already checked replaceable) at the very end."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # out never ends up missing
        raise
    shutil.rmtree(old)
