"""How every llama405 command ends (the `llama405` and `build-engine` entry points share it).

Exit codes:
  0    done
  1    `parity`: outside tolerance
  2    bad input, or an environment problem on a path we read or write: one line on stderr
       naming it and the fix (a Llama405Error, an OSError, or a flag argparse refuses)
  3    something this machine lacks (MissingRequirement): a TensorRT flavour, its GPU, a Python
       package; one line saying what and how to go on (`build`: the ONNX stage is done)
  70   a llama405 bug (InternalError or any other exception): its traceback, then one line
       asking for a report (70 = EX_SOFTWARE of sysexits.h)
  129  hung up (SIGHUP: the terminal closed)
  130  interrupted (Ctrl-C)
  141  stdout's reader closed the pipe (`llama405 inspect ART | head -1`): the rest is dropped quietly
  143  terminated (SIGTERM)

SIGTERM and SIGHUP are turned into an exception so `finally` blocks run — an export removes its
lock, temporary folders and the trace folder on the way out, as it does for Ctrl-C. Native code
that calls back into Python (TensorRT's logger and progress monitor) catches and prints an
exception raised there, so around it `signals_deferred` only records the signal (a progress
monitor reads it to cancel the build) and raises once the native call has returned.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator

from export.errors import Llama405Error, MissingRequirement

EXIT_OUTSIDE_TOLERANCE = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING = 3
EXIT_BUG = 70
EXIT_HUNG_UP = 129
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool whose reader closed the pipe
EXIT_TERMINATED = 143
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # turned into Terminated; SIGINT is KeyboardInterrupt

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


def _stdout_closed() -> bool:
    """Whether stdout's reader went away (`llama405 inspect ART | head -1`). Then the rest of the
    output is dropped quietly, as other command-line tools do: stdout is pointed at /dev/null so
    the interpreter's final flush cannot print "Exception ignored ... BrokenPipeError"."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (a test's capture)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):  # a pipe whose reader closed
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; raised from the signal handler so cleanup runs like for Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):  # raised in a build worker process, re-raised in the parent
        return Terminated, (self.signum,)


def _terminate(signum, frame):
    raise Terminated(signum)


def _signal_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


class DeferredSignals:
    """The signals that arrived inside `signals_deferred`; `pending` is what a progress monitor polls."""

    def __init__(self) -> None:
        self.received: list[int] = []

    @property
    def pending(self) -> bool:
        return bool(self.received)


@contextlib.contextmanager
def signals_deferred() -> Iterator[DeferredSignals]:
    """Around native code that calls back into Python: Ctrl-C, SIGTERM and SIGHUP are recorded, not
    raised inside the callback (where TensorRT would catch and print the exception and carry on to
    "built 1 engine(s)"), and raised here once the block is done — or instead of whatever the block
    raised after being cancelled."""
    state = DeferredSignals()
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield state
        return

    def record(signum, frame):
        state.received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, *CLEANUP_SIGNALS)}
    try:
        yield state
    except BaseException as err:
        if state.received:
            raise _signal_exception(state.received[0]) from err
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if state.received:
        raise _signal_exception(state.received[0])


def os_error_line(err: OSError) -> str:
    where = err.filename if err.filename is not None else "a file"
    fix = _FIXES.get(err.errno, "check the path and the disk")
    return f"{where}: {err.strerror or err}; {fix}"


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run one command under the exit-code contract above."""
    previous = {signum: signal.signal(signum, _terminate) for signum in CLEANUP_SIGNALS}
    try:
        code = command()
        sys.stdout.flush()  # a closed pipe shows here, not at exit as "Exception ignored"
        return code
    except MissingRequirement as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return EXIT_MISSING
    except Llama405Error as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if err.errno == errno.EPIPE and _stdout_closed():
            return EXIT_BROKEN_PIPE
        print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as stop:
        if stop.signum == signal.SIGHUP:
            print(f"{prog}: hung up (SIGHUP); nothing half-written was left behind", file=sys.stderr)
            return EXIT_HUNG_UP
        print(f"{prog}: terminated; nothing half-written was left behind", file=sys.stderr)
        return 128 + stop.signum
    except Exception:  # noqa: BLE001 — every other exception is a bug: say so, with its traceback
        traceback.print_exc(file=sys.stderr)
        print(f"{prog}: internal error (exit {EXIT_BUG}): this is a llama405 bug, not a problem with your "
              "input; please report it with the traceback above", file=sys.stderr)
        return EXIT_BUG
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
