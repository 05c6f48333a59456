"""`make bench` (runner/bench.py): the table and JSON it produces, never the times in them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner import bench

REPO = Path(__file__).resolve().parents[2]


def table_rows(text: str) -> list[list[str]]:
    """Cells of a Markdown table, header and separator dropped."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "runner.bench", "--quick", "--only", "load,export,decode",
         "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    return done, workdir


@pytest.mark.slow
def test_quick_bench_prints_one_table_and_matching_json(quick_run):
    done, workdir = quick_run
    assert done.returncode == 0, done.stderr[-3000:]
    # stdout is the table and nothing else; progress went to stderr.
    lines = done.stdout.strip().splitlines()
    assert lines[0].split("|")[1].strip() == "what"
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["what", "figure", "unit", "against what"]
    assert all(ln.startswith("|") for ln in lines)
    assert "[bench]" in done.stderr

    rows = table_rows(done.stdout)
    payload = json.loads((workdir / "bench.json").read_text())
    assert len(payload["rows"]) == len(rows)
    assert payload["failures"] == []
    assert set(payload["benches"]) == {"load", "export", "decode"}
    for row, cells in zip(payload["rows"], rows, strict=True):
        assert set(row) == {"bench", "what", "figure", "unit", "against"}
        assert cells[0] == f"{row['bench']}: {row['what']}"
        assert cells[1] == bench.fmt(row["figure"])

    whats = {f"{r['bench']}: {r['what']}": r for r in payload["rows"]}
    expected = [
        "load: rank 0/8, streaming (keep nothing): wall",
        "load: rank 0/8, streaming (keep nothing): peak RSS - baseline",
        "load: rank 0/8, keep all slices: peak RSS - baseline",
        "load: rank 0/8 weights",
        "load: checkpoint",
        "export: disk sequential write (64 MB os.write + fsync)",
        "export: disk copy (cold read + write of the same file, fsync)",
        "export: rank 0/8, 2 layers, bfloat16 (no cast): weight stream alone, (weights + fsync)",
        "export: rank 0/8, 1 layer, bfloat16 (no cast): wall",
        "export: rank 0/8, 2 layers, bfloat16 (no cast): peak RSS - baseline",
        "export: rank 0/8, 2 layers, bfloat16 (no cast): GB written / (wall + fsync)",
        "export: peak RSS - baseline, 2 layers / 1 layer (bf16)",
        "decode: bandwidth bound",
        "decode: onnxruntime, our artifact (static cache): decode",
        "decode: HF transformers generate (PyTorch eager): decode",
        "decode: our torch backend (eager): decode",
        "decode: greedy tokens equal to HF's (prefix)",
    ]
    missing = [w for w in expected if w not in whats]
    assert not missing, f"rows missing: {missing}\n{done.stdout}"
    for what in expected[:-1]:
        figure = whats[what]["figure"]
        assert isinstance(figure, (int, float)) and figure >= 0, (what, figure)
    assert not any(r["bench"] == "peers" for r in payload["rows"])  # --only leaves it out

    # Sizes, not times: a TP8 rank holds about an eighth of the checkpoint.
    share = whats["load: checkpoint"]["figure"] / whats["load: rank 0/8 weights"]["figure"]
    assert 6 < share < 10
    # The same seed, weights and dtype: ORT and HF agree on the first greedy token at least.
    agreed = int(whats["decode: greedy tokens equal to HF's (prefix)"]["figure"].split("/")[0])
    assert agreed >= 1
    # Scratch (exports) is cleaned up; synthesized checkpoints stay cached for the next run.
    assert not (workdir / "scratch").exists()
    assert len(list((workdir / "checkpoints").iterdir())) == 3


def test_unknown_benchmark_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "runner.bench", "--only", "load,nope",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2
    assert "nope" in done.stderr and done.stdout == ""


def test_checkpoint_cache_key_follows_geometry():
    a = bench.wide_config(2, quick=True)
    assert bench.geometry_key("x", a, "bfloat16", 0) == bench.geometry_key("x", a, "bfloat16", 0)
    assert bench.geometry_key("x", a, "bfloat16", 0) != bench.geometry_key("x", a, "float16", 0)
    assert bench.geometry_key("x", a, "bfloat16", 0) != bench.geometry_key("x", a, "bfloat16", 1)
    b = bench.wide_config(1, quick=True)
    assert bench.geometry_key("x", a, "bfloat16", 0) != bench.geometry_key("x", b, "bfloat16", 0)


def test_full_geometries_are_the_ones_the_benchmarks_promise():
    wide = bench.wide_config(2, quick=False)
    assert (wide.hidden_size, wide.intermediate_size, wide.num_attention_heads,
            wide.num_key_value_heads, wide.vocab_size) == (16384, 53248, 128, 8, 128256)
    peers = bench.peers_config(8, quick=False)
    assert 0.9e9 < peers.num_parameters() < 1.2e9 and peers.hidden_size == 2048
    decode = bench.decode_config(quick=False)
    assert 80e6 < decode.num_parameters() < 150e6


def test_markdown_table_and_number_format():
    rows = [bench.Row("load", "wall", 12.345, "s", "a | b"), bench.Row("peers", "x", "unavailable: no pip")]
    text = bench.markdown_table(rows)
    cells = table_rows(text)
    assert cells[0] == ["load: wall", "12.3", "s", "a / b"]
    assert cells[1][1] == "unavailable: no pip"
    assert [bench.fmt(v) for v in (1234.5, 3.14159, 0.012345, 7, None)] == ["1,234", "3.14", "0.0123", "7", "n/a"]


def test_run_watched_reports_the_child_peak_rss():
    # A child that holds ~200 MB: ru_maxrss (as /usr/bin/time -v) and the polled tree RSS see it.
    code = "import time; b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    result = bench.run_watched([sys.executable, "-c", code], timeout=60)
    assert result.returncode == 0
    assert result.maxrss >= 200 * 1024 * 1024
    assert result.tree_peak >= 150 * 1024 * 1024


def test_run_watched_stops_a_process_over_its_memory_limit():
    code = "import time; b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    result = bench.run_watched([sys.executable, "-c", code], timeout=60, rss_limit=100 * 1024 * 1024)
    assert result.over_limit and not result.timed_out
    assert bench.describe_exit(result.returncode).startswith("killed by SIGKILL")


def test_a_failing_child_is_reported_not_raised_past_the_bench(tmp_path):
    with pytest.raises(bench.MeasurementError, match="load: .*CheckpointError"):
        bench.measure("load", {"checkpoint": str(tmp_path / "missing"), "tp": 8, "keep": False}, timeout=300)
