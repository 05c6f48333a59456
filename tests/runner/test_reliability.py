"""Nothing lost, nothing silently wrong: the hostile-user cases, each one line and exit 2 (or the
documented code), with nothing deleted that llama405 did not write.

Every case runs the real entry point (`llama405`'s main) in-process; a bug there ends with its
traceback and exit code 70, which `one_line` refuses, so a traceback cannot reach a user unnoticed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from export.output_dir import exclusive_writer
from runner.cli import main as llama405
from tests.conftest import hf_model, save_hf, tiny_config

MAX_SEQ = 32


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = llama405([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_hf(hf_model(tiny_config()), tmp_path_factory.mktemp("rel") / "ckpt")


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel-art") / "art"
    assert llama405(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--tp", "1",
                     "--dtype", "float32", "--max-seq-len", str(MAX_SEQ)]) == 0
    return out


def export_argv(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "float32",
            "--max-seq-len", str(MAX_SEQ), *extra]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- --force never deletes user data ---------------------------------------------------------

def test_force_refuses_the_checkpoint_itself_and_its_parent(checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "models" / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (tmp_path / "models" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    for out in (ckpt, ckpt.parent, ckpt / "sub"):
        code, _, err = run(capsys, *export_argv(ckpt, out, "--force"))
        assert code == 2 and "which this command reads" in one_line(err), out
    code, _, err = run(capsys, *export_argv(ckpt, ckpt))  # without --force: no advice to pass it
    assert code == 2 and "--force" not in one_line(err).split("choose")[0].split("reads")[0]
    assert tree(tmp_path) == before


def test_force_refuses_a_user_folder_and_a_file(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep")
    for out, message in ((folder, "is not a finished llama405 artifact"), (a_file, "is not a folder"),
                         (tmp_path / "report.txt" / "art", "a file stands where a folder must be made")):
        code, _, err = run(capsys, *export_argv(checkpoint, out, "--force"))
        assert code == 2 and message in one_line(err), (out, err)
    assert (folder / "cat.jpg").read_bytes() == b"\xff\xd8" and a_file.read_text() == "keep"
    assert not any(p.name.startswith(".photos.") for p in tmp_path.iterdir())


def test_force_replaces_an_artifact_or_an_empty_folder(checkpoint, artifact, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, *export_argv(checkpoint, empty, "--force"))[0] == 0
    copy = tmp_path / "old-art"
    shutil.copytree(artifact, copy)
    assert run(capsys, *export_argv(checkpoint, copy, "--force"))[0] == 0
    assert tree(copy)["manifest.json"] == tree(artifact)["manifest.json"]
    mode = (copy.stat().st_mode & 0o777)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old-art"]  # no .old-PID, no .lock


def test_synth_force_replaces_only_what_synth_wrote(tmp_path, capsys):
    synth = ["synth", "--preset", "llama-3.1-tiny", "--layers", "1", "--vocab", "512", "--dtype", "float32"]
    out = tmp_path / "ck"
    assert run(capsys, *synth, "--out", out)[0] == 0
    assert run(capsys, *synth, "--out", out, "--force", "--seed", "1")[0] == 0
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    code, _, err = run(capsys, *synth, "--out", user, "--force")
    assert code == 2 and "is not a checkpoint llama405 synth wrote" in one_line(err)
    code, _, err = run(capsys, "synth", "--config", user / "config.json", "--out", user, "--force")
    assert code == 2 and "which this command reads" in one_line(err)
    assert (user / "config.json").is_file()


# -- silent wrong results: config fields and tensors the model does not implement ------------

def _checkpoint_with(checkpoint: Path, tmp_path: Path, **config_changes) -> Path:
    copy = tmp_path / "ck"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in config_changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not implemented"),
    (dict(attention_bias=True), "attention_bias=True is not implemented"),
    (dict(mlp_bias=True), "mlp_bias=True is not implemented"),
    (dict(num_hidden_layers=True), "num_hidden_layers=True must be an integer"),
    (dict(hidden_size="64"), "hidden_size='64' must be an integer"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps='1e-5' must be a finite number"),
    (dict(rope_scaling="llama3"), "rope_scaling='llama3' must be a JSON object"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": -8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}), "factor >= 1"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64, "beta_fast": 32}), "beta_fast"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings='no' must be true or false"),
    (dict(eos_token_id=["2"]), "eos_token_id"),
], ids=["gelu", "attention-bias", "mlp-bias", "layers-bool", "string-int", "string-float", "rope-string",
        "rope-negative-factor", "rope-unknown-key", "tie-string", "eos-string"])
def test_config_fields_llama405_does_not_implement_are_refused(checkpoint, tmp_path, capsys, changes, message):
    copy = _checkpoint_with(checkpoint, tmp_path, **changes)
    code, _, err = run(capsys, *export_argv(copy, tmp_path / "art"))
    assert code == 2 and message in one_line(err) and "config.json" in err
    assert not (tmp_path / "art").exists()


def test_a_config_that_is_not_an_object_is_refused(checkpoint, tmp_path, capsys):
    copy = _checkpoint_with(checkpoint, tmp_path)
    (copy / "config.json").write_text("[1, 2]")
    code, _, err = run(capsys, *export_argv(copy, tmp_path / "art"))
    assert code == 2 and "expected a JSON object" in one_line(err)


def _add_tensor(directory: Path, name: str, value: np.ndarray) -> None:
    from safetensors.numpy import save_file
    save_file({name: value}, str(directory / "extra.safetensors"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "extra.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name,message", [
    ("model.layers.2.mlp.down_proj.weight", "beyond num_hidden_layers=2"),
    ("model.layers.0.self_attn.q_proj.bias", "has no such tensor"),
], ids=["extra-layer", "bias"])
def test_tensors_the_model_would_ignore_are_refused_by_name(checkpoint, tmp_path, capsys, name, message):
    copy = _checkpoint_with(checkpoint, tmp_path)
    _add_tensor(copy, name, np.zeros((4, 4), dtype=np.float32))
    code, _, err = run(capsys, *export_argv(copy, tmp_path / "art"))
    line = one_line(err)
    assert code == 2 and repr(name) in line and message in line


def test_tied_config_with_a_stored_lm_head_is_a_contradiction(checkpoint, tmp_path, capsys):
    copy = _checkpoint_with(checkpoint, tmp_path, tie_word_embeddings=True)
    code, _, err = run(capsys, *export_argv(copy, tmp_path / "art"))
    assert code == 2 and "tie_word_embeddings: true" in one_line(err) and "'lm_head.weight'" in err


def test_overlapping_safetensors_offsets_are_refused(tmp_path, capsys):
    from export.errors import CheckpointError
    from export.safetensors_file import SafetensorsFile
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(24))
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        SafetensorsFile(path)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, tmp_path, capsys, value):
    from safetensors.numpy import load_file, save_file
    copy = _checkpoint_with(checkpoint, tmp_path)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = copy / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, _, err = run(capsys, *export_argv(copy, tmp_path / "art"))
    assert code == 2 and name in one_line(err) and "NaN or Inf" in err
    assert not (tmp_path / "art").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]


def test_max_seq_len_beyond_the_model_is_refused_at_export(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--checkpoint", checkpoint, "--out", tmp_path / "art",
                       "--max-seq-len", "200000")  # within the bound, beyond the model
    assert code == 2 and "max_position_embeddings (131072)" in one_line(err)


# -- tampering: verify -----------------------------------------------------------------------

@pytest.fixture
def tampered(artifact, tmp_path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(artifact, copy)
    data = copy / "rank0" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    return copy


def test_verify_names_the_flipped_file(artifact, tampered, capsys):
    code, out, _ = run(capsys, "verify", artifact)
    assert code == 0 and "every size and sha256 matches" in out
    code, _, err = run(capsys, "verify", tampered)
    assert code == 2 and "rank0/model.onnx.data: sha256 differs" in one_line(err)
    for argv in (["generate", "--artifact", tampered, "--backend", "ort", "--prompt", "hi", "--verify"],
                 ["logits", "--artifact", tampered, "--backend", "ort", "--tokens", "1,2", "--out",
                  tampered / "x.npy", "--verify"],
                 ["parity", "--artifact", tampered, "--verify"],
                 ["build", "--artifact", tampered, "--verify"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "sha256 differs" in one_line(err), argv


def test_parity_trt_where_the_engines_cannot_run_is_a_missing_requirement(artifact, tmp_path, capsys):
    """Engines on disk, but no machine here to run them (no GPU, or another architecture): exit 3."""
    copy = tmp_path / "with-engines"
    shutil.copytree(artifact, copy)
    (copy / "rank0" / "engine.plan").write_bytes(b"an engine from elsewhere")
    code, _, err = run(capsys, "parity", "--artifact", copy, "--a", "trt")
    line = one_line(err)
    assert code == 3 and line.startswith("llama405 parity: --a/--b trt: ") and "--a ort --b torch" in line


def test_build_without_verify_does_not_call_an_artifact_complete(tampered, capsys):
    code, _, err = run(capsys, "build", "--artifact", tampered)  # --trt tensorrt: missing here
    assert code == 3 and "complete" not in err and "not verified here" in err


@pytest.mark.parametrize("field,value", [("max_seq_len", 64), ("tp", 2), ("dtype", "float16"),
                                         ("kv_cache", "concat"), ("dtype", "float64"), ("tp", "1")],
                         ids=["max-seq-len", "tp", "dtype", "kv-cache", "dtype-unknown", "tp-string"])
def test_an_edited_manifest_field_is_one_line(artifact, tmp_path, capsys, field, value):
    copy = tmp_path / "edited"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["options"][field] = value  # the export options, one object (export/options.py)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "generate", "--artifact", copy, "--backend", "ort", "--prompt", "hi")
    assert code == 2 and "manifest" in one_line(err) and "re-export" in err


def test_a_manifest_that_is_a_list_is_one_line(artifact, tmp_path, capsys):
    copy = tmp_path / "listed"
    shutil.copytree(artifact, copy)
    (copy / "manifest.json").write_text("[]")
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and "not a manifest" in one_line(err)


# -- concurrency, leftovers, signals ---------------------------------------------------------

def test_a_second_export_to_the_same_out_is_refused_naming_the_writer(checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    with exclusive_writer(out):
        code, _, err = run(capsys, *export_argv(checkpoint, out))
    assert code == 2 and f"process {os.getpid()} is writing it" in one_line(err)
    assert not out.exists()


def test_stale_temporary_folders_of_dead_writers_are_removed(checkpoint, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".art.tmp-{pid}-abc"
    (stale / "rank0").mkdir(parents=True)
    old = tmp_path / f".art.old-{pid}"
    old.mkdir()
    for folder in (stale, old):  # llama405's marker: the name alone is not enough (test_reliability_outputs.py)
        (folder / ".llama405-writer").write_text(f"llama405 {pid} {socket.gethostname()}\n")
    code, _, err = run(capsys, *export_argv(checkpoint, tmp_path / "art"))
    assert code == 0 and f"removed {stale}" in err and f"(process {pid})" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_sigterm_mid_export_leaves_nothing_behind(tmp_path):
    """A real process, terminated while it streams weights: exit 143, one line, no temp folders."""
    ckpt = tmp_path / "ck"
    assert llama405(["synth", "--preset", "llama-3.1-tiny", "--layers", "6", "--dtype", "float32",
                     "--out", str(ckpt)]) == 0
    private_tmp = tmp_path / "tmp"  # the export's own TMPDIR: its trace folder lands here
    private_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TMPDIR": str(private_tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "export", "--checkpoint", str(ckpt), "--out",
                             str(tmp_path / "art"), "--dtype", "float32", "--max-seq-len", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert one_line(err).endswith("terminated; nothing half-written was left behind")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "tmp"]
    assert list(private_tmp.iterdir()) == []  # the trace folder too


# -- everything else a user can get wrong: one line, never a traceback -----------------------

def test_logits_out_writes_exactly_the_named_file(artifact, tmp_path, capsys):
    out = tmp_path / "logits.bin"
    code, stdout, _ = run(capsys, "logits", "--artifact", artifact, "--backend", "ort", "--tokens", "1,2,3",
                          "--out", out)
    assert code == 0 and f"wrote {out}" in stdout
    assert out.is_file() and not Path(str(out) + ".npy").exists()
    assert np.load(out).shape == (1, 3, 256)


def test_a_full_disk_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """The disk fills up after the free-space check passed (another writer took the space)."""
    import errno

    from export.weight_stream import DataWriter

    def full(self, buffer):
        raise OSError(errno.ENOSPC, "No space left on device", "rank0/model.onnx.data")

    monkeypatch.setattr(DataWriter, "put", full)
    code, _, err = run(capsys, *export_argv(checkpoint, tmp_path / "art"))
    assert code == 2 and "No space left on device; the disk is full" in one_line(err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")] and not (tmp_path / "art").exists()


@pytest.mark.parametrize("argv,message", [
    (["generate", "--artifact", "{art}", "--backend", "ort", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["logits", "--artifact", "{art}", "--backend", "ort", "--tokens", "99999999999999999999", "--out", "{tmp}/x.npy"],
     "is not a token id"),
    (["logits", "--artifact", "{art}", "--backend", "ort", "--tokens", "1", "--out", "{tmp}/f/x.npy"], "f: File exists"),
    (["parity", "--artifact", "{art}", "--steps", "1", "--report", "{tmp}/f/r.json"], "f: File exists"),
    (["generate", "--checkpoint", "{ckpt}", "--prompt", "hi", "--max-seq-len", "-1"], "--max-seq-len -1"),
    (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/f/art"], "f: File exists"),
    (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/a", "--max-batch", "0"], "--max-batch 0"),
    (["verify", "{tmp}"], "no manifest"),
    (["inspect", "{tmp}"], "no manifest"),
    (["build", "--artifact", "{art}", "--trt", "rtx", "--target", "sm90"], "no sm90"),
    (["plan", "--preset", "llama-3.1-8b", "--tp", "3"], "3"),
    (["tokenize", "--tokenizer", "{tmp}/none.model", "--text", "hi"], "none.model"),
    (["synth", "--preset", "llama-3.1-tiny", "--layers", "0", "--out", "{tmp}/s"], "--layers 0"),
], ids=["temperature-nan", "huge-token", "logits-out-under-file", "report-under-file", "torch-max-seq-len",
        "export-out-under-file", "max-batch-0", "verify-not-artifact", "inspect-not-artifact", "rtx-sm90",
        "plan-bad-tp", "tokenizer-missing", "synth-layers-0"])
def test_bad_input_is_one_line_and_exit_2(checkpoint, artifact, tmp_path, capsys, argv, message):
    (tmp_path / "f").write_text("a file where a folder is expected")
    values = {"art": str(artifact), "ckpt": str(checkpoint), "tmp": str(tmp_path)}
    code, _, err = run(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and message in one_line(err), err


def test_an_index_whose_weight_map_is_not_file_names_is_one_line(checkpoint, tmp_path, capsys):
    copy = _checkpoint_with(checkpoint, tmp_path)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = 3
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, *export_argv(copy, tmp_path / "art"))
    assert code == 2 and "weight_map must map tensor names to shard file names" in one_line(err)


def test_ctrl_c_is_one_line_and_exit_130(checkpoint, tmp_path, capsys, monkeypatch):
    import export.onnx_export as onnx_export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "write_weights", interrupted)
    code, _, err = run(capsys, *export_argv(checkpoint, tmp_path / "art"))
    assert code == 130 and one_line(err).endswith("interrupted; nothing half-written was left behind")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
