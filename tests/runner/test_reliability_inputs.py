"""Nothing silently wrong, second pass (issue 20): what a user gives llama405 — flags, checkpoint
contents, sizes, paths — is either used or refused with one line naming it, exit 2, and every
user file is left byte for byte as it was.

Each case runs the real entry point (`llama405`'s main) in-process, as tests/runner/
test_reliability.py does; no case exports an artifact (each refusal comes before one would be
written), so the file stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import hf_model, save_hf, tiny_config
from tests.runner.test_reliability import export_argv, one_line, run, tree


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_hf(hf_model(tiny_config()), tmp_path_factory.mktemp("rel-in") / "ckpt")


@pytest.fixture
def user_files(checkpoint, tmp_path) -> Path:
    """A folder of the user's: a copy of the checkpoint, a stand-in artifact folder, a note."""
    shutil.copytree(checkpoint, tmp_path / "ck")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path


def refused(capsys, root: Path, argv: list[str], message: str, code: int = 2) -> str:
    """Run argv (with {root} filled in); assert the exit code, the one line, and that nothing
    under root changed."""
    before = tree(root)
    got, _, err = run(capsys, *[a.format(root=root) for a in argv])
    line = one_line(err)
    assert got == code and message in line, (argv, err)
    assert tree(root) == before, argv
    return line


# -- 1. flags that cannot take effect are refused where they are parsed ----------------------

@pytest.mark.parametrize("argv,message", [
    (["build", "--artifact", "{root}/art", "--tp", "2", "--dtype", "float16", "--quant", "fp8"],
     "argument --tp: the --artifact fixes it"),
    (["build", "--artifact", "{root}/art", "--quant", "fp8"], "argument --quant: the --artifact fixes it"),
    (["build", "--artifact", "{root}/art", "--force"], "argument --force: the --artifact fixes it"),
    (["build", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--stage", "onnx", "--trt", "rtx"],
     "argument --trt: shapes the engines, which --stage onnx does not build"),
    (["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--quant", "none", "--fp8-recipe", "meta",
      "--calib-text", "/nonexistent"], "argument --fp8-recipe: applies only with --quant fp8"),
    (["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--calib-samples", "4"],
     "argument --calib-samples: applies only with --quant fp8"),
    (["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--quant", "fp8", "--calib-text", "none",
      "--calib-seq-len", "64"], "argument --calib-seq-len: applies only when FP8 scales are calibrated"),
    (["generate", "--artifact", "{root}/art", "--backend", "ort", "--prompt", "hi", "--tp", "4", "--kv-cache", "concat",
      "--max-seq-len", "1000"], "argument --tp: the --artifact fixes it"),
    (["logits", "--artifact", "{root}/art", "--backend", "ort", "--tokens", "1", "--out", "{root}/x.npy",
      "--max-seq-len", "64"], "argument --max-seq-len: the --artifact fixes it"),
    (["generate", "--checkpoint", "{root}/ck", "--prompt", "hi", "--seed", "3"],
     "argument --seed: greedy decoding (--temperature 0) does not sample"),
    (["plan", "--preset", "llama-3.1-8b", "--fp8-recipe", "meta"], "--fp8-recipe: applies only with --quant fp8"),
    (["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--quant", "fp8", "--fp8-exclude",
      "model.layer.*.mlp.*"], "--fp8-exclude 'model.layer.*.mlp.*' matches none of this model's quantizable "
                              "linears (model.layers.0.self_attn.q_proj"),
], ids=["build-artifact-export-flags", "build-artifact-quant", "build-artifact-force", "stage-onnx-engine-flag",
        "fp8-flags-without-fp8", "calib-without-fp8", "calib-size-without-calibration", "generate-artifact-layout",
        "logits-artifact-max-seq-len", "greedy-seed", "plan-fp8-recipe-without-fp8", "fp8-exclude-matches-nothing"])
def test_a_flag_that_cannot_take_effect_is_refused(user_files, capsys, argv, message):
    line = refused(capsys, user_files, argv, message)
    assert "drop it" in line or "fix the pattern" in line
    assert not (user_files / "new").exists()


def test_fp8_that_would_quantize_nothing_is_refused(user_files, capsys):
    """Meta's recipe (the default) keeps the first and last layer 16-bit: on this 2-layer model
    nothing is left to quantize, and an artifact labelled FP8 with no FP8 GEMM is refused."""
    line = refused(capsys, user_files, ["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--quant", "fp8"],
                   "--quant fp8 quantizes none of this 2-layer model's linears (--fp8-recipe meta keeps attention "
                   "and the first and last layer 16-bit); pass --fp8-recipe all")
    assert not (user_files / "new").exists() and "--quant none" in line
    argv = ["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--quant", "fp8", "--fp8-recipe", "all",
            "--fp8-exclude", "*.mlp.*", "--fp8-exclude", "*.self_attn.*"]
    refused(capsys, user_files, argv, "(the exclusions cover every linear)")


# -- 2. checkpoint contents Hugging Face or safetensors refuse ------------------------------

def _index(ck: Path) -> dict:
    return json.loads((ck / "model.safetensors.index.json").read_text())


def _write_index(ck: Path, index: dict) -> None:
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_of(ck: Path, name: str) -> Path:
    return ck / _index(ck)["weight_map"][name]


def _rewrite_shard(ck: Path, name: str, change) -> None:
    from safetensors.torch import load_file, save_file
    shard = _shard_of(ck, name)
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _twice_in_two_shards(ck: Path) -> None:
    from safetensors.torch import save_file
    save_file({"model.norm.weight": torch.ones(64), "model.layers.9.extra": torch.ones(1)},
              str(ck / "extra.safetensors"))
    index = _index(ck)
    index["weight_map"]["model.layers.9.extra"] = "extra.safetensors"  # so the shard is part of the checkpoint
    _write_index(ck, index)


def _not_in_index(ck: Path) -> None:
    from safetensors.torch import save_file
    save_file({"model.layers.0.mlp.up_proj.weight_copy": torch.ones(2), "model.norm.bias": torch.ones(64)},
              str(ck / "extra.safetensors"))
    index = _index(ck)
    index["weight_map"]["model.layers.0.mlp.up_proj.weight_copy"] = "extra.safetensors"
    _write_index(ck, index)


def _twice_in_one_header(ck: Path) -> None:
    name = "model.norm.weight"
    shard = _shard_of(ck, name)
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + length].decode().rstrip()  # safetensors pads the header with spaces
    entry = json.dumps(json.loads(header)[name])
    doubled = header[:-1] + f', "{name}": {entry}' + "}"  # the same key again, pointing at the same bytes
    shard.write_bytes(len(doubled).to_bytes(8, "little") + doubled.encode() + raw[8 + length:])


