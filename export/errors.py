"""The exceptions that decide how a command ends (export/cli_run.py maps them to exit codes).

User-facing errors (`Llama405Error` and its kinds) end with one line and exit code 2: every
message names the file or value at fault and the fix, so a user reading one line in a terminal
knows what to do next. `MissingRequirement` is user-facing too, with its own code 3: the input is
fine, this machine lacks something the command needs. `InternalError` is the opposite: a broken
invariant of llama405 itself, shown with its traceback and exit code 70 — as is any other
exception that escapes a command.
"""

import contextlib
from collections.abc import Iterator


class Llama405Error(Exception):
    """Base of every user-facing error: bad input, not a bug in llama405."""


class ConfigError(Llama405Error):
    """config.json or a command-line geometry that cannot describe a Llama 3.1 model."""


class CheckpointError(Llama405Error):
    """A checkpoint directory that is missing files, corrupt, or disagrees with its config."""


class ShardingError(Llama405Error):
    """A tensor/pipeline-parallel layout the model's geometry cannot be split into."""


class ArtifactError(Llama405Error):
    """An exported artifact that is incomplete, tampered with, or from another configuration."""


class InputError(Llama405Error):
    """A prompt, token id or runtime request the loaded model cannot serve."""


class MissingRequirement(Llama405Error):
    """Software or hardware the command needs is not on this machine (a TensorRT flavour, a GPU,
    a Python package): exit code 3, one line saying what is missing and how to go on."""


class InternalError(Exception):
    """An invariant of llama405 broke: a llama405 bug, never the user's input. Not a
    Llama405Error, so the CLI shows the traceback and exits with code 70 (EX_SOFTWARE)."""


def excerpt(text: object, limit: int = 160) -> str:
    """str(text) cut to `limit` characters for an error line: a library's message may quote a
    whole line of the user's (binary) file, and one line must stay one readable line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else f"{flat[:limit]}… ({len(flat) - limit} more characters)"


@contextlib.contextmanager
def naming(path: object) -> Iterator[None]:
    """An OSError raised inside without a file name (os.write / f.write hitting ENOSPC, EIO) gets
    `path`, so its one line names the file being written instead of "a file"."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise
