"""Bad input ends with one line naming the file/value and the fix, and exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from runner.cli import main


@pytest.fixture
def checkpoint(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    return copy


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def logits_args(ckpt, tmp_path, *extra):
    return ("logits", "--checkpoint", str(ckpt), "--tokens", "1,2,3", "--out", str(tmp_path / "l.npy"), *extra)


def shard_files(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_missing_shard(checkpoint, tmp_path, capsys):
    victim = shard_files(checkpoint)[-1]
    (checkpoint / victim).unlink()
    code, err = run(capsys, *logits_args(checkpoint, tmp_path))
    assert code == 2 and len(err.splitlines()) == 1 and victim in err and "missing" in err


def test_corrupt_safetensors_header(checkpoint, tmp_path, capsys):
    victim = checkpoint / shard_files(checkpoint)[0]
    victim.write_bytes(victim.read_bytes()[:20])
    code, err = run(capsys, *logits_args(checkpoint, tmp_path))
    assert code == 2 and len(err.splitlines()) == 1 and victim.name in err and "corrupt" in err


def test_config_disagrees_with_weights(checkpoint, tmp_path, capsys):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, *logits_args(checkpoint, tmp_path))
    assert code == 2 and len(err.splitlines()) == 1 and "gate_proj" in err and "[256, 64]" in err


def test_unknown_rope_type(checkpoint, tmp_path, capsys):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 2.0}
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, *logits_args(checkpoint, tmp_path))
    assert code == 2 and "config.json" in err and "'longrope'" in err


def test_tp_that_fits_no_kv_layout(checkpoint, tmp_path, capsys):
    code, err = run(capsys, *logits_args(checkpoint, tmp_path, "--tp", "3"))
    assert code == 2 and "tp=3" in err


def test_out_of_range_token_id(checkpoint, tmp_path, capsys):
    code, err = run(capsys, "logits", "--checkpoint", str(checkpoint), "--tokens", "1,99999",
                    "--out", str(tmp_path / "l.npy"))
    assert code == 2 and "99999" in err and not (tmp_path / "l.npy").exists()


def test_real_entry_point_exit_code(checkpoint, tmp_path):
    (checkpoint / "config.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "runner.cli", *logits_args(checkpoint, tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "config.json" in proc.stderr and "Traceback" not in proc.stderr