def _fp8_without_scale(ck: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_shard(ck, name, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))


def _kv_heads_duplicated_in_layer_0_only(ck: Path) -> None:
    head_dim = 64 // 8
    for proj in ("k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"

        def copy_head(t, name=name):
            w = t[name].clone()
            w[head_dim:2 * head_dim] = w[:head_dim]  # 2 KV heads: head 1 = head 0
            t[name] = w
        _rewrite_shard(ck, name, copy_head)


def _partial_rotary(ck: Path) -> None:
    config = json.loads((ck / "config.json").read_text())
    config["partial_rotary_factor"] = 0.5
    (ck / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (_twice_in_two_shards, "is stored in both"),
    (_not_in_index, "holds tensor 'model.norm.bias' but model.safetensors.index.json does not list it"),
    (_twice_in_one_header, "tensor 'model.norm.weight' appears twice in the safetensors header"),
    (_fp8_without_scale, "model.layers.1.mlp.up_proj.weight_scale is missing and config.json has no "
                         "quantization_config"),
    (_kv_heads_duplicated_in_layer_0_only, "layer 0 stores each of its KV heads 2 time(s) but layer 1 1 time(s)"),
    (_partial_rotary, "partial_rotary_factor=0.5 is not implemented"),
], ids=["twice-in-two-shards", "not-in-index", "twice-in-one-header", "fp8-without-scale", "kv-dup-mix",
        "partial-rotary"])
