"""The GPU install resolves: pyproject's requirements with the `gpu` extra, for a CUDA host's
Python (manylinux x86_64, CPython 3.12), by pip's own resolver without installing anything.

onnxruntime and onnxruntime-gpu are one module, so no set may hold both: the base requirements
hold neither, `cpu` the CPU build, `gpu` the GPU build. The resolve reads each wheel's metadata
with HTTP range requests (pip's fast-deps) and must not download a wheel (onnxruntime-gpu is
255 MB, torch 527 MB). torch is resolved without its dependencies: a CUDA build's nvidia-*
wheels are PyTorch's own set (a GPU host brings its PyTorch; this machine's index lacks
nvidia-cudnn-cu13), see docs/deployment.md. TensorRT comes from NVIDIA's index: documented there,
not resolved here. Skipped, with pip's reason, where the package index cannot be reached.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

pytestmark = pytest.mark.slow  # two resolves against the package index (~20-40 s)

ROOT = Path(__file__).resolve().parents[1]
# pip matches each manylinux tag exactly: name the glibc levels the wheels we need are tagged with.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17, 12, 5)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                         r"Could not fetch URL|Network is unreachable|Connection refused|timed out", re.I)
BIG_DOWNLOAD = re.compile(r"Downloading \S+ \((\d+(?:\.\d+)?) (MB|GB)\)")
ORT_BUILDS = {"onnxruntime", "onnxruntime-gpu"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


def test_each_onnxruntime_build_is_in_one_extra_only():
    meta = project()
    extras = meta["optional-dependencies"]
    assert not names(meta["dependencies"]) & ORT_BUILDS
    assert names(extras["cpu"]) & ORT_BUILDS == {"onnxruntime"}
    assert names(extras["gpu"]) & ORT_BUILDS == {"onnxruntime-gpu"}
    assert all(len(names(reqs) & ORT_BUILDS) <= 1 for reqs in extras.values())
    assert not names(extras["test"]) & ORT_BUILDS  # `test` goes with either build


def dry_run(requirements: list[str], report: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               *(f"--platform={p}" for p in PLATFORMS), "--use-feature=fast-deps", "--timeout", "30",
               "--retries", "1", "-v", "--report", str(report), *extra, *requirements]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    if done.returncode != 0 and UNREACHABLE.search(log):
        pytest.skip(f"the package index cannot be reached: {UNREACHABLE.search(log).group(0)}")
    assert done.returncode == 0, log[-3000:]
    fetched = [m.group(0) for m in BIG_DOWNLOAD.finditer(log)
               if float(m.group(1)) * (1000 if m.group(2) == "GB" else 1) > 20]
    assert not fetched, f"pip downloaded whole wheels: {fetched}"
    return done


def resolved(report: Path) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def test_the_gpu_set_resolves_for_manylinux_cp312(tmp_path):
    meta = project()
    wanted = meta["dependencies"] + meta["optional-dependencies"]["gpu"]
    torch = [r for r in wanted if Requirement(r).name == "torch"]
    rest = [r for r in wanted if Requirement(r).name != "torch"]
    dry_run(rest, tmp_path / "gpu.json")
    got = resolved(tmp_path / "gpu.json")
    assert names(rest) <= set(got) and "onnxruntime-gpu" in got and "onnxruntime" not in got, got
    dry_run(torch, tmp_path / "torch.json", "--no-deps")
    (torch_version,) = resolved(tmp_path / "torch.json").values()
    assert Requirement(torch[0]).specifier.contains(torch_version)
