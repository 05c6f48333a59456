"""Nothing lost, nothing silently wrong (second hostile pass, issue 20): outputs that are inputs,
`--force` and cleanup that delete only what llama405 wrote, tampering an artifact cannot hide,
signals TensorRT's callbacks cannot swallow.

Every case runs the real entry point, asserts the exit code and the one line, and that every
file the user had is byte-identical afterwards.
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

import pytest

from runner.cli import main as llama405
from tests.conftest import hf_model, save_hf, tiny_config
from tests.runner.test_reliability import one_line, run, tree  # the first pass's helpers

MAX_SEQ = 32
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_hf(hf_model(tiny_config()), tmp_path_factory.mktemp("out-ck") / "ckpt")


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:
    """TP2: two rank graphs, so a swap of them is a case."""
    out = tmp_path_factory.mktemp("out-art") / "art"
    assert llama405(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--tp", "2",
                     "--dtype", "float32", "--max-seq-len", str(MAX_SEQ)]) == 0
    return out


def export_argv(checkpoint: Path, out: Path, *extra) -> list:
    return ["export", "--checkpoint", checkpoint, "--out", out, "--tp", "2", "--dtype", "float32",
            "--max-seq-len", MAX_SEQ, *extra]


# -- outputs that are inputs -----------------------------------------------------------------

def test_an_output_that_is_an_input_is_refused_before_anything_is_written(checkpoint, artifact, tmp_path, capsys):
    ck, art = tmp_path / "ck", tmp_path / "art"
    shutil.copytree(checkpoint, ck)
    shutil.copytree(artifact, art)
    (tmp_path / "calib.txt").write_text("some calibration text")
    (tmp_path / "link.npy").symlink_to(ck / "config.json")
    os.link(art / "tokenizer.json", tmp_path / "hard.json")
    before = tree(tmp_path)
    cases = [
        (["logits", "--checkpoint", ck, "--tokens", "1,2", "--out", ck / "config.json"], "--out"),
        (["logits", "--artifact", art, "--backend", "ort", "--tokens", "1,2", "--out", art / "rank1" / "model.onnx"],
         "--out"),
        (["logits", "--checkpoint", ck, "--tokens", "1,2", "--out", tmp_path / "link.npy"], "--out"),
        (["logits", "--artifact", art, "--backend", "ort", "--tokens", "1,2", "--out", tmp_path / "hard.json"],
         "same file as"),
        (["parity", "--artifact", art, "--report", art / "manifest.json"], "--report"),
        (["parity", "--artifact", art, "--reference", ck, "--report", ck / "sub" / "r.json"], "--report"),
        (["build", "--artifact", art, "--trt", "rtx", "--timing-cache", art / "rank0" / "model.onnx.data"],
         "--timing-cache"),
        (["build", "--checkpoint", ck, "--out", ck / "art", "--stage", "onnx"], "--out"),
        ([*export_argv(ck, tmp_path / "new", "--quant", "fp8", "--calib-text", tmp_path / "new" / "calib.txt")],
         "--out"),
        (["synth", "--config", ck / "config.json", "--out", ck, "--force"], "--out"),
    ]
    for argv, flag in cases:
        code, _, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and flag in line and "this command reads" in line, (argv, err)
    assert tree(tmp_path) == before


# -- --force and cleanup remove only what llama405 wrote -------------------------------------

def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _temporary(folder: Path, pid: int, host: str | None) -> Path:
    """A folder named like llama405's temporaries; with a host, carrying its writer marker."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "mine.txt").write_text("a user's file")
    if host is not None:
        (folder / ".llama405-writer").write_text(f"llama405 {pid} {host}\n")
    return folder