def test_checkpoint_contents_hf_refuses_are_refused_by_name(user_files, capsys, damage, message):
    damage(user_files / "ck")
    refused(capsys, user_files, export_argv(user_files / "ck", user_files / "new"), message)
    assert not (user_files / "new").exists()


def test_a_shard_replaced_while_the_export_reads_it_is_refused(user_files, capsys, monkeypatch):
    """Another process swaps a shard (a new inode at the same path) after the export read its header:
    the next read of it (here layer 1's k_proj, while the KV-head layout is checked) is refused."""
    from export.safetensors_file import SafetensorsFile
    original, swapped = SafetensorsFile.read, []

    def read_then_swap(self, name, *args, **kwargs):
        if not swapped and name == "model.layers.1.self_attn.k_proj.weight":
            copy = self.path.with_name(self.path.name + ".new")
            shutil.copy2(self.path, copy)
            os.replace(copy, self.path)
            swapped.append(self.path)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(SafetensorsFile, "read", read_then_swap)
    before = tree(user_files)
    code, _, err = run(capsys, *export_argv(user_files / "ck", user_files / "new"))
    assert swapped and code == 2 and f"{swapped[0]}: the file changed while llama405 was reading it" in one_line(err)
    assert tree(user_files) == before and not (user_files / "new").exists()
    assert not [p for p in user_files.iterdir() if p.name.startswith(".new.")]


# -- 3. every size a user controls is bounded before anything is allocated -------------------

def _config_change(**changes):
    def change(ck: Path) -> None:
        config = json.loads((ck / "config.json").read_text())
        config.update(changes)
        (ck / "config.json").write_text(json.dumps(config))
    return change


@pytest.mark.parametrize("change,argv,message", [
    (_config_change(max_position_embeddings=2**40), ["export", "--checkpoint", "{root}/ck", "--out", "{root}/new"],
     "max_position_embeddings=1099511627776 exceeds 1048576: caches and RoPE tables are allocated for every position"),
    (_config_change(vocab_size=2**30), ["generate", "--checkpoint", "{root}/ck", "--prompt", "hi"],
     "vocab_size=1073741824 exceeds 16777216"),
    (None, ["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--quant", "fp8", "--calib-seq-len",
            "100000"],
     "argument --calib-seq-len: 100000 exceeds 8192"),
    (None, ["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--quant", "fp8", "--calib-samples",
            "1000000"], "argument --calib-samples: 1000000 exceeds 4096"),
    (None, ["generate", "--checkpoint", "{root}/ck", "--prompt", "hi", "--temperature", "1", "--seed", "-1"],
     "argument --seed: -1 must be 0..4294967295"),
    (None, ["synth", "--preset", "llama-3.1-tiny", "--seed", str(2**32), "--out", "{root}/s"],
     "argument --seed: 4294967296 exceeds 4294967295"),
    (None, ["generate", "--artifact", "{root}/art", "--backend", "ort", "--prompt", "hi", "--ort-threads", "100000"],
     "argument --ort-threads: 100000 exceeds"),
    (None, ["generate", "--checkpoint", "{root}/ck", "--prompt", "hi", "--max-new-tokens", str(2**40)],
     "argument --max-new-tokens: 1099511627776 must be >= 0 and at most 1048576"),
    (None, ["export", "--checkpoint", "{root}/ck", "--out", "{root}/new", "--max-batch", "100000"],
     "--max-batch 100000 exceeds 4096: every cache is allocated max_batch rows deep"),
    (None, ["generate", "--checkpoint", "{root}/ck", "--prompt", "hi", "--max-seq-len", str(2**40)],
     "--max-seq-len 1099511627776 exceeds 1048576"),
    (None, ["parity", "--artifact", "{root}/art", "--steps", str(2**40)], "--steps 1099511627776 exceeds 1048576"),
], ids=["max-position-embeddings", "vocab-size", "calib-seq-len", "calib-samples", "seed-negative", "seed-64-bit",
        "ort-threads", "max-new-tokens", "max-batch", "max-seq-len", "parity-steps"])
