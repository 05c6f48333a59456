"""How every llama405 command ends (the `llama405` and `build-engine` entry points share it).

Exit codes: 0 done; 1 `parity` outside tolerance; 2 bad input or an environment problem on a path
we read or write (one line on stderr naming it and the fix); 3 `build`: the TensorRT flavour or its
GPU is missing, the ONNX stage is done; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Bugs
are none of these: they show a traceback.

SIGTERM is turned into an exception so `finally` blocks run — an export removes its temporary
folders and the trace folder on the way out, as it does for Ctrl-C.
"""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable

from export.errors import Llama405Error

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_FIXES = {
    errno.EACCES: "choose a path you may write, or fix its permissions",
    errno.EPERM: "choose a path you may write, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free space or choose a path on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder: name a file",
    errno.EEXIST: "a file stands where a folder must be made: choose another path",
    errno.ENOENT: "check the path",
    errno.EBUSY: "the path is in use: choose another path",
}


class Terminated(BaseException):
    """SIGTERM arrived; raised from the signal handler so cleanup runs like for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def os_error_line(err: OSError) -> str:
    where = err.filename if err.filename is not None else "a file"
    fix = _FIXES.get(err.errno, "check the path and the disk")
    return f"{where}: {err.strerror or err}; {fix}"


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run one command under the exit-code contract above."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return command()
    except Llama405Error as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{prog}: terminated; nothing half-written was left behind", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
