"""Parity harness: metrics on known arrays, teacher forcing on fake backends, and the
`llama405 parity` command on real artifacts (ORT vs torch), including one whose weights were
tampered with after export."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import ExportOptions, export_artifact
from runner.cli import main as cli_main
from runner.compare import DEFAULT_TOLERANCES, Tolerance, compare_kv, compare_logits
from runner.parity import run_parity
from tests.conftest import hf_model, save_hf, tiny_config

TOKENS = "1,17,42,99,5,200,31"
STEPS = 3


# -- metrics ---------------------------------------------------------------------------------

def test_identical_logits_have_zero_error():
    x = np.random.default_rng(0).standard_normal((2, 5, 11)).astype(np.float32)
    m = compare_logits(x, x.copy())
    assert m["max_abs"] == 0 and m["mean_abs"] == 0 and m["p99_abs"] == 0 and m["rel_l2"] == 0
    assert m["cosine"] == pytest.approx(1.0) and m["top1"] == 1.0 and m["top5"] == 1.0
    assert m["positions"] == 10


def test_known_logit_differences():
    ref = np.arange(7, dtype=np.float64)  # argmax 6, top-5 {2..6}, ||ref||^2 = 91
    swapped = ref.copy()
    swapped[[5, 6]] = [6, 5]  # top-1 flips, top-5 set unchanged, two errors of 1
    bumped = ref.copy()
    bumped[0] = 100.0  # new argmax and one new top-5 member, one error of 100
    m = compare_logits(np.stack([ref, swapped, bumped])[None], np.stack([ref, ref, ref])[None])
    assert m["max_abs"] == 100.0
    assert m["mean_abs"] == pytest.approx(102 / 21)
    assert m["rel_l2"] == pytest.approx(math.sqrt(10002 / 273))
    assert m["cosine"] == pytest.approx(math.sqrt(91 / 10091))  # the bumped row is the worst
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx((1 + 1 + 0.8) / 3)


def test_nan_logits_count_as_nonfinite_and_fail():
    a = np.zeros((1, 2, 4), dtype=np.float32)
    a[0, 1, 2] = np.nan
    m = compare_logits(a, np.zeros_like(a))
    assert m["nonfinite_a"] == 1 and m["nonfinite_b"] == 0


def test_kv_metrics_name_the_worst_layer_and_part():
    rng = np.random.default_rng(1)
    layers = [(rng.standard_normal((1, 2, 4, 8)), rng.standard_normal((1, 2, 4, 8))) for _ in range(3)]
    same = compare_kv(layers, [(k.copy(), v.copy()) for k, v in layers])
    assert same["max_abs"] == 0 and same["rel_l2"] == 0
    changed = [(k.copy(), v.copy()) for k, v in layers]
    changed[2][1][0, 1, 3, 5] += 0.5
    m = compare_kv(changed, layers)
    assert m["max_abs"] == pytest.approx(0.5)
    assert (m["worst_layer"], m["worst_part"]) == (2, "value")
    assert m["per_layer_max_abs"] == pytest.approx([0.0, 0.0, 0.5])


def test_artifact_reader_decodes_bfloat16_and_refuses_stray_locations(tmp_path):
    import ml_dtypes
    import torch
    from onnx import TensorProto

    from export.errors import ArtifactError
    from runner.backends.torch_artifact import _read_initializer

    values = np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, 7.0]], dtype=ml_dtypes.bfloat16)
    (tmp_path / "model.onnx.data").write_bytes(bytes(64) + values.tobytes())

    def init(location):
        proto = TensorProto(name="w", data_type=TensorProto.BFLOAT16, dims=[2, 3])
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "64"), ("length", "12")):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    tensor = _read_initializer(init("model.onnx.data"), tmp_path, tmp_path / "model.onnx", {})
    assert tensor.dtype == torch.bfloat16
    assert torch.equal(tensor.float(), torch.from_numpy(values.astype(np.float32)))
    with pytest.raises(ArtifactError, match="not a file beside the graph"):
        _read_initializer(init("../model.onnx.data"), tmp_path / "sub", tmp_path / "sub" / "model.onnx", {})


# -- teacher forcing on fake backends --------------------------------------------------------

class FakeBackend:
    """Logits are a fixed function of (token, position); `shift` is added from position `at` on."""

    kv_cache, max_seq_len = "concat", 64

    def __init__(self, name: str, shift: float = 0.0, at: int = 10**9):
        self.name, self.config = name, tiny_config(vocab_size=32)
        self.shift, self.at = shift, at
        self.fed: list[int] = []

    def start(self, batch: int) -> None:
        self.fed, self._kv = [], np.zeros((1, 2, 0, 4))

    def infer(self, feed):
        ids, pos = feed["input_ids"][0], feed["position_ids"][0]
        self.fed += ids.tolist()
        grid = np.arange(self.config.vocab_size)
        logits = np.sin(ids[:, None] * 0.37 + pos[:, None] * 1.3 + grid[None] * 0.11)
        logits = logits + np.where(pos >= self.at, self.shift, 0.0)[:, None]
        new = np.broadcast_to(ids[None, None, :, None].astype(float), (1, 2, len(ids), 4))
        self._kv = np.concatenate([self._kv, new], axis=2)
        return {"logits": logits[None].astype(np.float32)}

    def cache(self):
        return [(self._kv, self._kv * 2)]


def test_decode_steps_feed_the_reference_tokens_to_both():
    a, b = FakeBackend("a", shift=1.0, at=100), FakeBackend("b")
    report = run_parity(a, b, [3, 4, 5], steps=4, tolerance=DEFAULT_TOLERANCES["float32"])
    assert report.passed and len(report.rows) == 5
    assert a.fed == b.fed and b.fed[3:] == [r.next_b for r in report.rows[:-1]]
    assert [len(r.tokens) for r in report.rows] == [3, 1, 1, 1, 1]


def test_divergence_names_the_step_and_output():
    a, b = FakeBackend("a", shift=0.5, at=4), FakeBackend("b")  # prefill: positions 0-2; step k: k + 2
    report = run_parity(a, b, [3, 4, 5], steps=4, tolerance=DEFAULT_TOLERANCES["float32"])
    assert not report.passed
    assert [r.passed for r in report.rows] == [True, True, False, False, False]
    assert report.failures[0].startswith("step 2 (decode) logits max_abs 0.5 > 0.001")
    assert "FAIL logits" in report.format_table()
    loose = Tolerance(max_abs=1.0, rel_l2=10.0, min_cosine=-1.0, min_top1=0.0, kv_max_abs=1.0)
    assert run_parity(FakeBackend("a", 0.5, 4), FakeBackend("b"), [3, 4, 5], 4, loose).passed


# -- the command on real artifacts -----------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One tiny checkpoint and two artifacts: fp32 TP2 static, fp16 TP1 concat."""
    root = tmp_path_factory.mktemp("parity")
    checkpoint = save_hf(hf_model(tiny_config(num_hidden_layers=2)), root / "ckpt")
    made = {"ckpt": checkpoint}
    for name, options in {
        "fp32_tp2_static": ExportOptions(tp=2, dtype="float32", kv_cache="static", max_seq_len=64),
        "fp16_tp1_concat": ExportOptions(tp=1, dtype="float16", kv_cache="concat", max_seq_len=64),
    }.items():
        made[name] = export_artifact(checkpoint, root / name, options, force=True)
    return made