def test_every_user_size_is_bounded_before_allocation(user_files, capsys, change, argv, message):
    if change is not None:
        change(user_files / "ck")
    refused(capsys, user_files, argv, message)
    assert not (user_files / "new").exists()


# -- 4. lines that say what is wrong --------------------------------------------------------

def _unsupported_dtype(ck: Path) -> None:
    header = json.dumps({"model.norm.weight_u16": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (ck / "extra.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    index = _index(ck)
    index["weight_map"]["model.norm.weight_u16"] = "extra.safetensors"
    _write_index(ck, index)


def _shard_is_a_folder(ck: Path) -> None:
    shard = _shard_of(ck, "model.norm.weight")
    shard.unlink()
    shard.mkdir()


@pytest.mark.parametrize("damage,argv,message", [
    (_unsupported_dtype, export_argv(Path("{root}/ck"), Path("{root}/new")),
     "'model.norm.weight_u16' is stored as U16, a dtype llama405 does not support"),
    (_shard_is_a_folder, export_argv(Path("{root}/ck"), Path("{root}/new")), "is a folder, not a file"),
    (None, ["generate", "--artifact", "{root}/missing", "--backend", "ort", "--prompt", "hi"],
     "{root}/missing: no such folder; pass the folder `llama405 export --out` wrote"),
    (None, ["verify", "{root}/notes.txt"], "notes.txt: is a file, not an artifact folder"),
    (None, export_argv(Path("{root}/ck"), Path("{root}/new"), "--tp", "2", "--ranks", "1-0"),
     "'1-0' is reversed; write the range low-high (0-1)"),
    (None, export_argv(Path("{root}/ck"), Path("{root}/" + "a" * 240)),
     "its last name is 240 bytes; llama405 writes siblings named .NAME.tmp-PID-XXXXXXXX beside it, so at most 223"),
], ids=["unsupported-dtype", "shard-folder", "missing-artifact", "artifact-is-a-file", "reversed-ranks",
        "long-out-name"])
def test_a_line_says_what_is_wrong(user_files, capsys, damage, argv, message):
    if damage is not None:
        damage(user_files / "ck")
    line = refused(capsys, user_files, [str(a) for a in argv], message.format(root=user_files))
    assert "truncated or corrupt" not in line and "run `llama405 export` again" not in line


def test_out_dot_names_the_folder_itself(user_files, capsys, monkeypatch):
    """`--out .` in an empty folder is that folder: its lock lands beside it, so it stays empty."""
    empty = user_files / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    refused(capsys, user_files, export_argv(user_files / "ck", Path(".")),
            f"--out {empty}: already exists; pass --force to replace it")


def test_a_binary_tokenizer_is_not_echoed(user_files, capsys):
    binary = user_files / "tokenizer.model"
    line_of_bytes = bytes(b for b in range(256) if b not in b"\r\n") * 11  # 2.8 KB, no line break
    binary.write_bytes(b"IQ== 0\n" + line_of_bytes)  # a tiktoken-looking first line, then the bytes
    line = refused(capsys, user_files, ["tokenize", "--tokenizer", str(binary), "--text", "hi"],
                   "is not a tiktoken BPE file")
    assert len(line) < 600 and "more characters" in line


def test_a_full_disk_names_the_file(user_files, capsys, monkeypatch):
    """os.write raises ENOSPC without a file name; the line names the data file being written."""
    import export.weight_stream as weight_stream
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("model.onnx.data"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(weight_stream.os, "write", full)
    line = refused(capsys, user_files, export_argv(user_files / "ck", user_files / "new"), "No space left on device")
    assert "rank0/model.onnx.data: No space left on device" in line and "a file" not in line


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    """`llama405 plan ... | head -1`: the reader goes away; no traceback, exit 141 (or 0 if all was written)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "plan", "--preset", "llama-3.1-8b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the child has printed anything
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b"", err


def test_engine_plan_gets_the_umask_mode(tmp_path):
    """rank{r}/engine.plan is written like every other artifact file (0666 less the umask), not 0600."""
    from engines.build import _write_atomically
    path = tmp_path / "engine.plan"
    _write_atomically(path, memoryview(np.arange(4, dtype=np.uint8)))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
