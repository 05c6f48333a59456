"""Artifact directories from `export_artifact`: every rank graph passes the
ONNX checker and the TensorRT allowlist with the IO contract of §4, stamping one traced layer
computes what a full multi-layer trace computes, exports are byte-identical, atomic and never
overwrite without force, partial (--ranks) artifacts are refused clearly, the weight file holds
exactly the rank's parameters, and exporting one rank streams (bounded, layer-flat memory).

`shared_artifact` below is the one export cache of the artifact tests: tests here and in
tests/runner/ (test_ort_vs_hf, test_artifact_errors) that need the same layout of conftest's
3-layer `hf_checkpoint` reuse one export per session instead of exporting again.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import export.onnx_export as onnx_export
from export import collectives
from export.errors import ArtifactError
from export.manifest import load_manifest
from export.model import ModelOptions, build_rank_module, rank_constants
from export.onnx_export import ExportOptions, export_artifact, trace_rank_graph
from export.stamp import strip_metadata
from export.rank_layout import checkpoint_name, expected_shape, layer_linears, rank_tensor_names, tensor_slice
from export.sharding import RankSpec, all_ranks, kv_heads_local, stage_layers
from export.trt_support import silent_trt_problems
from tests.trt_parser import parsed_layers
from runner.cli import main as cli_main
from tests.artifacts import shared_artifact as session_artifact
from tests.conftest import tiny_config

MAX_SEQ_LEN = 32


def shared_artifact(tmp_path_factory, checkpoint: Path, *, tp: int = 1, pp: int = 1, dtype: str = "float32",
                    kv_cache: str = "static", max_seq_len: int = MAX_SEQ_LEN) -> Path:
    """An artifact of `checkpoint`, exported once per pytest session for each layout
    (tests/artifacts.py's cache). Read-only for callers: copy it before changing anything."""
    return session_artifact(tmp_path_factory, checkpoint, tp=tp, pp=pp, dtype=dtype, kv_cache=kv_cache,
                            max_seq_len=max_seq_len)


def all_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# -- every rank graph: checker, TensorRT allowlist, collectives, opset, IO contract ---------

def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def expected_io(cfg, spec: RankSpec, kv_cache: str, max_seq_len: int):
    """(inputs, outputs) as [(name, elem_type, dims)] per the graph IO contract (README, docs/design-notes.md)."""
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    kv, d = kv_heads_local(cfg, spec.tp_size), cfg.head_dim
    past_len = max_seq_len if kv_cache == "static" else "past_seq"
    present_len = max_seq_len if kv_cache == "static" else "past_seq + seq"
    inputs = [("input_ids", i64, ["batch", "seq"]) if spec.is_first_stage
              else ("hidden_states", f32, ["batch", "seq", cfg.hidden_size]),
              ("position_ids", i64, ["batch", "seq"]),
              ("attention_mask", i64, ["batch", "total_seq" if kv_cache == "static" else "past_seq + seq"])]
    outputs = [("logits", f32, ["batch", "seq", cfg.vocab_size]) if spec.is_last_stage
               else ("hidden_states", f32, ["batch", "seq", cfg.hidden_size])]
    for i in stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank):  # global layer index
        for part in ("key", "value"):
            inputs.append((f"past_key_values.{i}.{part}", f32, ["batch", kv, past_len, d]))
            outputs.append((f"present.{i}.{part}", f32, ["batch", kv, present_len, d]))
    return inputs, outputs


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2, kv_cache="static"), dict(tp=2, pp=1, kv_cache="concat")],
                         ids=["tp2xpp2-static", "tp2-concat"])
