"""config.json in the shapes Meta, transformers 4.x and 5.x write; presets; validation."""

from __future__ import annotations

import json

import pytest

from export.config import PRESETS, LlamaConfig, RopeScaling
from export.errors import ConfigError

META_405B = {  # as published on the hub for Llama 3.1 405B (transformers 4.43 era)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
    "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
    "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_405b_preset_matches_the_published_config():
    assert LlamaConfig.from_hf_dict(META_405B) == PRESETS["llama-3.1-405b"]
    cfg = PRESETS["llama-3.1-405b"]
    assert cfg.head_dim == 128 and cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert 405e9 < cfg.num_parameters() < 406e9
    assert 8.0e9 < PRESETS["llama-3.1-8b"].num_parameters() < 8.1e9
    assert 70.5e9 < PRESETS["llama-3.1-70b"].num_parameters() < 70.6e9


def test_old_type_key_and_transformers5_rope_parameters():
    old = dict(META_405B, rope_scaling={**META_405B["rope_scaling"], "type": "llama3"})
    del old["rope_scaling"]["rope_type"]
    v5 = {k: v for k, v in META_405B.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    v5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}
    v5["dtype"] = "bfloat16"
    assert LlamaConfig.from_hf_dict(old) == LlamaConfig.from_hf_dict(v5) == PRESETS["llama-3.1-405b"]


def test_round_trip_through_hf_dict_and_transformers():
    import transformers
    cfg = PRESETS["llama-3.1-8b"]
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    hf = transformers.LlamaConfig.from_dict(cfg.to_hf_dict())
    assert LlamaConfig.from_hf_dict(json.loads(hf.to_json_string())) == cfg


def test_unknown_rope_type_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(META_405B, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ConfigError, match=r"config\.json.*'yarn'"):
        LlamaConfig.from_hf(path)


@pytest.mark.parametrize("change,message", [
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_invalid_geometry(change, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_dict(dict(META_405B, **change))
