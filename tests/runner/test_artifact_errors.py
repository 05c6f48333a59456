"""Bad input on an exported artifact: one stderr line naming the file or value
and the fix, exit code 2, nothing written. Every test that damages an artifact works on its own
copy of one shared TP2 x PP2 static float32 artifact (max_seq_len 32) of conftest's checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.errors import ArtifactError
from export.manifest import load_manifest
from runner.backends.ort import OrtBackend
from runner.cli import main
from tests.export.test_export_artifact import MAX_SEQ_LEN, shared_artifact

VICTIM = "rank1/model.onnx.data"


@pytest.fixture
def artifact(hf_checkpoint, tmp_path_factory) -> Path:
    """The shared artifact itself: read-only."""
    checkpoint, _ = hf_checkpoint
    return shared_artifact(tmp_path_factory, checkpoint, tp=2, pp=2, kv_cache="static", dtype="float32")


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(artifact, tmp_path / "art"))


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def logits(capsys, artifact: Path, out: Path, tokens: str = "1,17,42"):
    code, err = run(capsys, "logits", "--artifact", artifact, "--backend", "ort", "--tokens", tokens, "--out", out)
    if code == 2:
        assert not out.exists()  # nothing half-written
    return code, err


def one_line(err: str) -> bool:
    return len(err.splitlines()) == 1 and err.startswith("llama405 ")


def test_the_intact_copy_loads(copy, tmp_path, capsys):
    assert logits(capsys, copy, tmp_path / "l.npy")[0] == 0
    assert load_manifest(copy, verify_hashes=True).tp == 2


def test_missing_rank_file(copy, tmp_path, capsys):
    (copy / VICTIM).unlink()
    code, err = logits(capsys, copy, tmp_path / "l.npy")
    assert code == 2 and one_line(err), err
    assert str(copy / VICTIM) in err and "missing" in err and "re-export" in err


def test_truncated_data_file(copy, tmp_path, capsys):
    path = copy / VICTIM
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    code, err = logits(capsys, copy, tmp_path / "l.npy")
    assert code == 2 and one_line(err), err
    assert str(path) in err and f"{size - 100} bytes" in err and str(size) in err and "re-export" in err


def test_missing_manifest(copy, tmp_path, capsys):
    (copy / "manifest.json").unlink()
    code, err = logits(capsys, copy, tmp_path / "l.npy")
    assert code == 2 and one_line(err) and "manifest.json" in err and "llama405 export" in err, err


def test_tampered_bytes_of_the_same_size_need_hash_verification(copy, tmp_path, capsys):
    path = copy / VICTIM
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # Sizes only (every load): not detected. The CLI has no flag to ask for hashes, so
    # `llama405 logits/generate` serve the tampered weights.
    load_manifest(copy)
    assert logits(capsys, copy, tmp_path / "l.npy")[0] == 0
    # Hashes on request: detected, naming the file and the fix.
    with pytest.raises(ArtifactError, match="sha256 differs") as caught:
        load_manifest(copy, verify_hashes=True)
    assert str(path) in str(caught.value) and "re-export" in str(caught.value)
    with pytest.raises(ArtifactError, match=VICTIM):
        OrtBackend(copy, verify_hashes=True)


CONFIG_REASON = ("the artifact loader never checks manifest.json's config against the rank graphs "
                 "(nor against source.config_sha256, which the export records): {}")


@pytest.mark.parametrize("key,value", [
    ("hidden_size", 128),
    ("vocab_size", 512),
    ("num_key_value_heads", 4),
])
def test_artifact_from_another_config_is_refused(copy, tmp_path, capsys, key, value):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"][key] = value
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    code, err = logits(capsys, copy, tmp_path / "l.npy")
    assert code == 2 and one_line(err), err
    assert "manifest.json" in err or "model.onnx" in err, err
    assert "re-export" in err, err


def test_prompt_too_long_for_max_seq_len(artifact, capsys):
    # Refused before the prompt is tokenized (this cut-vocabulary model would refuse Llama 3's ids).
    code, err = run(capsys, "generate", "--artifact", artifact, "--backend", "ort", "--prompt", "Hello world",
                    "--max-new-tokens", str(MAX_SEQ_LEN + 8))
    assert code == 2 and one_line(err), err
    assert f"--max-new-tokens {MAX_SEQ_LEN + 8}" in err and f"max_seq_len={MAX_SEQ_LEN}" in err
    assert "--max-seq-len" in err  # the fix: re-export with a larger one


def test_too_many_tokens_for_max_seq_len(artifact, tmp_path, capsys):
    tokens = ",".join(["1"] * (MAX_SEQ_LEN + 1))
    code, err = logits(capsys, artifact, tmp_path / "l.npy", tokens)
    assert code == 2 and one_line(err), err
    assert f"needs {MAX_SEQ_LEN + 1} cache slots" in err and f"max_seq_len={MAX_SEQ_LEN}" in err


@pytest.mark.parametrize("tokens,bad", [("1,999999", "999999"), ("1,-5", "-5"), ("1,256", "256")])
def test_token_id_outside_the_vocabulary(artifact, tmp_path, capsys, tokens, bad):
    code, err = logits(capsys, artifact, tmp_path / "l.npy", tokens)
    assert code == 2 and one_line(err), err
    assert f"token id {bad} is outside the vocabulary 0..255" in err


def _rewrite(copy: Path, change) -> None:
    raw = json.loads((copy / "manifest.json").read_text())
    change(raw)
    (copy / "manifest.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def test_per_sequence_writes_are_recorded_and_an_artifact_without_them_is_refused_for_them(copy):
    """Artifacts from before per-sequence cache slots (on users' disks) record no write layout:
    they read as lockstep, and what needs rows at their own lengths refuses them."""
    from export.manifest import CACHE_WRITES, Manifest, options_digest
    manifest = load_manifest(copy)
    assert manifest.cache_writes == "per_sequence"
    manifest.require_per_sequence_writes(copy, "continuous batching")

    def as_older_export(raw):  # no record, and the fingerprint such an exporter wrote
        del raw[CACHE_WRITES]
        raw["source"]["options_sha256"] = options_digest(Manifest.from_json(json.dumps(raw), "old"))
    _rewrite(copy, as_older_export)
    older = load_manifest(copy)
    assert older.cache_writes == "lockstep"
    with pytest.raises(ArtifactError, match="exported before per-sequence cache slots.*re-export") as caught:
        older.require_per_sequence_writes(copy, "continuous batching")
    assert str(copy) in str(caught.value) and "continuous batching" in str(caught.value)


@pytest.mark.parametrize("value,message", [("lockstep", "differ from what the rank graphs were exported with"),
                                           ("sideways", "kv_cache_writes='sideways' must be")])
def test_an_edited_write_layout_is_refused(copy, value, message):
    from export.manifest import CACHE_WRITES
    _rewrite(copy, lambda raw: raw.update({CACHE_WRITES: value}))
    with pytest.raises(ArtifactError, match=message):
        load_manifest(copy)
