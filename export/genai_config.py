"""genai_config.json: what onnxruntime-genai needs to run a TP1/PP1 artifact as it is.

onnxruntime-genai's "llama" decoder feeds input_ids, attention_mask and position_ids and reads
logits, with caches named past_key_values.%d.key|value / present.%d.key|value — the rank graph's
own IO names, so the config only points at rank0/model.onnx and states the geometry. Both cache
modes work: the static graph derives each row's write slot from its attention_mask row (after its
last real slot: for genai's rows the mask's width less the step; export/kv_cache.py), so genai's
buffer-sharing mode (`past_present_share_buffer: true`) drives it with the feeds it
already makes; the concat graph is genai's ordinary growing cache.

Artifacts with TP or PP > 1 get no config: their rank graphs hold TensorRT's DistCollective
all-reduces, which onnxruntime (and so genai) has no kernel for, and a single genai session
cannot run a pipeline of stages. The manifest says so.

Search defaults come from the checkpoint's generation_config.json when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.config import LlamaConfig
from export.kv_cache import kv_cache_layout, past_name, present_name

GENAI_CONFIG = "genai_config.json"
NOT_SUPPORTED = ("onnxruntime-genai runs one graph in one onnxruntime session: tp/pp > 1 rank graphs hold "
                 "DistCollective all-reduces (TensorRT's op, no onnxruntime kernel) and pipeline stages")
# generation_config.json key -> genai search key
_SEARCH_KEYS = {"do_sample": "do_sample", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "repetition_penalty": "repetition_penalty"}


def genai_supported(tp: int, pp: int) -> bool:
    return tp == 1 and pp == 1


def search_defaults(checkpoint_dir: Path) -> dict[str, Any]:
    """The sampling defaults of the checkpoint's generation_config.json (absent keys: genai's own)."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a broken optional file must not stop an export; genai's defaults apply
    if not isinstance(raw, dict):
        return {}
    out = {}
    for key, genai_key in _SEARCH_KEYS.items():
        value = raw.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (isinstance(value, bool) if key == "do_sample" else number):
            out[genai_key] = value
    return out


def genai_config(cfg: LlamaConfig, kv_cache: str, max_seq_len: int, search: dict[str, Any]) -> dict[str, Any]:
    eos = list(cfg.eos_token_id)
    return {
        "model": {
            "type": "llama",
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0],
            "context_length": max_seq_len,
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "filename": "rank0/model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": past_name("%d", "key"),
                           "past_value_names": past_name("%d", "value")},
                "outputs": {"logits": "logits", "present_key_names": present_name("%d", "key"),
                            "present_value_names": present_name("%d", "value")},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": max_seq_len,
            "min_length": 0, "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            **search,
            "past_present_share_buffer": kv_cache_layout(kv_cache).in_place,
        },
    }


def write_genai_config(directory: Path, cfg: LlamaConfig, kv_cache: str, max_seq_len: int,
                       checkpoint_dir: Path) -> Path:
    path = Path(directory) / GENAI_CONFIG
    body = genai_config(cfg, kv_cache, max_seq_len, search_defaults(checkpoint_dir))
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path
