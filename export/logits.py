"""Which positions' logits a rank graph returns: one object per export, resolved once from
`--logits` (the manifest's `logits` names it), asked by the model (which rows it keeps before the
head), the backends (the rows a step returns) and the planner (the logits' activation rows),
instead of branching on the name.

- `all`: every position of the step (parity compares each; speculative decoding needs them).
- `last`: the last position only (saves vocab x seq at prefill; generation needs no more).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from export.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Logits:
    name: str
    every_position: bool

    def rows(self, seq: int) -> int:
        """Positions of logits a step of `seq` tokens returns."""
        return seq if self.every_position else 1

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """The positions of hidden states [batch, seq, hidden] that reach the head."""
        return hidden if self.every_position else hidden[:, -1:]  # [batch, rows, hidden]


LOGITS: dict[str, Logits] = {kind.name: kind for kind in (Logits("all", True), Logits("last", False))}


def logits_named(name: str) -> Logits:
    try:
        return LOGITS[name]
    except KeyError:
        raise ConfigError(f"--logits {name!r}: choose {' or '.join(LOGITS)}") from None
