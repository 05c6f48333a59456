"""The bound of every size a user controls, with the reason for it, checked before anything is
allocated (a flag by its argparse type, a config.json field by LlamaConfig.validate).

One `Bound` per quantity; the option types (export/options.py, export/config.py, the flags of
export/cli_flags.py and runner/) read them from here, so a limit and its reason are written once.
No torch here: the CLI builds its parser from these.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from export.errors import ConfigError

# Llama 3.1 supports 131072 positions; 8x that leaves room for longer-context fine-tunes while a
# float32 cos/sin table stays under 1 GiB at head_dim 128 (2**20 x 128 x 2 x 4 bytes).
MAX_POSITIONS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Bound:
    """lo <= value <= hi for one user-controlled integer; `reason` says why hi is the limit."""

    what: str
    lo: int
    hi: int
    reason: str

    def problem(self, value: int) -> str | None:
        """None when value is within bounds; otherwise why it is not (without naming the flag)."""
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an integer"
        if value < self.lo:
            return f"{value} is below {self.lo}" + (" (it must be positive)" if self.lo == 1 else "")
        if value > self.hi:
            return f"{value} exceeds {self.hi}: {self.reason}"
        return None

    def check(self, value: int, name: str) -> int:
        """value, or ConfigError naming `name` (a flag or a config field)."""
        why = self.problem(value)
        if why is not None:
            raise ConfigError(f"{name} {why}")
        return value

    def flag_type(self, text: str) -> int:
        """argparse type: an integer within the bound (argparse names the flag)."""
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        why = self.problem(value)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return value

    def describe(self) -> str:
        return f"{self.lo}..{self.hi}"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


SEED = Bound("seed", 0, 2**32 - 1, "seeds are 32-bit: numpy's generators take 0..2**32-1")
MAX_SEQ_LEN = Bound("max_seq_len", 1, MAX_POSITIONS,
                    "caches and RoPE tables are allocated for every position; Llama 3.1 has 131072")
MAX_BATCH = Bound("max_batch", 1, 4096, "every cache is allocated max_batch rows deep")
MAX_NEW_TOKENS = Bound("max_new_tokens", 1, MAX_POSITIONS, "no cache holds more positions")
STEPS = Bound("steps", 0, MAX_POSITIONS, "no cache holds more positions")
CALIB_SAMPLES = Bound("calib_samples", 1, 4096,
                      "every calibration sequence runs through the eager model on this machine's CPU")
CALIB_SEQ_LEN = Bound("calib_seq_len", 1, 8192,
                      "the eager calibration pass holds [heads, seq, seq] attention scores per layer")
ORT_THREADS = Bound("ort_threads", 1, 4 * _cores(),
                    f"each session starts that many OS threads; beyond 4x this machine's {_cores()} cores "
                    "they only contend")

# config.json sizes: each is a dimension of a tensor the export, the planner or a backend
# allocates; the limits are far above Llama 3.1 405B's (hidden 16384, 126 layers, 128 heads).
CONFIG_BOUNDS = {
    "max_position_embeddings": MAX_SEQ_LEN,
    "vocab_size": Bound("vocab_size", 1, 1 << 24, "the embedding and lm_head hold a row per token; "
                        "Llama 3 has 128256"),
    "hidden_size": Bound("hidden_size", 1, 1 << 17, "Llama 3.1 405B has 16384"),
    "intermediate_size": Bound("intermediate_size", 1, 1 << 19, "Llama 3.1 405B has 53248"),
    "num_hidden_layers": Bound("num_hidden_layers", 1, 4096, "Llama 3.1 405B has 126"),
    "num_attention_heads": Bound("num_attention_heads", 1, 4096, "Llama 3.1 405B has 128"),
    "num_key_value_heads": Bound("num_key_value_heads", 1, 4096, "Llama 3.1 405B has 8"),
    "head_dim": Bound("head_dim", 1, 4096, "Llama 3.1 uses 128"),
}


def check_config_sizes(values: dict[str, int], source: str) -> None:
    """ConfigError naming the first config.json size outside its bound."""
    for name, bound in CONFIG_BOUNDS.items():
        why = bound.problem(values[name])
        if why is not None:
            raise ConfigError(f"{source}: {name}={why}")