def test_every_rank_graph_is_valid_trt_ready_and_follows_the_io_contract(hf_checkpoint, tmp_path_factory, layout):
    checkpoint, _ = hf_checkpoint
    artifact = shared_artifact(tmp_path_factory, checkpoint, dtype="float32", **layout)
    manifest = load_manifest(artifact, verify_hashes=True)
    cfg, tp, mode = manifest.config, layout["tp"], layout["kv_cache"]
    assert cfg.num_hidden_layers == 3 and manifest.opset == 24
    assert sorted(e.rank for e in manifest.ranks) == list(range(tp * layout["pp"]))
    collectives.register_dist_collective_schema()
    for spec in all_ranks(tp, layout["pp"]):
        path = artifact / f"rank{spec.rank}" / "model.onnx"
        onnx.checker.check_model(str(path), full_check=True)  # path: external data stays on disk
        model = onnx.load(str(path), load_external_data=False)
        assert silent_trt_problems(model) == [], spec
        layers, _ = parsed_layers(path)  # NVIDIA's parser: TensorScatter -> KV-cache update, all-reduces
        n_stage = len(stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank))
        assert layers.get("KV_CACHE_UPDATE", 0) == (2 * n_stage if mode == "static" else 0), spec
        assert layers.get("DIST_COLLECTIVE", 0) == manifest.rank(spec.rank).collectives, spec

        assert [(o.domain, o.version) for o in model.opset_import] == [("", 24)]
        assert not model.functions
        ops = collections.Counter(n.op_type for n in model.graph.node)
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        n_layers = len(stage_layers(cfg.num_hidden_layers, spec.pp_size, spec.pp_rank))
        want = 2 * n_layers + spec.is_first_stage + spec.is_last_stage
        assert ops["DistCollective"] == want == manifest.rank(spec.rank).collectives, spec
        for node in model.graph.node:
            if node.op_type == "DistCollective":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs == {"collective_operation": b"all_reduce", "reduce_op": b"sum", "root": -1,
                                 "group_size": 0, "nb_rank": tp, "groups": []}
        if mode == "static":
            assert ops["TensorScatter"] == 2 * n_layers  # one per cache tensor, updated in place
            assert "Concat" not in {n.op_type for n in model.graph.node if
                                    any(o.startswith("present.") for o in n.output)}
        else:
            assert ops["TensorScatter"] == 0 and ops["ScatterND"] == 0

        inputs, outputs = expected_io(cfg, spec, mode, manifest.max_seq_len)
        got_in = [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.input]
        got_out = [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.output]
        assert got_in == inputs and got_out == outputs, spec
        # The manifest describes the same IO, and no exporter symbol (s17, ...) survives anywhere.
        entry = manifest.rank(spec.rank)
        assert [(t.name, list(t.shape)) for t in entry.inputs] == [(n, s) for n, _, s in inputs]
        assert [(t.name, list(t.shape)) for t in entry.outputs] == [(n, s) for n, _, s in outputs]
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            for d in value.type.tensor_type.shape.dim:
                if d.dim_param:
                    # Expressions of the named dims are fine (GQA folds query heads: "4*seq").
                    names = set(re.findall(r"[A-Za-z_]\w*", d.dim_param))
                    assert names <= {"batch", "seq", "past_seq", "total_seq"}, (value.name, d)


# -- stamping: one traced layer copied per layer == a direct multi-layer trace --------------

