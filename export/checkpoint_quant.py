"""What a pre-quantized checkpoint says about the linears it left unquantized.

Checkpoint producers list the modules they kept in high precision in config.json's
`quantization_config`, each under its own key and with its own matching rule:

| producer (quant_method)                      | key                     | rule                               |
|----------------------------------------------|-------------------------|------------------------------------|
| transformers fbgemm_fp8 (Meta's FP8 405B), fp8 | `modules_to_not_convert` | substring of the module path       |
| compressed-tensors (llm-compressor)          | `ignore`                | exact path, or `re:` + a regex (re.match) |
| ModelOpt (modelopt)                          | `exclude_modules`       | fnmatch pattern                    |

The exporter honours the list by default — it is the producer's accuracy decision, e.g. Meta's
FP8 405B keeps every attention linear and the first and last layer in bf16 — by turning it into
FP8 exclusion patterns (export/quantization.py `Quantization.exclude`, fnmatch and `re:` patterns),
and records it in the manifest. `--fp8-checkpoint-exclusions ignore` quantizes them anyway.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from export.errors import ConfigError

EXCLUSION_KEYS = ("modules_to_not_convert", "ignore", "exclude_modules")
CHECKPOINT_EXCLUSION_CHOICES = ("honour", "ignore")


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """config.json's quantization_config, as far as llama405 uses it."""

    method: str | None = None  # quant_method; None when the checkpoint is not pre-quantized
    key: str | None = None  # which of EXCLUSION_KEYS held the list
    not_quantized: tuple[str, ...] = ()  # the list, as written

    def fp8_exclude_patterns(self) -> tuple[str, ...]:
        """The list as Quantization exclusion patterns (fnmatch, or `re:` regexes)."""
        if self.key == "modules_to_not_convert":  # transformers: `name in module_path`
            return tuple(f"*{_escape_glob(name)}*" for name in self.not_quantized)
        if self.key == "ignore":  # compressed-tensors: exact path or re:REGEX
            return tuple(name if name.startswith("re:") else _escape_glob(name) for name in self.not_quantized)
        return self.not_quantized  # ModelOpt: fnmatch already

    def manifest_record(self, honoured: bool) -> dict[str, Any]:
        return {"quant_method": self.method, "key": self.key, "modules": list(self.not_quantized),
                "honoured": honoured}


def _escape_glob(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def read_checkpoint_quantization(config_path: Path) -> CheckpointQuantization:
    try:
        raw = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_path}: cannot read ({err})") from None
    section = raw.get("quantization_config") if isinstance(raw, dict) else None
    if section is None:
        return CheckpointQuantization()
    if not isinstance(section, dict):
        raise ConfigError(f"{config_path}: quantization_config is {type(section).__name__}, not an object; "
                          "fix config.json")
    method = section.get("quant_method")
    present = [key for key in EXCLUSION_KEYS if section.get(key) is not None]
    if len(present) > 1:
        raise ConfigError(f"{config_path}: quantization_config has both {present[0]!r} and {present[1]!r}; "
                          "keep the one the checkpoint's producer wrote")
    if not present:
        return CheckpointQuantization(method=str(method) if method is not None else None)
    key = present[0]
    names = section[key]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{config_path}: quantization_config.{key} must be a list of module names, got "
                          f"{names!r}; fix config.json")
    return CheckpointQuantization(str(method) if method is not None else None, key, tuple(names))