def test_force_replaces_only_listed_files_and_cleanup_only_marked_temporaries(checkpoint, artifact, tmp_path,
                                                                             capsys, monkeypatch):
    work = tmp_path / "work"
    art = work / "art"
    shutil.copytree(artifact, art)
    (art / "NOTES.md").write_text("my notes")
    (art / "rank0" / "mine.txt").write_text("mine")
    (art / "plots").mkdir()
    (art / "plots" / "loss.png").write_bytes(b"\x89PNG")
    (art / "rank1" / "model.onnx.data").write_bytes(b"stale weights")  # listed: replaced
    os.chmod(art, 0o2770)
    group = os.getgid() + 4242 if os.geteuid() == 0 else os.getgid()  # root may hand it another group
    os.chown(art, -1, group)
    pid, host = _dead_pid(), socket.gethostname()
    kept = [_temporary(work / f".art.tmp-{pid}-x", pid, None),      # named like ours, no marker
            _temporary(work / f".art.old-{pid}", pid, None),
            _temporary(work / f".art.tmp-{pid}-y", pid, "elsewhere"),  # another host: its pid says nothing
            _temporary(work / f".art.tmp-{os.getppid()}-z", os.getppid(), host)]  # a live writer
    removed = _temporary(work / f".art.tmp-{pid}-w", pid, host)
    trace_tmp = tmp_path / "tmp"
    stale_trace = _temporary(trace_tmp / f"llama405-trace-{pid}-q", pid, host)
    user_trace = _temporary(trace_tmp / "llama405-trace-mine", pid, None)
    monkeypatch.setattr("tempfile.tempdir", str(trace_tmp))
    user_files = {k: v for k, v in tree(work).items() if not k.startswith(("art/", f".art.tmp-{pid}-w"))}
    user_files.update({k: v for k, v in tree(work).items() if k in ("art/NOTES.md", "art/rank0/mine.txt",
                                                                    "art/plots/loss.png")})
    code, _, err = run(capsys, *export_argv(checkpoint, art, "--force", "--tp", "1"))  # TP1: half the export
    assert code == 0, err
    assert f"removed {removed}" in err and f"removed {stale_trace}" in err and "mine" not in err
    after = tree(work)
    assert {k: after.get(k) for k in user_files} == user_files
    assert all(p.is_dir() for p in kept) and not removed.exists() and not stale_trace.exists()
    assert user_trace.is_dir() and [p.name for p in trace_tmp.iterdir()] == [user_trace.name]
    manifest = json.loads(after["art/manifest.json"])
    assert manifest["options"]["tp"] == 1 and sorted(manifest["files"]) == sorted(
        k[len("art/"):] for k in after if k.startswith("art/") and k not in user_files and k != "art/manifest.json")
    assert not (art / "rank1").exists()  # listed by the old manifest, not written by the new export: removed
    assert art.stat().st_mode & 0o7777 == 0o2770 and art.stat().st_gid == group
    assert (art / "rank0" / "model.onnx").stat().st_gid == group
    assert not (art / ".llama405-writer").exists()
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".art.tmp")) == [f".art.old-{pid}", "art"]


# -- tampering that no check may pass --------------------------------------------------------

def _edit_manifest(art: Path, edit) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))