def with_weights(model: onnx.ModelProto, cfg, spec: RankSpec, options: ModelOptions) -> onnx.ModelProto:
    """A copy with identical random initializers (names = the rank module's state-dict keys)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.initializer[:]
    state = build_rank_module(cfg, spec, options, device="cpu").state_dict()
    free = ({i for n in model.graph.node for i in n.input} - {o for n in model.graph.node for o in n.output}
            - {v.name for v in model.graph.input} - {""})
    constants = rank_constants(cfg, spec, torch.float32)
    assert free == set(state) | set(constants), sorted(free ^ (set(state) | set(constants)))
    for k, name in enumerate(sorted(state)):
        rng = np.random.default_rng(k)
        shape = tuple(state[name].shape)
        values = rng.normal(1.0, 0.1, shape) if "norm" in name else rng.normal(0.0, 0.3, shape)
        model.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
    model.graph.initializer.extend(numpy_helper.from_array(v.numpy(), name) for name, v in constants.items())
    return model


def collectives_as_identity(model: onnx.ModelProto) -> int:
    """All-reduces (placeholder or DistCollective) -> Identity: one TP rank's partial sums then
    run in onnxruntime, which has no kernel for either."""
    count = 0
    for node in model.graph.node:
        if node.op_type in (collectives.PLACEHOLDER_OP, collectives.DIST_COLLECTIVE):
            node.domain, node.op_type = "", "Identity"
            del node.attribute[:]
            count += 1
    keep = [o for o in model.opset_import if o.domain != collectives.PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return count


def run_graph(model: onnx.ModelProto, cfg) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    batch, seq, past = 2, 3, 4
    rng = np.random.default_rng(7)
    feed = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feed[value.name] = rng.integers(0, cfg.vocab_size, (batch, seq))
        elif value.name == "position_ids":
            feed[value.name] = np.array([[4, 5, 6], [2, 3, 4]])
        elif value.name == "attention_mask":
            feed[value.name] = np.array([[1] * (past + seq), [1, 1, 0, 0] + [1] * seq])
        elif value.name == "hidden_states":
            feed[value.name] = rng.normal(size=(batch, seq, cfg.hidden_size)).astype(np.float32)
        else:  # past_key_values.*: static buffers have a fixed length, concat ones `past`
            length = value.shape[2] if isinstance(value.shape[2], int) else past
            feed[value.name] = rng.normal(size=(batch, value.shape[1], length, cfg.head_dim)).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed)))


# Elementwise and shape ops are left out of the structural comparison: stamping shares the
# template's constants between layers, and a full trace shares some shape arithmetic
# (n_rep * seq) across layers that each stamped layer recomputes. The numeric comparison above
# is what pins the computation down; this one checks the heavy ops line up.
STRUCTURAL_OPS_IGNORED = {"Constant", "Mul", "Add", "Sub", "Div", "Shape", "Gather", "Concat", "Squeeze",
                          "Unsqueeze", "Cast", "Range", "Expand", "Identity"}


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.op_type not in STRUCTURAL_OPS_IGNORED)


@pytest.mark.parametrize("layout,rank", [
    (dict(tp=1, pp=1, kv_cache="static"), 0),  # embedding, 3 stamped layers, lm_head
    (dict(tp=1, pp=2, kv_cache="concat"), 1),  # PP stage 1 of 2: hidden_states in, layer 2 only
    (dict(tp=2, pp=1, kv_cache="concat"), 1),  # TP2 rank 1: sharded embedding/lm_head, collectives
], ids=["tp1-static", "pp-stage1of2-concat", "tp2-rank1-concat"])
def test_stamped_rank_graph_computes_exactly_what_a_full_trace_computes(hf_checkpoint, tmp_path_factory, tmp_path,
                                                                        layout, rank):
    """The exported rank file (one traced layer stamped per layer, then renamed dims and
    DistCollective) against torch.onnx tracing the whole multi-layer rank module directly."""
    checkpoint, _ = hf_checkpoint
    artifact = shared_artifact(tmp_path_factory, checkpoint, dtype="float32", **layout)
    manifest = load_manifest(artifact)
    cfg, entry = manifest.config, manifest.rank(rank)
    spec = RankSpec(entry.tp_rank, manifest.tp, entry.pp_rank, manifest.pp)
    options = ModelOptions(kv_cache=manifest.kv_cache, max_seq_len=manifest.max_seq_len)
    stamped = onnx.load(str(artifact / entry.onnx_path), load_external_data=False)
    traced = trace_rank_graph(cfg, spec, options, torch.float32, tmp_path)
    assert cfg.num_hidden_layers == 3
    assert [v.name for v in stamped.graph.input] == [v.name for v in traced.graph.input]
    assert [v.name for v in stamped.graph.output] == [v.name for v in traced.graph.output]
    if spec.tp_size > 1:
        # A graph with collectives cannot run in onnxruntime as it is: the same structure first
        # (same ops and the same number of collectives once the trace's placeholders are
        # rewritten), then one rank's partial computation with the all-reduces as Identity.
        rewritten = onnx.ModelProto.FromString(traced.SerializeToString())
        assert collectives.rewrite_collectives(rewritten, spec.tp_size) == entry.collectives == 8
        assert op_counts(stamped) == op_counts(rewritten)
    else:
        assert op_counts(stamped) == op_counts(traced)
    a, b = with_weights(stamped, cfg, spec, options), with_weights(traced, cfg, spec, options)
    assert collectives_as_identity(a) == collectives_as_identity(b) == entry.collectives
    out_a, out_b = run_graph(a, cfg), run_graph(b, cfg)
    assert sorted(out_a) == sorted(out_b)
    for name in out_b:
        np.testing.assert_array_equal(out_a[name], out_b[name], err_msg=name)


# -- byte-identical re-export, overwrite and atomicity ---------------------------------------

_EXPORT_SCRIPT = textwrap.dedent("""
    import sys
    from export.onnx_export import ExportOptions, export_artifact
    export_artifact(sys.argv[1], sys.argv[2], ExportOptions(tp=1, dtype="float32", kv_cache="static",
                                                            max_seq_len=int(sys.argv[3])))
