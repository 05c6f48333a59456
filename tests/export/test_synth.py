"""`llama405 synth`: random-weight HF checkpoints, streamed and written atomically."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from export import synth
from export.config import LlamaConfig
from export.errors import CheckpointError, ConfigError
from export.rank_layout import expected_shape

REPO = Path(__file__).resolve().parents[2]
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> Path:
    """The real tokenizer files, made once: copy_tokenizer_files re-parses a 9 MB JSON (~0.7 s)."""
    cache = tmp_path_factory.mktemp("tokenizer")
    synth.copy_tokenizer_files(cache)
    return cache


@pytest.fixture
def fast_tokenizer(monkeypatch, tokenizer_cache):
    """Tests about shards and atomicity copy the cached files instead of re-deriving them."""
    def copy(dest: Path) -> list[Path]:
        return [Path(shutil.copyfile(f, dest / f.name)) for f in sorted(tokenizer_cache.iterdir())]

    monkeypatch.setattr(synth, "copy_tokenizer_files", copy)


def tiny(**changes) -> LlamaConfig:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    return cfg.replace(**changes)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor, via the index, checking each shard's keys against the index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for filename in sorted(set(index["weight_map"].values())):
        with safe_open(path / filename, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for name in handle.keys():
                assert name not in tensors, f"{name} stored twice"
                assert index["weight_map"][name] == filename
                tensors[name] = handle.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    return tensors


def expected_names(cfg: LlamaConfig) -> list[str]:
    return [name for name, _ in synth.checkpoint_tensors(cfg)]


def file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tiny_checkpoint_matches_config(tmp_path, dtype, request):
    if dtype != "bfloat16":  # one run goes through the real tokenizer copy
        request.getfixturevalue("fast_tokenizer")
    cfg = tiny()
    out = synth.synthesize_checkpoint(cfg, tmp_path / "ckpt", dtype, progress=False)
    assert out == tmp_path / "ckpt"
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors.index.json",
        "model-00001-of-00001.safetensors", "tokenizer.model", "tokenizer.json",
        "tokenizer_config.json"}
    tensors = read_checkpoint(out)
    assert sorted(tensors) == sorted(expected_names(cfg))
    assert "lm_head.weight" in tensors
    for name, tensor in tensors.items():
        assert tuple(tensor.shape) == expected_shape(cfg, name), name
        assert tensor.dtype == TORCH_DTYPES[dtype], name
        assert torch.isfinite(tensor.float()).all(), name

    # Values follow the documented init: embedding ~N(0,1), linears ~N(0, 0.5/sqrt(in)),
    # norms ~1 + 0.1 N(0,1).
    assert tensors["model.embed_tokens.weight"].float().std() == pytest.approx(1.0, rel=0.05)
    down = tensors["model.layers.0.mlp.down_proj.weight"].float()
    assert down.std() == pytest.approx(synth.LINEAR_GAIN / 128 ** 0.5, rel=0.05)
    norm = tensors["model.norm.weight"].float()
    assert norm.mean() == pytest.approx(1.0, abs=0.05) and 0.05 < norm.std() < 0.15

    written = LlamaConfig.from_hf(out)
    assert written == cfg.replace(torch_dtype=dtype)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 128000
    assert generation["eos_token_id"] == [128001, 128008, 128009]
    assert (out / "tokenizer.model").stat().st_size > 2_000_000


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path, fast_tokenizer):
    cfg = tiny()
    a = synth.synthesize_checkpoint(cfg, tmp_path / "a", seed=7, progress=False)
    b = synth.synthesize_checkpoint(cfg, tmp_path / "b", seed=7, progress=False)
    c = synth.synthesize_checkpoint(cfg, tmp_path / "c", seed=8, progress=False)
    assert file_bytes(a) == file_bytes(b)
    shard = "model-00001-of-00001.safetensors"
    assert file_bytes(a)[shard] != file_bytes(c)[shard]
    ta, tc = read_checkpoint(a), read_checkpoint(c)
    # Every tensor, not just the file, depends on the seed.
    assert all(not torch.equal(ta[name], tc[name]) for name in ta)


def test_multi_shard_loads_in_transformers_with_no_missing_keys(tmp_path, fast_tokenizer):
    transformers = pytest.importorskip("transformers")
    cfg = tiny()
    out = synth.synthesize_checkpoint(cfg, tmp_path / "ckpt", "float32", seed=3,
                                      shard_bytes=100_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                      for k in range(1, len(shards) + 1)]
    tensors = read_checkpoint(out)  # every tensor in exactly one shard, index agrees
    assert sorted(tensors) == sorted(expected_names(cfg))

    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    state = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name

    # The weight scale is meant to give a non-degenerate toy model: greedy decoding wanders.
    prompt = torch.tensor([[5, 17, 300, 42, 99]])
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=24, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    assert len(set(generated[0, prompt.shape[1]:].tolist())) > 8


def test_tied_embeddings_omit_lm_head(tmp_path, fast_tokenizer):
    cfg = tiny(tie_word_embeddings=True)
    out = synth.synthesize_checkpoint(cfg, tmp_path / "ckpt", progress=False)
    tensors = read_checkpoint(out)
    assert "lm_head.weight" not in tensors
    assert "model.embed_tokens.weight" in tensors
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_plan_shards_is_greedy_and_gives_big_tensors_their_own_shard():
    tensors = [("a", (10,)), ("b", (10,)), ("big", (100,)), ("c", (5,)), ("d", (5,))]
    shards = synth.plan_shards(tensors, "float32", shard_bytes=80)
    assert [[t.name for t in s.tensors] for s in shards] == [["a", "b"], ["big"], ["c", "d"]]
    assert [s.filename for s in shards][-1] == "model-00003-of-00003.safetensors"
    c, d = shards[2].tensors
    assert (c.begin, c.nbytes, d.begin) == (0, 20, 20)
    for shard in shards:
        length = int.from_bytes(shard.header[:8], "little")
        assert length % 8 == 0 and len(shard.header) == 8 + length
        header = json.loads(shard.header[8:])
        assert header["__metadata__"] == {"format": "pt"}


def test_existing_out_is_refused_without_force_and_replaced_with_it(tmp_path, fast_tokenizer):
    out = tmp_path / "ckpt"
    synth.synthesize_checkpoint(tiny(), out, seed=1, progress=False)
    before = file_bytes(out)
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        synth.synthesize_checkpoint(tiny(), out, seed=2, progress=False)
    assert file_bytes(out) == before
    synth.synthesize_checkpoint(tiny(), out, seed=2, force=True, progress=False)
    assert file_bytes(out) != before
    assert leftovers(tmp_path, "ckpt") == []


def test_failure_mid_write_leaves_no_output_and_no_temp_dir(tmp_path, fast_tokenizer, monkeypatch):
    calls = []
    real_write = synth._write_chunk

    def failing_write(fd, offset, data):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (simulated)")
        return real_write(fd, offset, data)

    monkeypatch.setattr(synth, "_write_chunk", failing_write)
    with pytest.raises(OSError, match="simulated"):
        synth.synthesize_checkpoint(tiny(), tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()
    assert leftovers(tmp_path, "ckpt") == []


def test_failed_forced_rewrite_keeps_the_old_checkpoint(tmp_path, fast_tokenizer, monkeypatch):
    out = synth.synthesize_checkpoint(tiny(), tmp_path / "ckpt", progress=False)
    before = file_bytes(out)

    def failing_write(fd, offset, data):
        raise OSError(5, "I/O error (simulated)")

    monkeypatch.setattr(synth, "_write_chunk", failing_write)
    with pytest.raises(OSError, match="simulated"):
        synth.synthesize_checkpoint(tiny(), out, seed=9, force=True, progress=False)
    assert file_bytes(out) == before
    assert leftovers(tmp_path, "ckpt") == []


def test_too_little_disk_names_directory_and_bytes(tmp_path, fast_tokenizer, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")(10**6, 10**6 - 1000, 1000)
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(CheckpointError) as err:
        synth.synthesize_checkpoint(tiny(), tmp_path / "ckpt", progress=False)
    message = str(err.value)
    assert str(tmp_path) in message and "1,000 bytes" in message and "need" in message
    assert not (tmp_path / "ckpt").exists() and leftovers(tmp_path, "ckpt") == []


def test_unknown_dtype_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--dtype 'int8'.*bfloat16, float16, float32"):
        synth.synthesize_checkpoint(tiny(), tmp_path / "ckpt", "int8", progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_synth_config_presets_files_and_overrides(tmp_path):
    cfg = synth.synth_config("llama-3.1-405b", None, layers=2, vocab=None)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == \
        (16384, 53248, 2, 128256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny().to_hf_dict()))
    from_file = synth.synth_config(None, path, layers=None, vocab=256)
    assert from_file == tiny(vocab_size=256)
    with pytest.raises(ConfigError, match="exactly one of --preset"):
        synth.synth_config(None, None, None, None)
    with pytest.raises(ConfigError, match="exactly one of --preset"):
        synth.synth_config("llama-3.1-8b", path, None, None)
    with pytest.raises(ConfigError, match="--layers 0"):
        synth.synth_config("llama-3.1-8b", None, 0, None)
    with pytest.raises(ConfigError, match="unknown preset"):
        synth.synth_config("llama-2", None, None, None)


# Peak RSS is read from VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across
# fork+exec, so a child of pytest starts with pytest's own peak (~500 MB with transformers
# loaded) and the measurement would be blind. VmHWM belongs to the exec'd image only.
RSS_SCRIPT = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    from export.config import LlamaConfig
    from export.synth import synthesize_checkpoint

    def peak_rss():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status)[1]) * 1024

    # 8B width with the full 128256 vocabulary: the embedding alone is a 1 GB tensor, larger
    # than the whole memory budget. The FFN is cut from 14336 to 2048 only to save test time
    # (its matrices are chunked like every other tensor).
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=2048, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=True)
    baseline = peak_rss()
    # durable=False: fsync would make this a disk-speed test; memory is what it measures.
    out = synthesize_checkpoint(cfg, Path(sys.argv[1]), "float16", progress=False,
                                durable=False)
    peak = peak_rss()
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(size, baseline, peak)
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for VmHWM")
def test_peak_rss_stays_far_below_checkpoint_size(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "ckpt")], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    size, baseline, peak = map(int, result.stdout.split())
    mib = 1024 * 1024
    print(f"synth RSS: checkpoint {size / mib:.0f} MiB, baseline {baseline / mib:.0f} MiB, "
          f"peak {peak / mib:.0f} MiB (+{(peak - baseline) / mib:.0f} MiB)")
    assert size >= 1024**3
    assert peak - baseline < 300 * mib
