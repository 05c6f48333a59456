"""The export options: one dataclass, validated once, written into the artifact's manifest
whole and read back exactly (`Manifest.options`), so every later step — build, plan, the
backends, the check that an existing artifact matches a request — reads the same object.

No torch here: the manifest, the planner and the CLI import it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from export.checkpoint_quant import CHECKPOINT_EXCLUSION_CHOICES
from export.bounds import MAX_BATCH, MAX_SEQ_LEN
from export.errors import ConfigError
from export.dtypes import COMPUTE_DTYPE_NAMES
from export.kv_cache import KV_CACHE_LAYOUTS, KVCacheLayout, kv_cache_layout
from export.logits import LOGITS, Logits, logits_named
from export.quantization import DEFAULT_RECIPE, QUANTIZATIONS, RECIPES, RENAMED_RECIPES, Quantization, quantization_of

if TYPE_CHECKING:
    from export.config import LlamaConfig
    from export.model import ModelOptions

DTYPE_CHOICES = COMPUTE_DTYPE_NAMES
FP8_RECIPE_CHOICES = RECIPES
MIN_MAX_SEQ_LEN = 16  # the trace's example step (3 new tokens after 5 cached) must fit, with room to spare


def choices() -> dict[str, tuple[str, ...]]:
    """field -> allowed values, for validate(), the flags and the manifest's schema check; read
    when asked, so a quantization scheme registered in QUANTIZATIONS is a choice everywhere."""
    return {"dtype": DTYPE_CHOICES, "quant": tuple(QUANTIZATIONS), "kv_cache": tuple(KV_CACHE_LAYOUTS),
            "logits": tuple(LOGITS), "fp8_recipe": FP8_RECIPE_CHOICES,
            "fp8_checkpoint_exclusions": CHECKPOINT_EXCLUSION_CHOICES}
POSITIVE = ("tp", "pp", "max_batch", "max_seq_len")


# Fields added after the manifest's format 2, written only when not at their default: an artifact
# exported before one existed (or without it) has the same manifest and fingerprint as before,
# and reads back with the default.
LATER_FIELDS: dict[str, Any] = {"fp8_smoothing": None}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    tp: int = 1
    pp: int = 1
    dtype: str = "float16"
    quant: str = "none"
    kv_cache: str = "static"  # the cache layout's name (export/kv_cache.py)
    max_batch: int = 8
    max_seq_len: int = 4096
    logits: str = "all"
    ranks: tuple[int, ...] | None = None  # None = every rank
    fp8_recipe: str = DEFAULT_RECIPE  # export/quantization.py RECIPES
    fp8_exclude: tuple[str, ...] = ()  # fnmatch or re: patterns; the checkpoint's own list joins them
    fp8_checkpoint_exclusions: str = "honour"  # or "ignore" (export/checkpoint_quant.py)
    fp8_smoothing: float | None = None  # alpha of the up->down smoothing (export/smoothing.py); None: off

    def validate(self, cfg: LlamaConfig | None = None) -> None:
        """ConfigError naming the flag; cfg adds the checks against the model's geometry."""
        self.validate_fields()
        if self.max_seq_len < MIN_MAX_SEQ_LEN:
            raise ConfigError(f"--max-seq-len {self.max_seq_len} is below {MIN_MAX_SEQ_LEN}, the shortest cache the "
                              "exporter traces with")
        if cfg is not None and self.max_seq_len > cfg.max_position_embeddings:
            raise ConfigError(f"--max-seq-len {self.max_seq_len} exceeds the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings}); choose at most that")
        if cfg is not None and self.quantization.quantized:
            self._check_exclusions_match(cfg)
            self._check_something_quantized(cfg)

    def _check_exclusions_match(self, cfg: LlamaConfig) -> None:
        """Each --fp8-exclude pattern keeps at least one linear of this model unquantized; one that
        matches none (a typo, another naming scheme) would quantize everything it meant to keep."""
        from export.quantization import matches
        from export.rank_layout import quantizable_linears
        linears = quantizable_linears(cfg)
        for pattern in self.fp8_exclude:
            if not any(matches(name, pattern) for name in linears):
                raise ConfigError(f"--fp8-exclude {pattern!r} matches none of this model's quantizable linears "
                                  f"({', '.join(linears[:3])}, ... {linears[-1]}); fix the pattern")

    def _check_something_quantized(self, cfg: LlamaConfig) -> None:
        """--quant fp8 that quantizes no linear (meta's recipe on a model of one or two layers, or
        exclusions covering everything) would export a 16-bit model labelled FP8: refused."""
        from export.rank_layout import quantizable_linears
        scheme, layers = self.quantization, cfg.num_hidden_layers
        if not any(scheme.quantizes(name, layers) for name in quantizable_linears(cfg)):
            why = (f"--fp8-recipe {self.fp8_recipe} keeps attention and the first and last layer 16-bit"
                   if self.fp8_recipe == "meta" else "the exclusions cover every linear")
            raise ConfigError(f"--quant {self.quant} quantizes none of this {layers}-layer model's linears ({why}); "
                              "pass --fp8-recipe all to quantize every linear, or --quant none")

    def validate_fields(self) -> None:
        """Each field on its own: positive sizes, a choice of its choices, compilable patterns."""
        for name in POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{_flag(name)} {value!r} must be a positive integer")
        for name, allowed in choices().items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{_flag(name)} {getattr(self, name)!r}: choose {' or '.join(allowed)}")
        for name, bound in (("max_batch", MAX_BATCH), ("max_seq_len", MAX_SEQ_LEN)):
            bound.check(getattr(self, name), f"--{_flag(name)}")
        for pattern in self.fp8_exclude:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ConfigError(f"--fp8-exclude {pattern!r}: not a regular expression ({err})") from None
        if self.fp8_smoothing is not None and (isinstance(self.fp8_smoothing, bool) or not isinstance(
                self.fp8_smoothing, (int, float)) or not 0 < self.fp8_smoothing <= 1):
            raise ConfigError(f"--fp8-smoothing {self.fp8_smoothing!r}: the migration strength alpha must be in "
                              "(0, 1] (0.5 is SmoothQuant's default), or none")

    @property
    def cache_layout(self) -> KVCacheLayout:
        return kv_cache_layout(self.kv_cache)

    @property
    def quantization(self) -> Quantization:
        return quantization_of(self)

    @property
    def logits_rows(self) -> Logits:
        return logits_named(self.logits)

    @property
    def model_options(self) -> ModelOptions:
        from export.model import ModelOptions
        return ModelOptions(kv_cache=self.kv_cache, max_seq_len=self.max_seq_len, logits=self.logits,
                            quant=self.quantization)

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["ranks"] = list(self.ranks) if self.ranks is not None else None
        raw["fp8_exclude"] = list(self.fp8_exclude)
        for name, default in LATER_FIELDS.items():
            if raw[name] == default:
                del raw[name]
        return raw

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> ExportOptions:
        """Exactly the options to_dict wrote; ConfigError naming the field otherwise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if isinstance(raw, dict):
            raw = {**LATER_FIELDS, **raw}
            if raw.get("fp8_recipe") in RENAMED_RECIPES:  # an artifact of an earlier llama405: same meaning
                raw["fp8_recipe"] = RENAMED_RECIPES[raw["fp8_recipe"]]
        if not isinstance(raw, dict) or set(raw) != fields:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ConfigError(f"{source}: options must hold exactly {sorted(fields)}, got {got}")
        ranks, exclude = raw["ranks"], raw["fp8_exclude"]
        if not (ranks is None or (isinstance(ranks, list) and all(isinstance(r, int) and r >= 0 for r in ranks))):
            raise ConfigError(f"{source}: options.ranks={ranks!r} must be null or a list of rank numbers")
        if not (isinstance(exclude, list) and all(isinstance(p, str) for p in exclude)):
            raise ConfigError(f"{source}: options.fp8_exclude={exclude!r} must be a list of patterns")
        options = cls(**{**raw, "ranks": tuple(ranks) if ranks is not None else None, "fp8_exclude": tuple(exclude)})
        try:
            options.validate()
        except ConfigError as err:
            raise ConfigError(f"{source}: options: {err}") from None
        return options

    def differences(self, other: ExportOptions) -> list[str]:
        """'field have (requested want)' for every field where self and other differ; ranks
        compare as rank sets (None = every rank)."""
        diffs = []
        for field in dataclasses.fields(self):
            if field.name.startswith("fp8_") and not (self.quantization.quantized or other.quantization.quantized):
                continue  # FP8 choices of an export without quantization shape nothing
            have, want = getattr(self, field.name), getattr(other, field.name)
            if field.name == "ranks":
                have, want = self.rank_list(), other.rank_list()
            if have != want:
                diffs.append(f"{_flag(field.name)} {_show(have)} (requested {_show(want)})")
        return diffs

    def rank_list(self) -> list[int]:
        return sorted(self.ranks) if self.ranks is not None else list(range(self.tp * self.pp))


def _flag(field: str) -> str:
    return field.replace("_", "-")


def _show(value: Any) -> str:
    return (",".join(map(str, value)) or "none") if isinstance(value, (list, tuple)) else str(value)