""")


def test_an_export_in_another_process_is_byte_identical(hf_checkpoint, tmp_path_factory, tmp_path):
    checkpoint, _ = hf_checkpoint
    original = shared_artifact(tmp_path_factory, checkpoint)  # tp1, static, float32, this process
    # Another interpreter, hashing strings differently from this one (as any two runs do).
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    done = subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT, str(checkpoint), str(tmp_path / "art"),
                           str(MAX_SEQ_LEN)], env={**os.environ, "PYTHONHASHSEED": seed},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = all_files(original), all_files(tmp_path / "art")
    assert sorted(a) == sorted(b) and "manifest.json" in a
    assert [name for name in a if a[name] != b[name]] == []


def test_each_pipeline_stage_is_traced_once_for_all_its_tp_ranks(hf_checkpoint, tmp_path, monkeypatch):
    """TP ranks of a stage differ only in initializers (slices, vocab start, hidden columns)."""
    checkpoint, _ = hf_checkpoint
    traced = []
    real = onnx_export.rank_graph

    def counting(cfg, spec, *args):
        traced.append((spec.tp_rank, spec.pp_rank))
        return real(cfg, spec, *args)

    monkeypatch.setattr(onnx_export, "rank_graph", counting)
    out = export_artifact(checkpoint, tmp_path / "art", ExportOptions(tp=4, pp=2, dtype="float32",
                                                                      max_seq_len=MAX_SEQ_LEN))
    assert traced == [(0, 0), (0, 1)]
    graphs = [onnx.load(str(out / f"rank{r}" / "model.onnx"), load_external_data=False) for r in range(8)]
    starts = [numpy_helper.to_array(next(i for i in g.graph.initializer if i.name == "model.embed_tokens.vocab_start"))
              for g in graphs[:4]]
    assert [int(x) for x in starts] == [r * (load_manifest(out).config.vocab_size // 4) for r in range(4)]


def test_force_replaces_an_artifact_with_a_byte_identical_export(hf_checkpoint, tmp_path_factory, tmp_path, capsys):
    checkpoint, _ = hf_checkpoint
    original = shared_artifact(tmp_path_factory, checkpoint)  # tp1, static, float32
    out = Path(shutil.copytree(original, tmp_path / "art"))
    (out / "stray.bin").write_bytes(b"left over")  # a finished artifact (its manifest says so) with a stray file
    args = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--tp", "1", "--dtype", "float32",
            "--kv-cache", "static", "--max-seq-len", str(MAX_SEQ_LEN), "--json"]

    code = cli_main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(out) in err and "--force" in err, err
    assert (out / "stray.bin").is_file()  # untouched

    assert cli_main(args + ["--force"]) == 0
    assert json.loads(capsys.readouterr().out)["artifact"] == str(out)
    # The manifest's files replaced, byte-identical to the first export of the same inputs; a file
    # llama405 did not write is kept as it was (issue 20: --force deletes only what llama405 wrote).
    a, b = all_files(original), all_files(out)
    assert b.pop("stray.bin") == b"left over"
    assert sorted(a) == sorted(b) and "manifest.json" in a
    assert [name for name in a if a[name] != b[name]] == []
    assert leftovers(tmp_path, "art") == []


def test_existing_out_without_force_raises_before_any_work(hf_checkpoint, tmp_path, monkeypatch):
    checkpoint, _ = hf_checkpoint
    out = tmp_path / "art"
    out.mkdir()
    monkeypatch.setattr(onnx_export, "rank_graph", lambda *a, **k: pytest.fail("traced before refusing"))
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        export_artifact(checkpoint, out, ExportOptions(tp=1, dtype="float32"))
    assert list(out.iterdir()) == [] and leftovers(tmp_path, "art") == []


def test_failure_mid_export_leaves_nothing_behind(hf_checkpoint, tmp_path, monkeypatch):
    checkpoint, _ = hf_checkpoint
    calls = []
    real = onnx_export.attach_initializers

    def attach_then_die(*args, **kwargs):
        calls.append(real(*args, **kwargs))  # rank0/model.onnx.data is written in full first
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(onnx_export, "attach_initializers", attach_then_die)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_artifact(checkpoint, out, ExportOptions(tp=1, dtype="float32", max_seq_len=MAX_SEQ_LEN))
    assert len(calls) == 1
    assert not out.exists() and leftovers(tmp_path, "art") == []
    assert list(tmp_path.iterdir()) == []


# -- a partial artifact (--ranks) ------------------------------------------------------------

def test_ranks_subset_exports_only_those_ranks_and_is_refused_by_a_full_run(hf_checkpoint, tmp_path, capsys):
    checkpoint, _ = hf_checkpoint
    out = tmp_path / "part"
    code = cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--tp", "2", "--pp", "2",
                     "--dtype", "float32", "--max-seq-len", str(MAX_SEQ_LEN), "--ranks", "1,3", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["ranks"] == [1, 3]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["rank1", "rank3"]
    manifest = load_manifest(out, verify_hashes=True)
    assert [e.rank for e in manifest.ranks] == [1, 3]
    assert {f.split("/")[0] for f in manifest.files if "/" in f} == {"rank1", "rank3"}
    assert (manifest.tp, manifest.pp) == (2, 2)

    from runner.backends.ort import OrtBackend
    with pytest.raises(ArtifactError, match=r"no rank 0 \(it holds ranks 1, 3\).*--ranks 0"):
        OrtBackend(out)
    code = cli_main(["generate", "--artifact", str(out), "--backend", "ort", "--prompt", "hi",
                     "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no rank 0" in err, err


# -- weight bytes ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [dict(tp=2, pp=2, kv_cache="static", dtype="float32"),
                                    dict(tp=2, pp=1, kv_cache="static", dtype="float16")],
                         ids=["tp2xpp2-fp32", "tp2-fp16"])
def test_weight_file_holds_exactly_the_rank_parameters(hf_checkpoint, tmp_path_factory, layout):
    checkpoint, _ = hf_checkpoint
    artifact = shared_artifact(tmp_path_factory, checkpoint, **layout)
    manifest = load_manifest(artifact)
    cfg, itemsize = manifest.config, np.dtype(layout["dtype"]).itemsize
    for spec in all_ranks(layout["tp"], layout["pp"]):
        state = build_rank_module(cfg, spec, ModelOptions(kv_cache="static", max_seq_len=MAX_SEQ_LEN)).state_dict()
        params = sum(t.numel() for t in state.values())
        data = artifact / f"rank{spec.rank}" / "model.onnx.data"
        size = data.stat().st_size
        assert manifest.files[f"rank{spec.rank}/model.onnx.data"]["size"] == size
        assert params * itemsize <= size <= params * itemsize + 4096 * len(state), (spec, params, size)

        model = onnx.load(str(data.parent / "model.onnx"), load_external_data=False)
        spans = []
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                assert init.name in rank_constants(cfg, spec, torch.float32)  # from the config and rank, inline
                continue
            info = {e.key: e.value for e in init.external_data}
            offset, length = int(info["offset"]), int(info["length"])
            assert info["location"] == "model.onnx.data" and offset % 4096 == 0, init.name
            assert length == int(np.prod(init.dims)) * itemsize == state[init.name].numel() * itemsize
            spans.append((offset, offset + length))
        assert len(spans) == len(state)
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == size


# -- streaming memory ------------------------------------------------------------------------

MEM_CFG = tiny_config(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
                      vocab_size=128256, num_hidden_layers=4, rope_scaling=None)
MEM_SPEC = RankSpec(0, 8)

_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, threading

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    import onnx, onnxscript, torch, torch.export, torch.onnx  # the interpreter baseline
    from export.onnx_export import ExportOptions, export_artifact
    baseline, baseline_anon = status("VmRSS"), status("RssAnon")
    peak_anon, done = [baseline_anon], threading.Event()

    def sample():  # VmHWM includes mapped file pages; anonymous memory has no high-water mark
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    export_artifact(sys.argv[1], sys.argv[2],
                    ExportOptions(tp=8, dtype="bfloat16", ranks=(0,), max_seq_len=256))
    done.set()
    sampler.join()
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "baseline_anon": baseline_anon,
                      "peak_anon": peak_anon[0], "end_file": status("RssFile")}))
""")