def test_tampering_is_refused_where_the_artifact_is_read(artifact, tmp_path, capsys):
    unlisted = tmp_path / "unlisted"
    shutil.copytree(artifact, unlisted)
    _edit_manifest(unlisted, lambda m: m["files"].pop("rank1/model.onnx.data"))
    data = unlisted / "rank1" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    swapped = tmp_path / "swapped"  # two TP ranks' graphs swapped, and their manifest entries with them
    shutil.copytree(artifact, swapped)
    a, b = swapped / "rank0" / "model.onnx", swapped / "rank1" / "model.onnx"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)

    def swap(manifest):
        files = manifest["files"]
        files["rank0/model.onnx"], files["rank1/model.onnx"] = files["rank1/model.onnx"], files["rank0/model.onnx"]
    _edit_manifest(swapped, swap)
    before = {"unlisted": tree(unlisted), "swapped": tree(swapped)}
    for argv, message in (
            (["verify", unlisted], "rank1/model.onnx.data is part of the artifact but has no entry"),
            (["generate", "--artifact", unlisted, "--backend", "ort", "--prompt", "hi"], "has no entry"),
            (["verify", swapped], "the graph is rank 1"),
            (["generate", "--artifact", swapped, "--backend", "ort", "--prompt", "hi"], "rank files were swapped"),
            (["logits", "--artifact", swapped, "--backend", "torch", "--tokens", "1,2", "--out", tmp_path / "l.npy"],
             "rank files were swapped"),
            (["build", "--artifact", swapped, "--trt", "rtx"], "rank files were swapped")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in one_line(err), (argv, err)
    assert {"unlisted": tree(unlisted), "swapped": tree(swapped)} == before
    assert not (tmp_path / "l.npy").exists()


def test_nan_bytes_in_the_weights_stop_the_run_naming_rank_and_step(artifact, tmp_path, capsys):
    art = tmp_path / "nan"
    shutil.copytree(artifact, art)
    data = art / "rank1" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[:4096] = b"\xff" * 4096  # float32 NaNs over the first weights (the embedding slice)
    data.write_bytes(bytes(raw))
    before = tree(art)
    for backend in ("ort", "torch"):
        code, out, err = run(capsys, "logits", "--artifact", art, "--backend", backend, "--tokens", "1,2,3",
                             "--out", tmp_path / "logits.npy")
        line = one_line(err)
        # TP: the all-reduce spreads rank 1's NaNs to its stage, so the line names the stage's ranks
        assert code == 2 and "ranks 0-1 (stage 0) returned non-finite logits" in line and "at step 0" in line, err
    assert not (tmp_path / "logits.npy").exists() and tree(art) == before


# -- signals ---------------------------------------------------------------------------------

def _cli(argv: list, tmpdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmpdir)}
    return subprocess.Popen([sys.executable, "-m", "runner.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_signals_mid_build_and_mid_export_end_the_run_and_clean_up(checkpoint, artifact, tmp_path):
    """TensorRT's logger catches an exception raised inside it: SIGTERM during `build --trt rtx` must
    still end the run (exit 143), not print "built 1 engine(s)"; SIGHUP cleans up like SIGTERM."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    # 32 layers: TensorRT-RTX takes ~6 s a rank here, so the signal a second in lands inside the
    # build on any machine (the module's 2-layer artifact builds both ranks in under a second).
    deep = save_hf(hf_model(tiny_config(num_hidden_layers=32)), tmp_path / "deep-ck", max_shard_size="2MB")
    art = tmp_path / "art"
    assert llama405([str(a) for a in export_argv(deep, art)]) == 0
    before = tree(art)
    build = _cli(["build", "--artifact", art, "--trt", "rtx"], private_tmp)
    for line in build.stdout:
        if line.startswith("building rank 0 engine"):
            break
    time.sleep(1)  # TensorRT is building rank 0 now
    build.send_signal(signal.SIGTERM)
    out, err = build.communicate(timeout=300)
    assert build.returncode == 143, (out, err)
    assert one_line(err).endswith("terminated; nothing half-written was left behind") and "built" not in out
    assert tree(art) == before  # no engine, no temporary, the manifest untouched

    work = tmp_path / "work"
    work.mkdir()
    export = _cli(export_argv(checkpoint, work / "new"), private_tmp)
    deadline = time.monotonic() + 120
    while not list(work.glob(".new.tmp-*")) and time.monotonic() < deadline and export.poll() is None:
        time.sleep(0.05)
    assert export.poll() is None, "the export finished before it could be hung up"
    export.send_signal(signal.SIGHUP)
    _, err = export.communicate(timeout=120)
    assert export.returncode == 129, err
    assert one_line(err).endswith("hung up (SIGHUP); nothing half-written was left behind")
    assert list(work.iterdir()) == [] and list(private_tmp.iterdir()) == []  # lock, temporary, trace folder
