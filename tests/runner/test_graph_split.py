"""Cutting a rank graph at its DistCollectives and running the pieces with onnxruntime.

The toy rank graph mimics what matters in a Llama rank:
  * a position-derived tensor (``scale``) built once from an input and read after every
    all-reduce (like rotary cos/sin or the attention mask),
  * a residual stream carried across collectives,
  * a graph output made in the first segment (like a KV present),
  * a weight only used late (transposed in the graph, as the exporter's ``optimize=False``
    output does) -- it must be loaded and transposed where it is used, not carried from the start.
Two ranks hold different weights for the sharded matmuls and the same replicated weight; the
test plays both ranks in one process and sums their collective inputs, exactly what the ORT
backend does when it simulates ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.collectives import dist_collective_attributes
from export.errors import ArtifactError
from runner.backends.graph_split import make_session, split_at_collectives

D = 8
TP = 2


def _collective(name: str, src: str, dst: str) -> onnx.NodeProto:
    node = helper.make_node("DistCollective", [src], [dst], name=name)
    node.attribute.extend(dist_collective_attributes(TP))
    return node


def _rank_weights(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + rank)  # sharded: differs per rank
    shared = np.random.default_rng(7)  # replicated: identical on every rank
    return {
        "w1": rng.standard_normal((D, D)).astype(np.float32) / D,
        "w2_t": rng.standard_normal((D, D)).astype(np.float32) / D,  # stored [out, in]
        "w3": shared.standard_normal((D, 3)).astype(np.float32),
    }


def _rank_graph(weights: dict[str, np.ndarray], logits_from_collective: bool = False) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["pos"], ["pos_f"], to=f),
        helper.make_node("Mul", ["pos_f", "tenth"], ["scale"]),  # [B, S, 1]
        helper.make_node("Mul", ["x", "scale"], ["present"]),  # graph output, segment 0
        helper.make_node("MatMul", ["present", "w1"], ["part1"]),
        _collective("ar0", "part1", "sum1"),
        helper.make_node("Add", ["x", "sum1"], ["h1"]),  # residual crosses the cut
        helper.make_node("Mul", ["h1", "scale"], ["h1s"]),
        helper.make_node("Transpose", ["w2_t"], ["w2"], perm=[1, 0]),
        helper.make_node("MatMul", ["h1s", "w2"], ["part2"]),
        _collective("ar1", "part2", "sum2"),
        helper.make_node("Add", ["h1", "sum2"], ["h2"]),
        helper.make_node("Mul", ["h2", "scale"], ["h2s"]),
        helper.make_node("MatMul", ["h2s", "w3"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array(0.1, dtype=np.float32), "tenth"))
    outputs = [helper.make_tensor_value_info("logits", f, ["B", "S", 3]),
               helper.make_tensor_value_info("present", f, ["B", "S", D])]
    if logits_from_collective:
        # Last op is the all-reduce itself (as for the lm_head partial sums).
        nodes[-1] = helper.make_node("MatMul", ["h2s", "w3"], ["logits_part"])
        nodes.append(_collective("ar2", "logits_part", "logits"))
    graph = helper.make_graph(
        nodes, "toy_rank",
        [helper.make_tensor_value_info("x", f, ["B", "S", D]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, ["B", "S", 1])],
        outputs, initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])


def _write_rank(directory: Path, model: onnx.ModelProto) -> Path:
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    return directory


def _torch_reference(x, pos, ranks: list[dict[str, np.ndarray]], logits_from_collective: bool):
    t = {k: [torch.from_numpy(r[k]) for r in ranks] for k in ranks[0]}
    x, scale = torch.from_numpy(x), torch.from_numpy(pos).float() * 0.1
    present = x * scale
    h1 = x + sum(present @ w for w in t["w1"])
    h2 = h1 + sum((h1 * scale) @ w.T for w in t["w2_t"])
    logits_per_rank = [(h2 * scale) @ w for w in t["w3"]]
    logits = sum(logits_per_rank) if logits_from_collective else logits_per_rank[0]
    return logits.numpy(), present.numpy()


def _run_ranks(rank_dirs: list[Path], feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The ORT backend's loop, all ranks in one process: run segment k everywhere, then sum."""
    split = [split_at_collectives(d / "model.onnx") for d in rank_dirs]
    sessions = [[make_session(s, d) for s in segs] for segs, d in zip(split, rank_dirs)]
    envs = [dict(feeds) for _ in rank_dirs]
    for k in range(len(split[0])):
        for segs, sess, env in zip(split, sessions, envs):
            segment = segs[k]
            values = sess[k].run(segment.outputs, {name: env[name] for name in segment.inputs})
            env.update(zip(segment.outputs, values))
        segment = split[0][k]
        if segment.collective_input is not None:
            reduced = sum(env[segment.collective_input] for env in envs)
            for env in envs:
                env[segment.collective_output] = reduced
    return envs