def largest_slice_bytes(cfg, spec: RankSpec, itemsize: int = 2) -> int:
    return max(int(np.prod(tensor_slice(cfg, spec, name).local_shape(expected_shape(cfg, checkpoint_name(cfg, name)))))
               for name in rank_tensor_names(cfg, spec)) * itemsize


def layer_view(source: Path, dest: Path, layers: int) -> Path:
    """The first `layers` layers of a checkpoint: shards rewritten with only the kept tensors (the
    checkpoint reader refuses a shard tensor its index does not list, as HF would drop it
    silently), trimmed config and index, so two layer counts need one synthesized checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    dest.mkdir()
    index = json.loads((source / "model.safetensors.index.json").read_text())
    layer = re.compile(r"model\.layers\.(\d+)\.")
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if not (m := layer.match(k)) or int(m[1]) < layers}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(source / shard, framework="pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys() if index["weight_map"].get(k) == shard}
            save_file(kept, dest / shard, metadata=f.metadata())
    for f in source.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dest / f.name)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.fixture(scope="module")
def export_memory(tmp_path_factory):
    """Peak memory of exporting rank 0 of TP8 (bf16, hidden 2048, vocab 128256) with 1 and 4
    layers, each in a fresh interpreter; numbers in bytes."""
    from export.synth import synthesize_checkpoint
    root = tmp_path_factory.mktemp("memory")
    full = synthesize_checkpoint(MEM_CFG, root / "ckpt4", dtype="bfloat16", seed=0, progress=False, durable=False)
    checkpoints = {4: full, 1: layer_view(full, root / "ckpt1", 1)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {n: subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD, str(ck), str(root / f"art{n}")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n, ck in checkpoints.items()}
    results = {}
    for n, run in runs.items():
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        results[n] = json.loads(out.strip().splitlines()[-1])
    checkpoint_bytes = sum(f.stat().st_size for f in full.glob("*.safetensors"))
    slice_bytes = largest_slice_bytes(MEM_CFG, MEM_SPEC)
    print(f"\ncheckpoint {checkpoint_bytes / 2**20:.0f} MiB, largest rank-0 slice {slice_bytes / 2**20:.1f} MiB")
    for n, r in results.items():
        print(f"{n} layer(s): baseline {r['baseline'] / 2**20:.0f} MiB, peak {r['peak'] / 2**20:.0f} MiB "
              f"(+{(r['peak'] - r['baseline']) / 2**20:.0f}); anonymous baseline {r['baseline_anon'] / 2**20:.0f}"
              f" MiB, peak {r['peak_anon'] / 2**20:.0f} MiB (+{(r['peak_anon'] - r['baseline_anon']) / 2**20:.0f})")
    return {"runs": results, "checkpoint": checkpoint_bytes, "slice": slice_bytes}


MB = 10**6
OVERHEAD = 400 * MB  # torch.export + torch.onnx on a meta module, the traced graph

@pytest.mark.slow
def test_export_peak_rss_is_bounded_by_a_few_slices(export_memory):
    run, slice_bytes = export_memory["runs"][4], export_memory["slice"]
    growth = run["peak"] - run["baseline"]
    assert growth < export_memory["checkpoint"] / 2
    assert growth < 3 * slice_bytes + OVERHEAD, (growth, slice_bytes)


@pytest.mark.slow
def test_export_peak_rss_is_flat_in_layers(export_memory):
    one, four = export_memory["runs"][1], export_memory["runs"][4]
    assert abs((four["peak"] - four["baseline"]) - (one["peak"] - one["baseline"])) < 100 * MB


@pytest.mark.slow
def test_export_anonymous_memory_is_bounded_and_flat(export_memory):
    """What the process allocates (not counting mapped checkpoint pages) streams: bounded by a
    few slices plus the exporter's overhead, the same for 1 and 4 layers."""
    one, four = export_memory["runs"][1], export_memory["runs"][4]
    growth = {n: r["peak_anon"] - r["baseline_anon"] for n, r in ((1, one), (4, four))}
    assert growth[4] < 3 * export_memory["slice"] + OVERHEAD, growth
    assert abs(growth[4] - growth[1]) < 100 * MB, growth