def parity(*argv) -> int:
    return cli_main(["parity", *map(str, argv)])


@pytest.mark.parametrize("name", ["fp32_tp2_static", "fp16_tp1_concat"])
def test_ort_matches_torch_on_the_artifact(artifacts, name, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code = parity("--artifact", artifacts[name], "--a", "ort", "--b", "torch", "--tokens", TOKENS,
                  "--steps", STEPS, "--report", report_path)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and "step" in out and "kv_max_abs" in out
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["failures"] == []
    assert [row["step"] for row in report["rows"]] == list(range(STEPS + 1))
    assert report["rows"][0]["kind"] == "prefill" and len(report["rows"][0]["tokens"]) == 7
    assert report["tolerance_preset"] == ("float32" if name.startswith("fp32") else "float16")
    for row in report["rows"]:
        assert row["logits"]["top1"] == 1.0 and row["kv_cache"]["max_abs"] < 0.05


@pytest.mark.parametrize("name", ["fp32_tp2_static", "fp16_tp1_concat"])
def test_ort_matches_the_reference_checkpoint(artifacts, name, capsys):
    code = parity("--artifact", artifacts[name], "--a", "ort", "--b", "torch", "--reference", artifacts["ckpt"],
                  "--tokens", TOKENS, "--steps", STEPS, "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] and report["b"].startswith("torch over checkpoint")


def perturb(artifact: Path, rank: int, tensor: str, scale: float = 0.5) -> None:
    """Add noise to one initializer, in place inside model.onnx.data (sizes stay the same)."""
    rank_dir = artifact / f"rank{rank}"
    model = onnx.load(str(rank_dir / "model.onnx"), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == tensor)
    info = {e.key: e.value for e in init.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    offset, length = int(info["offset"]), int(info["length"])
    with open(rank_dir / info["location"], "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), dtype=dtype).astype(np.float32)
        noise = np.random.default_rng(0).standard_normal(values.shape) * scale * values.std()
        f.seek(offset)
        f.write((values + noise).astype(dtype).tobytes())


def test_perturbed_weights_fail_against_the_reference_only(artifacts, tmp_path, capsys):
    tampered = Path(shutil.copytree(artifacts["fp16_tp1_concat"], tmp_path / "tampered"))
    perturb(tampered, rank=0, tensor="model.layers.1.mlp.down_proj.weight")
    common = ("--artifact", tampered, "--a", "ort", "--b", "torch", "--tokens", TOKENS, "--steps", STEPS)

    code = parity(*common, "--reference", artifacts["ckpt"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL: step 0 (prefill) logits" in out
    # Both sides of the plain comparison read the same (tampered) weights: the runtimes agree.
    assert parity(*common) == 0, capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--artifact", "{tmp}/missing"], "no such directory"),
    (["--artifact", "{fp32}", "--steps", "-1"], "--steps -1"),
    (["--artifact", "{fp32}", "--tokens", "1,256"], "token id 256 is outside"),
    (["--artifact", "{fp32}", "--tokens", "1,x"], "expected integers"),
    (["--artifact", "{fp32}", "--tokens", TOKENS, "--steps", "60"], "max_seq_len=64"),
    (["--artifact", "{fp32}", "--b", "ort", "--reference", "{ckpt}"], "use --b torch"),
    (["--artifact", "{fp32}", "--a", "trt"], "engine.plan"),
])
def test_bad_input_exits_2_with_one_line(artifacts, tmp_path, capsys, argv, message):
    paths = {"tmp": tmp_path, "fp32": artifacts["fp32_tp2_static"], "ckpt": artifacts["ckpt"]}
    code = parity(*[a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
