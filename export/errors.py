"""Exceptions the CLI turns into one line and exit code 2.

Every message names the file or value at fault and the fix, so a user reading one line in a
terminal knows what to do next.
"""


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