def test_meta_recipe_traces_one_template_per_layer_pattern(tmp_path, monkeypatch):
    """Meta's FP8 recipe leaves the first and last layer unquantized: per stage, one trace per
    distinct layer pattern (2), not a whole-stage trace — and the stamped graph computes exactly
    what a whole-stage trace of the same stage computes."""
    from runner.backends.base import make_feed
    from runner.backends.ort import OrtBackend
    from tests.conftest import hf_model, save_hf
    checkpoint = save_hf(hf_model(tiny_config(num_hidden_layers=8)), tmp_path / "ckpt")
    options = ExportOptions(pp=2, dtype="float32", quant="fp8", fp8_recipe="meta", max_seq_len=MAX_SEQ_LEN)
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16))
    traced = []
    real_trace, real_rank_graph = onnx_export.trace_rank_graph, onnx_export.rank_graph

    def counting(cfg, spec, opts, *args):
        traced.append((spec.pp_rank, opts.quant.layer_pattern(layer_linears(cfg), spec.pp_rank, cfg.num_hidden_layers)))
        return real_trace(cfg, spec, opts, *args)

    monkeypatch.setattr(onnx_export, "trace_rank_graph", counting)
    stamped = export_artifact(checkpoint, tmp_path / "stamped", options, calibration_tokens=tokens,
                              calibration_source="seeded ids")
    mlp_only = (False, False, False, False, True, True, True)
    assert traced == [(0, (False,) * 7), (0, mlp_only), (1, mlp_only), (1, (False,) * 7)]
    weights = {i.name: i.data_type for r in range(2)
               for i in onnx.load(str(stamped / f"rank{r}" / "model.onnx"), load_external_data=False).graph.initializer}
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    assert [weights[f"model.layers.{i}.mlp.up_proj.weight"] == fp8 for i in range(8)] == [False] + [True] * 6 + [False]
    assert not any(weights[f"model.layers.{i}.self_attn.q_proj.weight"] == fp8 for i in range(8))

    def whole_stage(cfg, spec, opts, dtype, workdir):
        model = real_trace(cfg, spec, opts, dtype, workdir)
        strip_metadata(model)
        return model

    monkeypatch.setattr(onnx_export, "rank_graph", whole_stage)
    traced_whole = export_artifact(checkpoint, tmp_path / "whole", options, calibration_tokens=tokens,
                                   calibration_source="seeded ids")
    monkeypatch.setattr(onnx_export, "rank_graph", real_rank_graph)
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # a shorter second prompt
    outputs = []
    for artifact in (stamped, traced_whole):
        backend = OrtBackend(artifact)
        backend.start(2)
        outputs.append(backend.infer(make_feed(ids, np.tile(np.arange(9), (2, 1)), mask))["logits"])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_the_manifest_round_trips_the_export_options_exactly(tmp_path):
    """One options object: written whole into manifest.json, read back equal (ranks and
    patterns as tuples), and refused by name when edited into something invalid."""
    import json

    from export.errors import ArtifactError
    from export.manifest import Manifest, RankEntry
    from export.options import ExportOptions
    options = ExportOptions(tp=2, pp=2, dtype="bfloat16", quant="fp8", kv_cache="concat", max_batch=3, max_seq_len=96,
                            logits="last", ranks=(1, 3), fp8_recipe="meta", fp8_exclude=("re:.*o_proj", "*.mlp.up_proj"),
                            fp8_checkpoint_exclusions="ignore", fp8_smoothing=0.5)
    manifest = Manifest(config=tiny_config(), options=options, opset=24, ranks=(RankEntry(1, 1, 0, (0, 1), (), (), 2),),
                        files={}, source={}, toolchain={})
    back = Manifest.from_json(manifest.to_json(), "m.json")
    assert back.options == options and (back.tp, back.kv_cache, back.cache_layout.name) == (2, "concat", "concat")
    raw = json.loads(manifest.to_json())
    raw["options"]["fp8_recipe"] = "default"  # an earlier llama405's name for every-linear FP8
    assert Manifest.from_json(json.dumps(raw), "m.json").options == dataclasses.replace(options, fp8_recipe="all")
    raw["options"]["fp8_recipe"] = "fancy"
    with pytest.raises(ArtifactError, match=r"m.json: options: --fp8-recipe 'fancy': choose meta or all"):
        Manifest.from_json(json.dumps(raw), "m.json")
