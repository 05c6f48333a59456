"""Peer exporters: their virtual environments and their commands (onnxruntime-genai's model
builder, Optimum's `export onnx`), run as process trees whose peak RSS is polled.

A peer's peak is the largest process's ru_maxrss (what `/usr/bin/time -v` prints) and the peak of
the RSS summed over the process tree, polled every 50 ms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import Context, available_memory, describe_exit, dir_bytes, evict_from_page_cache, log, run_watched, whole_peak
from bench.report import gb

# Each peer in its own venv: they pin transformers versions that differ from ours (and each
# other). torch first, pinned: it resolves to the CPU wheel on local disk, where a bare `torch`
# requirement would pull the multi-GB CUDA build.
PEER_TORCH = "torch==2.13.0"
PEER_PACKAGES = {
    # optimum[onnx] is optimum + optimum-onnx; optimum-onnx pins optimum~=2.1 and
    # transformers<4.58, so asking for optimum-onnx lets pip pick the matching optimum.
    "optimum": ["optimum-onnx[onnxruntime]"],
    # The model builder imports torch, transformers (AutoConfig/AutoTokenizer and the HF model
    # for weights), onnx_ir and onnx at run time but declares none of them.
    "genai": ["onnxruntime-genai", "transformers", "onnx", "onnx_ir", "sentencepiece", "protobuf"],
}
PEER_INSTALL_TIMEOUT = 1200
OPTIMUM_EXTRA_FLAGS: list[str] = []
PEER_TIMEOUT = 1800


# -- peer virtual environments ---------------------------------------------------------------


def peer_spec(name: str) -> str:
    """What a peer venv's .bench-installed marker records: the packages it was installed with."""
    return json.dumps([PEER_TORCH, *PEER_PACKAGES[name]])


def installed_peer_python(workdir: Path, name: str) -> Path | None:
    """workdir/peers/NAME's python where that venv is installed with today's PEER_PACKAGES."""
    venv = workdir / "peers" / name
    python, marker = venv / "bin" / "python", venv / ".bench-installed"
    if marker.is_file() and marker.read_text() == peer_spec(name) and python.is_file():
        return python
    return None


def peer_venv(workdir: Path, name: str) -> tuple[Path | None, str]:
    """(python of workdir/peers/NAME, "") once installed, or (None, one-line reason)."""
    installed = installed_peer_python(workdir, name)
    if installed is not None:
        return installed, ""
    venv = workdir / "peers" / name
    python = venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"peer {name}: creating {venv} and installing {' '.join(PEER_PACKAGES[name])} (minutes)")
    steps = [["python3", "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
             [str(python), "-m", "pip", "install", "-q", PEER_TORCH],
             [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[name]]]
    deadline = time.monotonic() + PEER_INSTALL_TIMEOUT
    for cmd in steps:
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None, f"install timed out after {PEER_INSTALL_TIMEOUT} s ({' '.join(cmd[3:])})"
        except OSError as err:
            return None, f"install failed: {err}"
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            return None, f"`pip install {' '.join(cmd[5:])}` failed: {lines[-1] if lines else done.returncode}"
    (venv / ".bench-installed").write_text(peer_spec(name))
    return python, ""


def genai_builder_python(workdir: Path) -> tuple[Path, str]:
    """The peers suite's genai venv where it is installed already; else this interpreter, which
    has onnxruntime-genai (the `test` extra) and what its model builder imports. Never installs."""
    python = installed_peer_python(workdir, "genai")
    if python is not None:
        return python, "the peers suite's genai venv"
    return Path(sys.executable), "this venv"


# -- peer commands ---------------------------------------------------------------------------


def peer_command(name: str, python: Path, ckpt: Path, out: Path) -> list[str]:
    if name == "genai":
        return [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                "-p", "fp32", "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")]
    # --no-post-process: no merge of with/without-past graphs; validation against PyTorch is
    # skipped too where the CLI offers it, so the time is the export's.
    return [str(python), "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(ckpt),
            "--task", "text-generation-with-past", *OPTIMUM_EXTRA_FLAGS, str(out)]


def peer_env(workdir: Path) -> dict[str, str]:
    """A peer's environment: offline Hugging Face hub under workdir/peers, no PYTHONPATH of ours."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(workdir / "peers" / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def run_peer(ctx: Context, name: str, ckpt: Path) -> dict | str:
    """{"wall_s", "maxrss", "tree_peak", "bytes"} or the one-line reason it is unavailable."""
    python, why = peer_venv(ctx.workdir, name)
    if python is None:
        return why
    out = ctx.scratch(f"peer-{name}")
    cmd = peer_command(name, python, ckpt, out)
    log(f"peers: {name}: {' '.join(cmd[1:])}")
    limit = int(0.85 * available_memory())
    evict_from_page_cache(ckpt)
    try:
        proc = run_watched(cmd, PEER_TIMEOUT, env=peer_env(ctx.workdir), cwd=out.parent, rss_limit=limit)
        if proc.timed_out:
            return f"timed out after {PEER_TIMEOUT} s"
        if proc.over_limit:
            return f"stopped at {gb(limit):.1f} GB RSS (85% of the memory available)"
        if proc.returncode != 0:
            return f"{describe_exit(proc.returncode)}: {proc.last_line()}"
        written = dir_bytes(out) if out.exists() else 0
        if not written:
            return "exited 0 but wrote nothing"
        return {"wall_s": proc.wall_s, "maxrss": proc.maxrss, "tree_peak": proc.tree_peak,
                "bytes": written}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f"{out.name}-cache", ignore_errors=True)


def run_genai_builder(ctx: Context, ckpt: Path, out: Path) -> dict | str:
    """The peers suite's model-builder command (-p fp32 -e cpu) on ckpt: {"wall_s", "python"} or why not."""
    python, where = genai_builder_python(ctx.workdir)
    cmd = peer_command("genai", python, ckpt, out)
    log(f"genai: model builder ({where}): {' '.join(cmd[1:])}")
    before = os.getloadavg()[0]
    proc = run_watched(cmd, PEER_TIMEOUT, env=peer_env(ctx.workdir), cwd=out.parent,
                       rss_limit=int(0.85 * available_memory()))
    ctx.loads += [before, os.getloadavg()[0]]
    shutil.rmtree(out.parent / f"{out.name}-cache", ignore_errors=True)
    if proc.timed_out:
        return f"model builder timed out after {PEER_TIMEOUT} s"
    if proc.over_limit:
        return "model builder stopped at 85% of the memory available"
    if proc.returncode != 0:
        return f"model builder ({where}): {describe_exit(proc.returncode)}: {proc.last_line()}"
    if not (out / "genai_config.json").is_file():
        return f"model builder ({where}) exited 0 but wrote no genai_config.json"
    return {"wall_s": proc.wall_s, "python": where, "peak": whole_peak(dataclasses.asdict(proc))}
