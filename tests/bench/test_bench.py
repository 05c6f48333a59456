"""`make bench` (bench/): the table and JSON it produces, never the times in them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import harness, models, report
from bench import tasks
from bench.suites import BENCHES
from bench.suites import engines as engines_suite
from bench.suites import genai as genai_suite
from bench.suites import graph as graph_suite
from bench.suites import recipes as recipes_suite

REPO = Path(__file__).resolve().parents[2]


def table_rows(text: str) -> list[list[str]]:
    """Cells of a Markdown table, header and separator dropped."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


def quick_bench(workdir: Path, only: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m bench --quick --only ONLY` in workdir: the process and its bench.json ({} if none)."""
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", only, "--workdir", str(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    path = workdir / "bench.json"
    return done, json.loads(path.read_text()) if path.is_file() else {}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "load,export,decode",
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
        assert cells[1] == report.fmt(row["figure"])

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
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "load,nope",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2
    assert "nope" in done.stderr and done.stdout == ""


def test_checkpoint_cache_key_follows_geometry():
    a = models.wide_config(2, quick=True)
    assert models.geometry_key("x", a, "bfloat16", 0) == models.geometry_key("x", a, "bfloat16", 0)
    assert models.geometry_key("x", a, "bfloat16", 0) != models.geometry_key("x", a, "float16", 0)
    assert models.geometry_key("x", a, "bfloat16", 0) != models.geometry_key("x", a, "bfloat16", 1)
    b = models.wide_config(1, quick=True)
    assert models.geometry_key("x", a, "bfloat16", 0) != models.geometry_key("x", b, "bfloat16", 0)


def test_full_geometries_are_the_ones_the_benchmarks_promise():
    wide = models.wide_config(2, quick=False)
    assert (wide.hidden_size, wide.intermediate_size, wide.num_attention_heads,
            wide.num_key_value_heads, wide.vocab_size) == (16384, 53248, 128, 8, 128256)
    peers = models.peers_config(8, quick=False)
    assert 0.9e9 < peers.num_parameters() < 1.2e9 and peers.hidden_size == 2048
    decode = models.decode_config(quick=False)
    assert 80e6 < decode.num_parameters() < 150e6


def test_markdown_table_and_number_format():
    rows = [report.Row("load", "wall", 12.345, "s", "a | b"), report.Row("peers", "x", "unavailable: no pip")]
    text = report.markdown_table(rows)
    cells = table_rows(text)
    assert cells[0] == ["load: wall", "12.3", "s", "a / b"]
    assert cells[1][1] == "unavailable: no pip"
    assert [report.fmt(v) for v in (1234.5, 3.14159, 0.012345, 7, None)] == ["1,234", "3.14", "0.0123", "7", "n/a"]


def test_run_watched_reports_the_child_peak_rss():
    # A child that holds ~200 MB: ru_maxrss (as /usr/bin/time -v) and the polled tree RSS see it.
    code = "import time; b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    result = harness.run_watched([sys.executable, "-c", code], timeout=60)
    assert result.returncode == 0
    assert result.maxrss >= 200 * 1024 * 1024
    assert result.tree_peak >= 150 * 1024 * 1024


def test_run_watched_stops_a_process_over_its_memory_limit():
    code = "import time; b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    result = harness.run_watched([sys.executable, "-c", code], timeout=60, rss_limit=100 * 1024 * 1024)
    assert result.over_limit and not result.timed_out
    assert harness.describe_exit(result.returncode).startswith("killed by SIGKILL")


def test_a_failing_child_is_reported_not_raised_past_the_bench(tmp_path):
    with pytest.raises(harness.MeasurementError, match="load: .*CheckpointError"):
        harness.measure("load", {"checkpoint": str(tmp_path / "missing"), "tp": 8, "keep": False}, timeout=300)


def test_engines_commands_parse_with_the_cli(tmp_path):
    from runner import cli
    for quant in ("none", "fp8"):
        cmd = engines_suite.engines_export_cmd(tmp_path / "ckpt", tmp_path / "art", quant, tmp_path / "calib.txt")
        assert cmd[1:3] == ["-m", "runner.cli"]
        args = cli._parser().parse_args(cmd[3:])
        assert (args.command, args.tp, args.dtype, args.max_seq_len, args.max_batch) == ("export", 8, "float16", 4096, 1)
        assert args.quant == quant
    args = cli._parser().parse_args(engines_suite.engines_build_cmd(tmp_path / "art")[3:])
    assert (args.command, args.trt) == ("build", "rtx")


def test_engines_geometry_and_its_calibration_text_fit_the_cut_vocabulary():
    from export.tokenizer import Llama3Tokenizer
    cfg = engines_suite.engines_config(quick=False)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (16384, 53248, 1, 16384)
    # 16 tokens for --calib-seq-len 16, every id inside the checkpoint's vocabulary.
    ids = Llama3Tokenizer.default().encode(engines_suite.ENGINES_CALIB_TEXT, bos=False)
    assert len(ids) >= 16 and max(ids) < cfg.vocab_size


@pytest.mark.slow
def test_quick_engines_bench_rows(tmp_path):
    import importlib.util
    done, payload = quick_bench(tmp_path, "engines")
    whats = {r["what"]: r["figure"] for r in payload["rows"] if r["bench"] == "engines"}
    built = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
    for tag in ("fp16", "fp8"):
        what = f"{tag}, rank 0/8"
        assert whats[f"{what}: export wall"] > 0, done.stderr[-3000:]
        assert whats[f"{what}: rank weight bytes (rank0/model.onnx + .data)"] > 0
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


# -- graph and recipes suites --------------------------------------------------------------------


def test_graph_and_recipes_suites_are_registered_and_use_the_tiny_preset():
    assert {"graph", "recipes"} <= set(BENCHES)
    for layers in (*graph_suite.GRAPH_LAYERS, *recipes_suite.recipe_depths(False)):
        cfg = models.tiny_preset(layers)
        assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers,
                cfg.vocab_size) == (256, 8, 2, layers, 128256)
    assert graph_suite.GRAPH_LAYERS == (4, 5)  # the difference is one decoder layer
    assert (graph_suite.GRAPH_OPTIONS["tp"], graph_suite.GRAPH_OPTIONS["dtype"]) == (2, "float16")
    assert recipes_suite.recipe_depths(False) == (16, 32) and recipes_suite.recipe_depths(True) == (4, 8)


def test_recipe_exports_are_fp8_with_in_vocabulary_calibration_ids(tmp_path):
    from export.onnx_export import ExportOptions
    for recipe in recipes_suite.RECIPES:
        args = recipes_suite.recipe_export_args(tmp_path / "ckpt", tmp_path / "out", recipe)
        options = ExportOptions(**args["options"])
        assert (options.quant, options.fp8_recipe, options.quantization.recipe) == ("fp8", recipe, recipe)
        assert args["calibrate"] == [2, 16] and args["calib_source"] == "bench ids"
        json.dumps(args)  # travels to the child as JSON
    ids = tasks.calibration_ids(300, [2, 16])
    assert ids.shape == (2, 16) and 0 <= ids.min() and ids.max() < 300
    assert (ids == tasks.calibration_ids(300, [2, 16])).all()  # seeded


def test_trace_counter_counts_and_restores_the_exporters_trace_function():
    import types
    module = types.SimpleNamespace(trace_rank_graph=lambda cfg: f"graph of {cfg}")
    original = module.trace_rank_graph
    with tasks.TraceCounter(module) as traces:
        assert module.trace_rank_graph("a") == "graph of a"
        module.trace_rank_graph("b")
    assert traces.calls == 2 and traces.seconds >= 0
    assert module.trace_rank_graph is original


def test_onnx_node_counts_leave_external_weights_unread(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"]),
         helper.make_node("Relu", ["z"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], [weight])
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    (tmp_path / "model.onnx.data").unlink()  # not read: counting needs the graph only
    assert tasks.onnx_node_counts(path) == {"MatMul": 1, "Relu": 2}


def _fake_graph_counts(trt: bool) -> dict[int, dict]:
    def rank(layers: int) -> dict:
        ops = {"MatMul": 7 * layers + 1, "Attention": layers, "RotaryEmbedding": 2 * layers, "Gather": 1}
        parsed = {"layers": {"MATRIX_MULTIPLY": 29 * layers + 1, "ATTENTION_INPUT": layers,
                             "ROTARY_EMBEDDING": 2 * layers, "KV_CACHE_UPDATE": 2 * layers,
                             "DIST_COLLECTIVE": 2 * layers + 2, "SHUFFLE": 100 * layers},
                  "flavour": "rtx", "version": "1.7.1.116", "parse_s": 0.01}
        return {"onnx_ops": ops, "trt": parsed if trt else {"unavailable": "inspect needs TensorRT's ONNX parser"}}

    return {n: rank(n) for n in graph_suite.GRAPH_LAYERS}


def test_graph_rows_are_per_layer_differences_against_the_recorded_figures(tmp_path):
    ctx = harness.Context(workdir=tmp_path, quick=True, created=[])
    graph_suite.graph_rows(ctx, _fake_graph_counts(trt=True), {4: 5.0, 5: 5.5})
    rows = {r.what: r for r in ctx.rows}
    assert all(r.bench == "graph" for r in ctx.rows)
    per_layer = rows["ONNX nodes per decoder layer"]
    assert per_layer.figure == 10 and per_layer.unit == "nodes"  # 7 MatMul + Attention + 2 RotaryEmbedding
    assert "80 recorded before" in per_layer.against and "7 MatMul, 2 RotaryEmbedding, 1 Attention" in per_layer.against
    assert rows["ONNX nodes per decoder layer, now / before RotaryEmbedding"].figure == 10 / 80
    total = rows["llama-3.1-tiny TP2 fp16, rank 0, 4 layers: TensorRT layers"]
    assert total.figure == (29 + 1 + 2 + 2 + 2 + 100) * 4 + 1 + 2
    assert "1454 recorded before" in total.against and "948 after" in total.against
    assert rows["TensorRT layers per decoder layer"].figure == 29 + 1 + 2 + 2 + 2 + 100
    assert rows["TensorRT layers of the 4-layer rank, now / before RotaryEmbedding"].figure == total.figure / 1454
    assert [rows[f"per decoder layer: {k}"].figure for k in graph_suite.PER_LAYER_KINDS] == [1, 2, 2, 2]
    assert rows["per decoder layer: ROTARY_EMBEDDING"].against.startswith("2 expected")


def test_graph_rows_say_when_no_parser_is_there(tmp_path):
    ctx = harness.Context(workdir=tmp_path, quick=True, created=[])
    graph_suite.graph_rows(ctx, _fake_graph_counts(trt=False), {})
    rows = {r.what: r.figure for r in ctx.rows}
    assert rows["ONNX nodes per decoder layer"] == 10
    assert rows["TensorRT layers per decoder layer"].startswith("unavailable: inspect needs")
    assert rows["per decoder layer: DIST_COLLECTIVE"].startswith("unavailable")


def _fake_recipe_result(wall: float, traces: int) -> dict:
    return {"wall_s": wall, "trace_s": 2.0 * traces, "traces_s": 1.9 * traces, "weights_s": 1.0, "traces": traces}


def test_recipe_rows_are_walls_and_ratios_meta_over_all_and_deep_over_shallow(tmp_path):
    ctx = harness.Context(workdir=tmp_path, quick=False, created=[])
    results = {(16, "all"): _fake_recipe_result(5.0, 1), (16, "meta"): _fake_recipe_result(7.0, 2),
               (32, "all"): _fake_recipe_result(5.5, 1), (32, "meta"): _fake_recipe_result(7.7, 2)}
    recipes_suite.recipe_rows(ctx, (16, 32), results)
    rows = {r.what: r for r in ctx.rows}
    assert all(r.bench == "recipes" for r in ctx.rows)
    wall = rows["fp8 meta recipe, 32 layers: export wall"]
    assert (wall.figure, wall.unit) == (7.7, "s") and "2 one-layer traces" in wall.against
    assert "rest 2.7 s" in wall.against  # wall - stage graph - weights
    assert rows["export wall, meta / all, 16 layers"].figure == 7.0 / 5.0
    assert rows["export wall, meta / all, 32 layers"].figure == 7.7 / 5.5
    assert "one-layer traces 2 vs 1" in rows["export wall, meta / all, 32 layers"].against
    assert rows["export wall, 32 / 16 layers, all recipe"].figure == 5.5 / 5.0
    assert rows["export wall, 32 / 16 layers, meta recipe"].figure == 7.7 / 7.0
    assert rows["fp8 meta recipe, 32 layers: one-layer traces per stage"].figure == 2
    assert "all recipe: 1" in rows["fp8 meta recipe, 32 layers: one-layer traces per stage"].against


def test_recipe_rows_leave_out_the_ratios_of_a_failed_export(tmp_path):
    ctx = harness.Context(workdir=tmp_path, quick=True, created=[])
    recipes_suite.recipe_rows(ctx, (4, 8), {(4, "all"): _fake_recipe_result(5.0, 1),
                                            (4, "meta"): _fake_recipe_result(7.0, 2),
                                            (8, "all"): _fake_recipe_result(5.5, 1)})
    whats = [r.what for r in ctx.rows]
    assert "export wall, meta / all, 4 layers" in whats and "export wall, 32 / 16 layers, meta recipe" not in whats
    assert not any("8 layers" in w and "meta" in w for w in whats)
    assert "export wall, 8 / 4 layers, all recipe" in whats


@pytest.mark.slow
def test_quick_graph_and_recipes_bench_rows(tmp_path):
    done, payload = quick_bench(tmp_path, "graph,recipes")
    assert done.returncode == 0, done.stderr[-3000:]
    assert payload["failures"] == [] and payload["benches"] == ["graph", "recipes"]
    whats = {f"{r['bench']}: {r['what']}": r["figure"] for r in payload["rows"]}
    # Counts, not times: one decoder layer of the tiny model, rank 0 of TP2.
    assert whats["graph: ONNX nodes per decoder layer"] > 0
    assert whats["graph: per decoder layer: ROTARY_EMBEDDING"] == 2
    assert whats["graph: per decoder layer: ATTENTION_INPUT"] == 1
    assert whats["graph: per decoder layer: KV_CACHE_UPDATE"] == 2
    assert whats["graph: per decoder layer: DIST_COLLECTIVE"] == 2
    assert whats["graph: TensorRT layers per decoder layer"] > 0
    for layers in (4, 8):
        for recipe in recipes_suite.RECIPES:
            assert whats[f"recipes: fp8 {recipe} recipe, {layers} layers: export wall"] > 0
        assert whats[f"recipes: export wall, meta / all, {layers} layers"] > 0
    # One trace per distinct layer pattern: Meta's first/last layers differ from the middle ones.
    assert whats["recipes: fp8 meta recipe, 8 layers: one-layer traces per stage"] == 2
    assert not (tmp_path / "scratch").exists()


# -- genai suite -------------------------------------------------------------------------------


def test_genai_models_are_the_ones_the_suite_promises():
    models = genai_suite.genai_models(quick=False)
    (label_a, a), (_, b) = models["A"], models["B"]
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads,
            a.intermediate_size, a.vocab_size) == (768, 12, 12, 4, 2048, 32000)
    assert 120e6 < a.num_parameters() < 130e6 and 265e6 < b.num_parameters() < 280e6
    assert b == a.replace(vocab_size=128256)
    assert label_a == "decode-100m"  # the decode suite's cached checkpoint, shared
    plan = genai_suite.genai_plan(quick=False)
    assert (plan.prompt_len, plan.new_tokens, plan.prefill_len, plan.ratio_lens) == (32, 64, 512, (128, 4096))
    assert plan.max_seq_len >= plan.prefill_len + 1 and plan.repeats >= 3
    assert plan.prompt_len + plan.new_tokens <= min(plan.ratio_lens)
    quick = genai_suite.genai_plan(quick=True)
    assert quick.max_seq_len >= quick.prefill_len + 1 and quick.max_seq_len not in quick.ratio_lens


def test_genai_config_copy_sets_threads_and_drops_out_of_vocab_ids(tmp_path):
    src = tmp_path / "art"
    (src / "rank0").mkdir(parents=True)
    (src / "rank0" / "model.onnx").write_bytes(b"graph")
    original = {"model": {"vocab_size": 32000, "eos_token_id": [128001, 2], "pad_token_id": 128004,
                          "decoder": {"filename": "rank0/model.onnx", "session_options": {"log_id": "x"}}},
                "search": {"max_length": 131072}}
    (src / "genai_config.json").write_text(json.dumps(original))
    changed = genai_suite.genai_config_copy(src, tmp_path / "copy", threads=2, max_length=640)
    cfg = json.loads((tmp_path / "copy" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"] == {"log_id": "x", "intra_op_num_threads": 2}
    assert (cfg["model"]["eos_token_id"], cfg["model"]["pad_token_id"], cfg["search"]["max_length"]) == (2, 2, 640)
    assert changed["eos_dropped"] == [128001]
    assert (tmp_path / "copy" / "rank0" / "model.onnx").read_bytes() == b"graph"  # the graph is linked, not copied
    assert (tmp_path / "copy" / "rank0").is_symlink()
    assert json.loads((src / "genai_config.json").read_text()) == original  # the artifact is left alone
    # Ids inside the vocabulary stay as they are.
    within = tmp_path / "art2"
    within.mkdir()
    (within / "genai_config.json").write_text(json.dumps({**original, "model": {
        **original["model"], "vocab_size": 128256}}))
    assert genai_suite.genai_config_copy(within, tmp_path / "copy2", 2, 640)["eos_dropped"] == []
    assert json.loads((tmp_path / "copy2" / "genai_config.json").read_text())["model"]["eos_token_id"] == [128001, 2]


def _fake_speed_result(with_own: bool) -> dict:
    tokens = list(range(64))

    def variant(tps, prefill=None):
        prefill = prefill or []
        return {"decode_tps": tps, "prefill_s": prefill, "tokens": tokens,
                "decode_others": [0.0] * len(tps), "prefill_others": [0.0] * len(prefill)}

    # ours_static's 4th decode ran while another process held a core: left out of the median.
    variants = {"ours_static": {**variant([10.0, 12.0, 11.0, 3.0], [1.0, 1.2, 1.1]),
                                "decode_others": [0.0, 0.1, 0.0, 1.0]},
                "genai_static": variant([8.0, 9.0, 10.0], [2.0, 2.2, 2.4]),
                "ours_concat": variant([9.0, 9.0, 9.0], [1.0, 1.0, 1.0]),
                "genai_concat": {**variant([10.0, 10.0, 10.0], [1.0, 1.0, 1.0]), "tokens": tokens[:5] + [7] * 59},
                "ours_static_128": variant([12.0, 12.0, 12.0]), "ours_static_4096": variant([11.0, 11.0, 11.0])}
    if with_own:
        variants["genai_own"] = variant([20.0, 20.0, 20.0], [0.5, 0.5, 0.5])
    return {"variants": variants, "gate": {"cores": 0.25, "waited_s": 0.0, "wait_budget_s": 150, "rounds": 4}}


def test_genai_rows_are_medians_and_ratios_ours_over_genai(tmp_path):
    ctx = harness.Context(workdir=tmp_path, quick=False, created=[])
    _, cfg = genai_suite.genai_models(quick=False)["A"]
    plan = genai_suite.genai_plan(quick=False)
    genai_suite.genai_rows(ctx, "A", cfg, plan, _fake_speed_result(with_own=True), {})
    prefix = "model A (125 M, vocab 32000)"
    assert all(r.what.startswith(prefix) for r in ctx.rows)
    rows = {r.what[len(prefix):].lstrip(":, "): r for r in ctx.rows}
    assert rows["ours (OrtBackend), static graph: decode"].figure == 11.0
    assert rows["ours (OrtBackend), static graph: decode"].unit == "tokens/s"
    assert rows["ours (OrtBackend), static graph: decode"].against.startswith("median, 3 clean of 4 (10.0-12.0)")
    assert rows["ours (OrtBackend), static graph: 512-token prefill"].figure == 1.1
    assert rows["decode, ours / genai on our static graph"].figure == 11.0 / 9.0
    assert rows["512-token prefill seconds, ours / genai on our static graph"].figure == 1.1 / 2.2
    assert rows["decode, ours / genai on our concat graph"].figure == 0.9
    assert rows["decode, ours static / genai on its own graph"].figure == 11.0 / 20.0
    assert rows["static decode, max_seq_len 4096 / 128 (ours)"].figure == 11.0 / 12.0
    assert "within 10%" in rows["static decode, max_seq_len 4096 / 128 (ours)"].against
    assert rows["greedy tokens equal to ours static (prefix)"].figure == (
        "genai own 64/64, genai static 64/64, genai concat 5/64, ours concat 64/64")
    assert all(r.bench == "genai" for r in ctx.rows)


def test_genai_rows_say_why_genai_own_graph_was_not_measured(tmp_path):
    ctx = harness.Context(workdir=tmp_path, quick=False, created=[])
    _, cfg = genai_suite.genai_models(quick=False)["B"]
    genai_suite.genai_rows(ctx, "B", cfg, genai_suite.genai_plan(quick=False), _fake_speed_result(with_own=False),
                     {"genai_own": "model builder: exit code 1: boom"})
    own = next(r for r in ctx.rows if "its own graph (model builder" in r.what and r.what.endswith("decode"))
    assert own.figure == "not measured: model builder: exit code 1: boom"
    ratio_row = next(r for r in ctx.rows if r.what.endswith("decode, ours static / genai on its own graph"))
    assert ratio_row.figure is None and "boom" in ratio_row.against
    assert report.fmt(ratio_row.figure) == "n/a"


def test_genai_variants_alternate_over_fresh_children_and_redo_the_noisy_ones(tmp_path):
    ctx = harness.Context(workdir=tmp_path, quick=True, created=[])
    calls = []

    def fake_measure(bench_name, label, task, args, timeout=0):
        (v,) = args["variants"]
        calls.append(label)
        busy = 1.0 if v["key"] == "b" and "pass" in label else 0.0  # b's passes ran on a busy machine
        n = args["repeats"]
        return {"result": {"variants": {v["key"]: {
            "decode_tps": [10.0] * n, "decode_others": [busy] * n, "tokens": [1, 2],
            "prefill_s": [1.0] * n if v["prefill"] else [], "prefill_others": [busy] * n if v["prefill"] else []}},
            "gate": {"waited_s": 1.0}}}

    ctx.measure = fake_measure
    variants = [{"key": k, "kind": "ours", "path": "x", "max_len": 96, "prefill": k != "c"} for k in "abc"]
    waited = [0.0]
    # Two passes of two, three clean wanted (the full plan's procedure, on the quick geometry).
    plan = dataclasses.replace(genai_suite.genai_plan(quick=True), passes=2, per_pass=2, repeats=3)
    result = genai_suite.measure_genai_variants(ctx, "A", variants, {"idle_cores": 0.25}, plan, waited)
    assert calls == ["A a pass 1", "A b pass 1", "A c pass 1", "A c pass 2", "A b pass 2", "A a pass 2", "A b extra"]
    assert len(result["variants"]["a"]["decode_tps"]) == plan.passes * plan.per_pass
    assert result["variants"]["b"]["decode_others"] == [1.0] * 4 + [0.0] * 2
    assert result["variants"]["c"]["prefill_s"] == []
    assert result["gate"]["children"] == 7 and waited == [7.0]


def test_cpu_watch_counts_other_processes_not_this_one():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(0.3)  # past the interpreter's start
        watch = harness.CpuWatch().start()
        time.sleep(0.8)
        others = watch.stop()
    finally:
        busy.wait()
    assert others > 0.3  # the spinning child, a core's worth when it gets one


def test_idle_gate_measures_and_counts_clean_measurements():
    gate = harness.IdleGate(cores=0.5, budget_s=0.0, window=0.05)
    value, others = gate.measure(lambda: 42)
    assert value == 42 and others >= 0 and gate.waited == 0
    assert gate.clean([0.0, 0.49, 0.5, 2.0]) == 2


def test_clean_values_keep_the_quiet_measurements_or_flag_them_all():
    assert genai_suite.clean_values([10.0, 3.0, 11.0], [0.0, 1.0, 0.1], 0.25) == ([10.0, 11.0], "2 clean of 3")
    values, note = genai_suite.clean_values([3.0, 4.0], [1.0, 1.0], 0.25)
    assert values == [3.0, 4.0] and note.startswith("none of 2 clean")


@pytest.mark.slow
def test_quick_genai_bench_rows(tmp_path):
    done, payload = quick_bench(tmp_path, "genai", timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert payload["failures"] == [] and payload["benches"] == ["genai"]
    whats = {r["what"]: r["figure"] for r in payload["rows"] if r["bench"] == "genai"}
    assert list(genai_suite.genai_models(quick=True)) == ["A"]  # the quick plan: one model (B is A's code)
    assert not any(w.startswith("model B (") for w in whats)
    for name in ("A",):
        model = next(w for w in whats if w.startswith(f"model {name} (") and ":" not in w)
        for title in ("ours (OrtBackend), static graph", "ours (OrtBackend), concat graph",
                      "onnxruntime-genai, our static graph", "onnxruntime-genai, our concat graph"):
            assert whats[f"{model}, {title}: decode"] > 0, whats
            assert whats[f"{model}, {title}: 64-token prefill"] > 0, whats
        assert whats[f"{model}: decode, ours / genai on our static graph"] > 0
        for mode in ("static", "concat"):  # both runtimes profiled: a time around Run, under the step's
            ours = whats[f"{model}, ours (OrtBackend), {mode} graph: decode step outside onnxruntime's Run"]
            theirs = whats[f"{model}, onnxruntime-genai, our {mode} graph: decode step outside onnxruntime's Run"]
            assert 0 < ours < 1e5 and 0 < theirs < 1e5, (ours, theirs)
            assert whats[f"{model}: decode step outside Run, ours - genai on our {mode} graph"] == pytest.approx(
                ours - theirs)
        agreed = whats[f"{model}: greedy tokens equal to ours static (prefix)"]
        assert "genai static 8/8" in agreed and "ours concat 8/8" in agreed, agreed
    model_a = next(w for w in whats if w.startswith("model A (") and ":" not in w)
    assert whats[f"{model_a}: static decode, max_seq_len 4096 / 128 (ours)"] > 0
    assert not (tmp_path / "scratch").exists()


# -- batching suite --------------------------------------------------------------------------------


def test_batching_suite_times_every_decode_width_on_the_decode_model():
    from bench.suites import batching as batching_suite
    from export.kv_cache import DECODE_WIDTHS, decode_width
    assert "batching" in BENCHES and tasks.TASKS["decode_width"][1] is batching_suite.task_decode_width
    plan = batching_suite.width_plan(quick=False)
    assert plan.max_seq_len == 4096 and max(plan.lengths) <= plan.max_seq_len and plan.rounds >= 3
    # The lengths tell the three widths apart: a bucket above the live width, and max above both.
    assert any(len({decode_width(k, n, plan.max_seq_len) for k in DECODE_WIDTHS}) == 3 for n in plan.lengths)
    quick = batching_suite.width_plan(quick=True)
    assert max(quick.lengths) <= quick.max_seq_len


# -- serving suite ---------------------------------------------------------------------------------


def test_serving_suite_serves_the_issue_workload_both_ways_on_the_decode_model():
    from bench.suites import serving as serving_suite
    assert "serving" in BENCHES and tasks.TASKS["serving"][1] is serving_suite.task_serving
    full = serving_suite.serving_plan(quick=False)
    assert (full.requests, full.prompt_tokens, full.new_tokens, full.max_batch) == (64, (16, 512), (16, 256), 8)
    for plan in (full, serving_suite.serving_plan(quick=True)):
        # A lockstep batch holds its longest prompt and its longest output at once.
        assert plan.prompt_tokens[1] + plan.new_tokens[1] <= plan.max_seq_len
        work = serving_suite.workload(plan, 32000)
        assert work == serving_suite.workload(plan, 32000) and len(work) == plan.requests  # seeded
        assert all(plan.prompt_tokens[0] <= len(p) <= plan.prompt_tokens[1] for p, _ in work)
        assert all(plan.new_tokens[0] <= n <= plan.new_tokens[1] for _, n in work)
        assert all(0 <= t < 32000 for p, _ in work for t in p)
        assert len({n for _, n in work}) > 1  # outputs of different lengths: what lockstep waits for
def test_smollm2_recipe_row_is_the_heldout_perplexity_delta(tmp_path, monkeypatch):
    """One row per FP8 recipe: the artifact exported with the recipe's options, then
    fidelity_heldout on it; the figure is the perplexity delta in %, the KL and 16-bit count beside."""
    from bench.suites import smollm2 as smollm2_suite
    ctx = harness.Context(workdir=tmp_path, quick=True, created=[])
    asked = []

    def measure(bench, label, task, args, timeout=3600):
        asked.append((task, args))
        if task == "export":
            return {"result": {}}
        return {"result": {"perplexity": 30.2, "reference_perplexity": 29.9, "perplexity_delta_rel": 0.3 / 29.9,
                           "predictions": 864, "top1_agreement": 0.88, "mean_kl": 0.027, "quantized_linears": 84}}

    monkeypatch.setattr(ctx, "measure", measure)
    smollm2_suite.fp8_fidelity(ctx, tmp_path / "ckpt", "all", smollm2_suite.FP8_RECIPES["all"])
    assert [t for t, _ in asked] == ["export", "fidelity_heldout"]
    assert asked[0][1]["options"]["fp8_recipe"] == "all" and asked[0][1]["options"]["max_seq_len"] >= 865
    (row,) = ctx.rows
    assert row.figure == round(100 * 0.3 / 29.9, 2) and row.unit == "%"
    assert "126 of 210 linears 16-bit" in row.against and "mean KL 0.0270" in row.against
    assert "fidelity_heldout" in tasks.TASKS
