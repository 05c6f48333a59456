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


def test_engines_commands_parse_with_the_cli(tmp_path):
    from runner import cli
    for quant in ("none", "fp8"):
        cmd = bench.engines_export_cmd(tmp_path / "ckpt", tmp_path / "art", quant, tmp_path / "calib.txt")
        assert cmd[1:3] == ["-m", "runner.cli"]
        args = cli._parser().parse_args(cmd[3:])
        assert (args.command, args.tp, args.dtype, args.max_seq_len, args.max_batch) == ("export", 8, "float16", 4096, 1)
        assert args.quant == quant
    args = cli._parser().parse_args(bench.engines_build_cmd(tmp_path / "art")[3:])
    assert (args.command, args.trt) == ("build", "rtx")


def test_engines_geometry_and_its_calibration_text_fit_the_cut_vocabulary():
    from export.tokenizer import Llama3Tokenizer
    cfg = bench.engines_config(quick=False)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (16384, 53248, 1, 16384)
    # 16 tokens for --calib-seq-len 16, every id inside the checkpoint's vocabulary.
    ids = Llama3Tokenizer.default().encode(bench.ENGINES_CALIB_TEXT, bos=False)
    assert len(ids) >= 16 and max(ids) < cfg.vocab_size


@pytest.mark.slow
def test_quick_engines_bench_rows(tmp_path):
    import importlib.util
    done = subprocess.run([sys.executable, "-m", "runner.bench", "--quick", "--only", "engines",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, check=False)
    payload = json.loads((tmp_path / "bench.json").read_text())
    whats = {r["what"]: r["figure"] for r in payload["rows"] if r["bench"] == "engines"}
    built = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
    for tag in ("fp16", "fp8"):
        what = f"{tag}, rank 0/8"
        assert whats[f"{what}: export wall"] > 0, done.stderr[-3000:]
        assert whats[f"{what}: rank weight bytes (rank0/model.onnx.data)"] > 0
        if not built:  # `llama405 build --trt rtx` exits 3: reported, not failed
            assert str(whats[f"{what}: build"]).startswith("unavailable"), whats
            continue
        assert whats[f"{what}: parse"] >= 0 and whats[f"{what}: build"] > 0, whats
        assert whats[f"{what}: builder peak RSS / rank weight bytes"] > 1
        # Sizes, not times: an engine carries its weights plus a little code and metadata.
        assert 0.9 < whats[f"{what}: engine bytes / rank weight bytes"] < 1.5
    assert done.returncode == 0 and payload["failures"] == [], done.stderr[-3000:]
    if built:
        assert whats["engine bytes, fp8 / fp16"] < 1
    assert not (tmp_path / "scratch").exists()
