"""Any checkpoint's own tokenizer: which one load_tokenizer picks, and HFTokenizer against
transformers (chat templates, BOS policy) and `tokenizers` on a small byte-level BPE trained here."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from export.errors import ConfigError, InputError
from export.hf_tokenizer import HFTokenizer
from export.tokenizer import Llama3Tokenizer, find_tokenizer, load_tokenizer
from export.tokenizer_files import copy_tokenizer_files
from runner.cli import main
from tests.conftest import hf_model, save_hf, tiny_config
from tests.export.test_tokenizer import GOLDEN

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Größe, naïve façade — 12 345 €", "你好世界 こんにちは",
          "def f(x):\n    return x + 1", "Hello there! How are you today?"] * 20
# Exercises what transformers' environment gives a template: trim_blocks / lstrip_blocks around
# tags, loop variables, tojson on non-ASCII, raise_exception, the special tokens by role.
TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {% if loop.first and message['role'] == 'system' %}[SYS {{ message['content'] | tojson }}]
    {% else %}<{{ message['role'] }}>{{ message['content'] | trim }}</s>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""
CHATS = [
    [{"role": "user", "content": "  Hi there\n"}],
    [{"role": "system", "content": "Be brief — très brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "你好"}],
]


def _train(vocab_size: int = 400, bos_processor: bool = False) -> Tokenizer:
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    if bos_processor:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def write_tokenizer(directory: Path, config: dict | None = None, bos_processor: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _train(bos_processor=bos_processor).save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": TEMPLATE}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("hf") / "tok", CONFIG)


def test_chat_template_renders_and_tokenizes_like_transformers(tok_dir):
    from transformers import PreTrainedTokenizerFast
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    ours = load_tokenizer(tok_dir)
    assert isinstance(ours, HFTokenizer)
    for messages in CHATS:
        for prompt in (True, False):
            text = reference.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=prompt,
                                                 tokenize=False)
            assert ours.render_dialog(messages, add_generation_prompt=prompt) == text
            ids = reference.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=prompt,
                                                tokenize=True, return_dict=False)
            assert ours.encode_dialog(messages, add_generation_prompt=prompt) == list(ids)
    assert "très" in ours.render_dialog(CHATS[1])  # tojson keeps non-ASCII, as transformers' does


def test_template_refusal_and_bad_messages_are_input_errors(tok_dir):
    ours = load_tokenizer(tok_dir)
    with pytest.raises(InputError, match="refuses this conversation: unknown role robot"):
        ours.encode_dialog([{"role": "robot", "content": "hi"}])
    with pytest.raises(InputError, match="message 1"):
        ours.encode_dialog([{"role": "user", "content": "hi"}, {"role": "user", "content": None}])


def test_chat_template_jinja_file_wins_and_missing_template_is_named(tmp_path):
    directory = write_tokenizer(tmp_path / "t", {**CONFIG, "chat_template": "{{ 'from config' }}"})
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(directory).render_dialog([{"role": "user", "content": "x"}]) == "[x]"
    bare = write_tokenizer(tmp_path / "bare", {"eos_token": "</s>"})
    with pytest.raises(ConfigError, match=re.escape(str(bare / "tokenizer_config.json")) + ".*no chat template"):
        load_tokenizer(bare).encode_dialog([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("config,processor,adds", [
    ({"bos_token": "<s>"}, False, False),  # nothing says to add one
    ({"bos_token": "<s>"}, True, True),  # tokenizer.json's post-processor adds it
    ({"bos_token": "<s>", "add_bos_token": True}, False, False),  # transformers' fast tokenizer ignores the flag
])
def test_bos_follows_the_tokenizer_like_transformers(tmp_path, config, processor, adds):
    from transformers import AutoTokenizer
    directory = write_tokenizer(tmp_path / "t", config, bos_processor=processor)
    ours = load_tokenizer(directory)
    text = "Hello there, fox."
    assert (ours.encode(text)[:1] == [1]) == adds
    assert ours.encode(text, bos=False)[:1] != [1]
    assert ours.encode(text) == AutoTokenizer.from_pretrained(directory)(text).input_ids


def test_special_token_strings_in_plain_text_stay_text(tok_dir):
    ours = load_tokenizer(tok_dir)
    ids = ours.encode("a</s>b", bos=False)
    assert 2 not in ids and ours.decode(ids) == "a</s>b"
    assert ours.stop_ids == frozenset({2}) and (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 3)


def test_load_tokenizer_decides_by_content(tmp_path, tok_dir):
    llama = tmp_path / "llama"
    copy_tokenizer_files(llama)
    assert isinstance(load_tokenizer(llama), Llama3Tokenizer)  # tiktoken tokenizer.model wins
    renamed = tmp_path / "any.model"
    shutil.copyfile(llama / "tokenizer.model", renamed)
    assert isinstance(load_tokenizer(renamed), Llama3Tokenizer)
    assert isinstance(load_tokenizer(tok_dir / "tokenizer.json"), HFTokenizer)
    # A SentencePiece-style binary tokenizer.model is not Llama 3's: the tokenizer.json beside it serves.
    both = tmp_path / "both"
    shutil.copytree(tok_dir, both)
    (both / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    assert isinstance(load_tokenizer(both), HFTokenizer)
    (both / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=re.escape(str(both / "tokenizer.model")) + ".*tokenizer.json"):
        load_tokenizer(both)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(empty / "tokenizer.json")) + " not found"):
        load_tokenizer(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(str(broken / "tokenizer.json"))):
        load_tokenizer(broken)


def test_vocab_mismatch_is_one_line_naming_the_file(tok_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=re.escape(str(tok_dir / "tokenizer.json")) + r".*\d+ ids.*vocab_size is 256"):
        load_tokenizer(tok_dir, vocab_size=256)
    checkpoint = save_hf(hf_model(tiny_config()), tmp_path / "ckpt")  # vocab 256
    shutil.copy(tok_dir / "tokenizer.json", checkpoint)
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(checkpoint / "tokenizer.json") in err
    # FP8 calibration tokenizes the shipped text with it: ids past the vocabulary name the file.
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "art"), "--quant", "fp8",
                 "--fp8-recipe", "all", "--calib-samples", "1", "--calib-seq-len", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(checkpoint / "tokenizer.json") in err and not (tmp_path / "art").exists()


def test_llama3_tokenizer_json_through_the_generic_path_equals_tiktoken(tmp_path):
    """The repaired Llama 3 tokenizer.json read as any HF tokenizer gives tiktoken's ids."""
    directory = tmp_path / "llama"
    copy_tokenizer_files(directory)
    (directory / "tokenizer.model").unlink()
    generic = load_tokenizer(directory)
    assert isinstance(generic, HFTokenizer) and find_tokenizer(directory).main == directory / "tokenizer.json"
    for text, ids in GOLDEN.values():
        assert generic.encode(text, bos=False) == ids
        assert generic.encode(text) == [128000, *ids]  # Llama 3's post-processor adds <|begin_of_text|>


def test_artifact_carries_the_checkpoints_tokenizer(tok_dir, tmp_path, capsys):
    """Exported, the artifact holds the checkpoint's tokenizer files (hashed), and tokenize uses them."""
    from export.manifest import load_manifest
    from export.onnx_export import ExportOptions, export_artifact
    checkpoint = save_hf(hf_model(tiny_config(vocab_size=400)), tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, checkpoint)
    artifact = export_artifact(checkpoint, tmp_path / "art", ExportOptions(max_seq_len=32))
    manifest = load_manifest(artifact, verify_hashes=True)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest.files)
    assert not (artifact / "tokenizer.model").exists()
    assert manifest.source["tokenizer"] == "Hugging Face tokenizer.json (checkpoint)"
    assert main(["tokenize", "--tokenizer", str(artifact), "--text", "Hello there"]) == 0
    assert json.loads(capsys.readouterr().out) == load_tokenizer(tok_dir).encode("Hello there")