@pytest.fixture
def feeds():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((2, 5, D)).astype(np.float32),
            "pos": rng.integers(0, 50, size=(2, 5, 1)).astype(np.int64)}


@pytest.mark.parametrize("logits_from_collective", [False, True])
def test_split_two_ranks_matches_torch(tmp_path, feeds, logits_from_collective):
    ranks = [_rank_weights(r) for r in range(TP)]
    dirs = [_write_rank(tmp_path / f"rank{r}", _rank_graph(w, logits_from_collective)) for r, w in enumerate(ranks)]
    before = {d: sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir()) for d in dirs}

    envs = _run_ranks(dirs, feeds)

    logits, present = _torch_reference(feeds["x"], feeds["pos"], ranks, logits_from_collective)
    for env in envs:
        np.testing.assert_allclose(env["logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(env["present"], present, rtol=1e-6, atol=1e-6)
    assert {d: sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir()) for d in dirs} == before


def test_segment_structure(tmp_path, monkeypatch):
    rank_dir = _write_rank(tmp_path / "rank0", _rank_graph(_rank_weights(0)))
    segments = split_at_collectives(rank_dir / "model.onnx")
    assert len(segments) == 3
    first, middle, last = segments

    assert (first.collective_input, first.collective_output) == ("part1", "sum1")
    assert (middle.collective_input, middle.collective_output) == ("part2", "sum2")
    assert last.collective_input is None and last.collective_output is None
    assert set(first.inputs) <= {"x", "pos"}
    assert set(first.outputs) == {"scale", "present", "part1"} and first.graph_outputs == ["present"]
    # Position-derived tensor built once and passed along; residual stream crosses the cut.
    assert {"scale", "sum1", "x"} <= set(middle.inputs) and {"h1", "part2"} <= set(middle.outputs)
    assert {"scale", "sum2", "h1"} == set(last.inputs) and last.outputs == ["logits"]

    monkeypatch.chdir(rank_dir)  # onnx.checker resolves external data against the cwd
    inits = [{i.name for i in s.model.graph.initializer} for s in segments]
    assert inits == [{"tenth", "w1"}, {"w2_t"}, {"w3"}]  # late weight stays late
    for segment in segments:
        for init in segment.model.graph.initializer:
            location = {e.key: e.value for e in init.external_data}["location"]
            assert location == "model.onnx.data" and not init.raw_data
        onnx.checker.check_model(segment.model)


def test_make_session_reads_weights_from_rank_dir_only(tmp_path, feeds, monkeypatch):
    rank_dir = _write_rank(tmp_path / "rank0", _rank_graph(_rank_weights(0)))
    segment = split_at_collectives(rank_dir / "model.onnx")[0]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resolution must not depend on the working directory
    session = make_session(segment, rank_dir)
    present, part1 = (session.run(["present", "part1"], {n: feeds[n] for n in segment.inputs}))
    scale = feeds["pos"].astype(np.float32) * np.float32(0.1)
    np.testing.assert_allclose(part1, (feeds["x"] * scale) @ _rank_weights(0)["w1"], rtol=1e-5, atol=1e-6)
    assert os.listdir(elsewhere) == []


def test_missing_weights_file_is_an_artifact_error(tmp_path):
    rank_dir = _write_rank(tmp_path / "rank0", _rank_graph(_rank_weights(0)))
    segment = split_at_collectives(rank_dir / "model.onnx")[0]
    (rank_dir / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="model.onnx.data"):
        make_session(segment, rank_dir)


def test_missing_graph_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        split_at_collectives(tmp_path / "rank0" / "model.onnx")


def test_non_all_reduce_collective_is_refused(tmp_path):
    model = _rank_graph(_rank_weights(0))
    for attribute in model.graph.node[4].attribute:
        if attribute.name == "collective_operation":
            attribute.s = b"all_gather"
    rank_dir = _write_rank(tmp_path / "rank0", model)
    with pytest.raises(ArtifactError, match="all_gather"):
        split_at_collectives(rank_dir / "model.onnx")
