"""Llama 3.1 geometry: presets, Hugging Face config.json reading, validation.

config.json comes in three shapes in the wild: Meta's hub files and transformers 4.x write
`rope_theta` and `rope_scaling` (keyed `rope_type`, or `type` in files from before 4.45);
transformers 5.x folds both into `rope_parameters`. All three read into the same dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from export.bounds import check_config_sizes
from export.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", *LLAMA3_ROPE_KEYS})
# config.json fields that change the math, and the one value of each that export/model.py implements.
# A checkpoint with another value is refused by name rather than exported as a different model.
IMPLEMENTED = {"hidden_act": "silu", "hidden_activation": "silu", "attention_bias": False, "mlp_bias": False,
               "use_qk_norm": False, "sliding_window": None, "attn_logit_softcapping": None,
               "final_logit_softcapping": None, "partial_rotary_factor": 1.0}


def refuse_unimplemented(raw: dict[str, Any], source: str) -> None:
    for key, implemented in IMPLEMENTED.items():
        if key in raw and raw[key] != implemented and not (implemented is None and raw[key] in (None, 0)):
            raise ConfigError(f"{source}: {key}={raw[key]!r} is not implemented by llama405 (only {implemented!r}, "
                              "as in Llama 3.1); this checkpoint would export a different model")


class _Fields:
    """Typed reads of one JSON object: a wrong type is refused by name, never coerced
    (`num_hidden_layers: true` is not 1, `"4096"` is not 4096)."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def integer(self, key: str, *default: Any) -> Any:
        value = self.raw[key] if key in self.raw or not default else default[0]
        if value is None and default and default[0] is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.source}: {key}={value!r} must be an integer")
        return value

    def number(self, key: str, *default: Any) -> float:
        value = self.raw[key] if key in self.raw or not default else default[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.source}: {key}={value!r} must be a finite number")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: {key}={value!r} must be true or false")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: {key}={value!r} must be a JSON object (or null)")
        return dict(value)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE stretch (rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 128256
    head_dim: int | None = None
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int = 128000
    eos_token_id: tuple[int, ...] = (128001, 128008, 128009)
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self.validate()

    def validate(self, source: str = "config") -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name}={value!r} must be a positive integer")
        # Upper bounds before anything is sized from them (a 2**40-position RoPE table, say).
        check_config_sizes({name: getattr(self, name) for name in positive}, source)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs "
                "every KV head to serve the same number of query heads")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim={self.head_dim} must be even for rotary embeddings")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"{source}: rope_theta={self.rope_theta!r} must be a positive number")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"{source}: rms_norm_eps={self.rms_norm_eps!r} must be positive")
        s = self.rope_scaling
        if s is not None and not (s.factor >= 1 and 0 < s.low_freq_factor < s.high_freq_factor
                                  and s.original_max_position_embeddings > 0):
            raise ConfigError(f"{source}: rope_scaling {dataclasses.asdict(s)} is not a llama3 scaling: it needs "
                              "factor >= 1, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0")

    # -- derived sizes ------------------------------------------------------------------------

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        """Distinct checkpoint parameters (a tied head counted once), summed over the model's own
        tensors (export/rank_layout.py) rather than a formula restating its layers."""
        from export.rank_layout import parameter_count
        return parameter_count(self)

    # -- Hugging Face I/O ---------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: Any, source: str = "config.json") -> LlamaConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(raw).__name__}; re-download config.json")
        arch = raw.get("model_type", "llama")
        if arch != "llama":
            raise ConfigError(f"{source}: model_type={arch!r}; llama405 converts Llama checkpoints "
                              "(model_type \"llama\") only")
        field = _Fields(raw, source)
        refuse_unimplemented(raw, source)
        rope_params = field.mapping("rope_parameters")  # transformers >= 5
        legacy = field.mapping("rope_scaling")
        if legacy:
            rope_params = {**rope_params, **legacy}
        unknown = sorted(set(rope_params) - ROPE_KEYS)
        if unknown:
            raise ConfigError(f"{source}: rope parameter(s) {', '.join(unknown)} are not implemented by llama405 "
                              f"(it implements {', '.join(sorted(ROPE_KEYS))}); this is not a Llama 3.1 rope")
        rope = _Fields(rope_params, f"{source} rope_scaling")
        theta = field.number("rope_theta", rope.number("rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope type {rope_type!r} is not supported (known: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}); Llama 3.1 checkpoints use \"llama3\" — fix "
                "rope_scaling.rope_type in the file")
        scaling = None
        if rope_type == "llama3":
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope_params]
            if missing:
                raise ConfigError(f"{source}: llama3 rope scaling lacks {missing[0]!r}; add it to "
                                  "rope_scaling (Llama 3.1 uses factor 8, low 1, high 4, original 8192)")
            scaling = RopeScaling(factor=rope.number("factor"), low_freq_factor=rope.number("low_freq_factor"),
                                  high_freq_factor=rope.number("high_freq_factor"),
                                  original_max_position_embeddings=rope.integer("original_max_position_embeddings"))
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in raw:
                raise ConfigError(f"{source}: required key {key!r} is missing")
        eos = raw.get("eos_token_id", 128001)
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        if not eos_ids or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in eos_ids):
            raise ConfigError(f"{source}: eos_token_id={eos!r} must be a token id or a list of them")
        bos = raw.get("bos_token_id", 128000)
        try:
            return cls(
                hidden_size=field.integer("hidden_size"),
                intermediate_size=field.integer("intermediate_size"),
                num_hidden_layers=field.integer("num_hidden_layers"),
                num_attention_heads=field.integer("num_attention_heads"),
                num_key_value_heads=field.integer("num_key_value_heads", raw["num_attention_heads"]),
                vocab_size=field.integer("vocab_size", 128256),
                head_dim=field.integer("head_dim", None),
                rope_theta=theta,
                rope_scaling=scaling,
                rms_norm_eps=field.number("rms_norm_eps", 1e-5),
                max_position_embeddings=field.integer("max_position_embeddings", 131072),
                tie_word_embeddings=field.boolean("tie_word_embeddings", False),
                bos_token_id=128000 if bos is None else field.integer("bos_token_id"),
                eos_token_id=eos_ids,
                torch_dtype=str(raw.get("torch_dtype", raw.get("dtype", "bfloat16"))),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {str(err).split(': ', 1)[-1]}") from None

    @classmethod
    def from_hf(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; point --checkpoint at a Hugging Face model "
                              "directory that contains config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); re-download config.json") from None
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers 4.x writes it (readable by 4.x and 5.x)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id),
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.torch_dtype,
        }

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    "llama-3.1-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8),
    "llama-3.1-405b": LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                  num_attention_heads=128, num_key_value_heads=8),
    # Llama 3.1's architecture and real vocabulary at toy width: the demo's and CI's model.
    "llama-3.1-tiny": LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
