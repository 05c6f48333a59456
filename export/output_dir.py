"""The directories llama405 writes (an artifact, a synthesized checkpoint): what `--force` may
replace, one writer at a time, temporary siblings that say whose they are.

- `--force` replaces only what llama405 itself finished there (its marker says so: an artifact's
  manifest, a synthesized checkpoint's index) or an empty folder. Anything else — a user's folder,
  a file, the checkpoint being read or any folder that contains it or lies inside it — is refused
  before anything is touched. Inside a replaced folder only the files llama405's record lists
  (the manifest's files, synth's index) are replaced or removed: anything else there (a user's
  NOTES.md) is hard-linked into the new folder, byte for byte, and the folder keeps its mode and
  group (a setgid 2770 folder stays one).
- A writer holds an exclusive `flock` on `.NAME.lock` beside `--out` for its whole run; a second
  writer to the same `--out` is refused, naming the process that holds it.
- Temporary siblings are `.NAME.tmp-PID-*` (and `.NAME.old-PID` while swapping), each holding a
  marker file naming the writer's process and host. A later writer removes only those that
  carry the marker and whose writer is provably gone (same host, process not alive), and says
  so; a folder merely named like one is never touched. They get the permissions the user's
  umask gives a new folder (mkdtemp alone makes them 0700).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from export.errors import ArtifactError, InternalError, Llama405Error
from export.io_guard import Read, refuse_overlap


# The longest sibling name llama405 makes beside --out is `.NAME.tmp-PID-XXXXXXXX` (mkdtemp's 8
# characters, a pid of up to 7 digits): NAME plus at most this many characters.
SIBLING_NAME_EXTRA = 32


def output_folder(out: str | Path) -> Path:
    """--out as an absolute path without `.` / `..` parts: `--out .` names the current folder
    itself, so its lock and temporary siblings land beside it, not inside it. Refuses a name
    too long for those siblings (ArtifactError naming the limit) before anything is written."""
    path = Path(os.path.abspath(out))
    if not path.name:
        raise ArtifactError(f"--out {out}: is the file system's root; choose a folder inside it")
    try:
        name_max = os.pathconf(next(p for p in (path.parent, *path.parent.parents) if p.exists()), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    limit = name_max - SIBLING_NAME_EXTRA
    if len(path.name.encode()) > limit:
        raise ArtifactError(f"--out {out}: its last name is {len(path.name.encode())} bytes; llama405 writes siblings "
                            f"named .NAME.tmp-PID-XXXXXXXX beside it, so at most {limit} fit this file system's "
                            f"{name_max}; choose a shorter name")
    return path


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


WRITER_MARKER = ".llama405-writer"  # inside a temporary folder: "llama405 PID HOST"


def write_marker(folder: Path) -> None:
    """Mark folder as a temporary of this process (what a later run may remove once we are gone)."""
    (folder / WRITER_MARKER).write_text(f"llama405 {os.getpid()} {socket.gethostname()}\n")


def left_by_a_gone_writer(folder: Path, pid: int | None = None) -> bool:
    """folder carries llama405's marker, written on this host by a process (pid, when given) that
    is no longer alive. A folder without the marker, from another host, or of a live process is
    never ours to remove."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        words = (folder / WRITER_MARKER).read_text().split()
    except (OSError, UnicodeDecodeError):
        return False
    if len(words) != 3 or words[0] != "llama405" or not words[1].isdigit():
        return False
    writer = int(words[1])
    if (pid is not None and writer != pid) or words[2] != socket.gethostname():
        return False
    return writer != os.getpid() and not _pid_alive(writer)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(out: Path, log: Callable[[str], None]) -> None:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` left by writers that are gone (their marker says
    so: the name alone is not enough)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)(?:-.*)?$")
    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if match and left_by_a_gone_writer(entry, int(match[1])):
            shutil.rmtree(entry)
            log(f"removed {entry}: left by an earlier run (process {match[1]}) that did not finish")


def remove_stale_temporaries(parent: Path, prefix: str, log: Callable[[str], None]) -> None:
    """Remove `PREFIX*` folders in parent (e.g. `$TMPDIR/llama405-trace-*`) that a killed run
    left: only those with llama405's marker whose writer is provably gone."""
    if not parent.is_dir():
        return
    for entry in sorted(parent.glob(f"{prefix}*")):
        if left_by_a_gone_writer(entry):
            shutil.rmtree(entry)
            log(f"removed {entry}: left by an earlier run that did not finish")


@contextlib.contextmanager
def marked_temporary_folder(prefix: str) -> Iterator[Path]:
    """A new folder in the temporary directory, carrying the writer marker, removed on the way out
    (a SIGKILL leaves it for `remove_stale_temporaries`)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    try:
        write_marker(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
    """A new `.NAME.tmp-PID-*` folder beside out, with umask permissions, holding only the writer
    marker (removed when it is moved into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    write_marker(tmp)
    return tmp


def _keep_unlisted(out: Path, tmp: Path, listed: set[str]) -> None:
    """Hard-link every file of out that llama405's record does not list into tmp at the same
    place (byte for byte, the same inode), so replacing out loses none of the user's files."""
    for folder, dirs, files in os.walk(out):  # symlinks to folders are entries, not descended into
        here = Path(folder)
        entries = files + [d for d in dirs if (here / d).is_symlink()]
        if here != out and not entries and not dirs:
            (tmp / here.relative_to(out)).mkdir(parents=True, exist_ok=True)  # an empty folder of the user's
        for name in entries:
            path = here / name
            rel = path.relative_to(out).as_posix()
            if rel in listed or (here == out and name == WRITER_MARKER):
                continue
            target = tmp / rel
            if target.exists() or target.is_symlink():
                raise ArtifactError(f"--out {out}: {path} is not one of llama405's files, but the new output "
                                    f"writes {rel}; move your file elsewhere and run again")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target, follow_symlinks=False)
            except OSError as err:
                raise ArtifactError(f"--out {out}: cannot keep {path} (not one of llama405's files) in the replaced "
                                    f"folder ({err.strerror}); move it elsewhere and run again") from None


def _keep_mode_and_group(out: Path, tmp: Path) -> None:
    """tmp takes out's mode and group (a shared setgid folder stays one); with setgid, everything
    inside takes the group too, as it would have had it been created in out."""
    st = out.stat()
    if st.st_gid != tmp.stat().st_gid:
        os.chown(tmp, -1, st.st_gid)
    os.chmod(tmp, stat.S_IMODE(st.st_mode))
    if st.st_mode & stat.S_ISGID:
        for path in tmp.rglob("*"):
            if not path.is_symlink() and path.stat().st_gid != st.st_gid:
                os.chown(path, -1, st.st_gid)
            if path.is_dir() and not path.is_symlink():
                os.chmod(path, path.stat().st_mode | stat.S_ISGID)


def move_into_place(tmp: Path, out: Path, listed: Callable[[Path], set[str]] | None = None) -> None:
    """Rename tmp to out, replacing out (already checked replaceable) at the very end.

    listed(out): the relative paths of the files llama405 wrote in an existing out (its record);
    every other file there is kept (see `_keep_unlisted`). None: out must be empty or absent."""
    if not out.exists():
        (tmp / WRITER_MARKER).unlink(missing_ok=True)
        os.replace(tmp, out)
        return
    if any(out.iterdir()):  # an empty folder: nothing to keep but its mode and group
        if listed is None:
            raise InternalError(f"move_into_place({out}): replacing a folder needs the list of llama405's files")
        _keep_unlisted(out, tmp, listed(out))
    _keep_mode_and_group(out, tmp)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    write_marker(out)  # while renamed aside it is a temporary like the others
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # out never ends up missing
        (out / WRITER_MARKER).unlink(missing_ok=True)
        raise
    (out / WRITER_MARKER).unlink(missing_ok=True)
    shutil.rmtree(old)
