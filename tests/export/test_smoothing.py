"""--fp8-smoothing (export/smoothing.py): the up_proj -> down_proj rescaling is exact, its factors
and the down_proj input scales follow SmoothQuant's formula on what transformers computes, and
the exported artifact holds the transformed weights on every TP rank.

Oracles: transformers' LlamaForCausalLM (fp32) for the model's function and the activation
ranges, numpy for the formula, onnxruntime vs the torch reference for the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import Checkpoint
from export.errors import ConfigError
from export.manifest import load_manifest
from export.onnx_export import ExportOptions, export_artifact
from export.sharding import RankSpec
from export.smoothing import Smoothing, SmoothedCheckpoint, smoothing_factors
from runner.backends.ort import OrtBackend
from runner.backends.torch_artifact import torch_backend_from_artifact
from tests.conftest import hf_model, save_hf, tiny_config
from tests.export.test_fp8 import (CAL_TOKENS, PROMPT, graph, initializer_array, inits_by_name,
                                   max_abs, teacher_forced)

LAYERS = 3
ALPHA = 0.5
BOOSTED = (1, 7)  # (layer, intermediate channel) given a massive activation, as trained models have

pytestmark = pytest.mark.slow  # three small FP8 exports


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """(checkpoint dir, transformers model): 3 tiny layers, one down_proj input channel ~100x the rest."""
    model = hf_model(tiny_config(num_hidden_layers=LAYERS), seed=3)
    layer, channel = BOOSTED
    with torch.no_grad():
        model.model.layers[layer].mlp.up_proj.weight[channel] *= 100.0
    return save_hf(model, tmp_path_factory.mktemp("smooth") / "ckpt"), model


def hf_down_inputs(model, tokens: np.ndarray) -> dict[int, torch.Tensor]:
    """Per-channel max |input| of every down_proj over `tokens`, as transformers computes it."""
    amax: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, i=i):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
            amax[i] = torch.maximum(amax[i], x) if i in amax else x
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in tokens:  # one sequence at a time, positions from 0, as calibration does
            model(torch.from_numpy(row[None]))
    for h in hooks:
        h.remove()
    return amax


def numpy_factors(channel_amax: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    x = np.maximum(channel_amax.astype(np.float64), 1e-5)
    w = np.maximum(np.abs(weight.astype(np.float64)).max(axis=0), 1e-5)
    return x ** alpha / w ** (1 - alpha)


@pytest.fixture(scope="module")
def smoothed_arts(outlier_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth-art")
    arts = {}
    for name, tp, smoothing in (("tp1", 1, ALPHA), ("tp2", 2, ALPHA), ("plain", 1, None)):
        options = ExportOptions(dtype="float32", quant="fp8", fp8_recipe="all", max_seq_len=64, tp=tp, fp8_smoothing=smoothing)
        arts[name] = export_artifact(outlier_model[0], root / name, options, calibration_tokens=CAL_TOKENS,
                                     calibration_source="test tokens")
    return arts


def test_transform_leaves_the_model_unchanged_in_fp32(outlier_model):
    """transformers on the smoothed weights computes the same logits as on the original ones."""
    import transformers
    path, model = outlier_model
    rng = np.random.default_rng(0)
    factors = {f"model.layers.{i}": torch.from_numpy(rng.uniform(0.05, 20.0, 128)).float() for i in range(LAYERS)}
    smoothing = Smoothing(ALPHA, factors)
    state = {name: smoothing.transform(name, t.clone(), 0) for name, t in model.state_dict().items()}
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(state[down], model.state_dict()[down])
    transformed = transformers.LlamaForCausalLM(model.config).eval()
    transformed.load_state_dict(state)
    ids = torch.from_numpy(PROMPT[None])
    with torch.no_grad():
        want, got = model(ids).logits, transformed(ids).logits
    assert float((got - want).abs().max()) <= 1e-4


def test_rank_slices_and_blocks_are_the_whole_transform(outlier_model):
    """Every TP rank's slice, whole or in row blocks, is the matching slice of the transformed tensor."""
    path, _ = outlier_model
    rng = np.random.default_rng(1)
    factors = {f"model.layers.{i}": torch.from_numpy(rng.uniform(0.05, 20.0, 128)).float() for i in range(LAYERS)}
    smoothing = Smoothing(ALPHA, factors)
    plain, smoothed = Checkpoint(path), SmoothedCheckpoint(path, smoothing)
    for leaf, axis in (("up_proj", 0), ("down_proj", 1)):
        name = f"model.layers.2.mlp.{leaf}.weight"
        whole = smoothing.transform(name, plain.read_rank_tensor(name, RankSpec(0, 1)), 0)
        for tp in (1, 2, 4):
            parts = [smoothed.read_rank_tensor(name, RankSpec(r, tp)) for r in range(tp)]
            blocks = [torch.cat(list(smoothed.iter_rank_blocks(name, RankSpec(r, tp), 64 * 4 * 5))) for r in range(tp)]
            assert torch.equal(torch.cat(parts, dim=axis), whole), (leaf, tp)
            assert torch.equal(torch.cat(blocks, dim=axis), whole), (leaf, tp)


def test_down_proj_input_scales_follow_smoothquant(outlier_model, smoothed_arts):
    """The manifest's down_proj input scales are max_j(amax_x[j] / s_j) / 448, with amax_x from
    transformers' activations and s from the formula in numpy; without smoothing the boosted
    layer's scale is far larger."""
    path, model = outlier_model
    amax = hf_down_inputs(model, CAL_TOKENS)
    fp8 = load_manifest(smoothed_arts["tp1"]).extra["fp8"]
    plain = load_manifest(smoothed_arts["plain"]).extra["fp8"]
    assert fp8["smoothing"]["alpha"] == ALPHA and fp8["smoothing"]["layers"] == list(range(LAYERS))
    for i in range(LAYERS):
        weight = model.model.layers[i].mlp.down_proj.weight.detach().numpy()
        s = numpy_factors(amax[i].numpy(), weight, ALPHA)
        want = float((amax[i].numpy() / s).max()) / 448.0
        got = fp8["input_scales"][f"model.layers.{i}.mlp.down_proj"]
        assert got == pytest.approx(want, rel=1e-5), i
        assert plain["input_scales"][f"model.layers.{i}.mlp.down_proj"] == pytest.approx(
            float(amax[i].max()) / 448.0, rel=1e-5)
    layer = BOOSTED[0]
    assert (plain["input_scales"][f"model.layers.{layer}.mlp.down_proj"]
            > 5 * fp8["input_scales"][f"model.layers.{layer}.mlp.down_proj"])


def _dequantized(art: Path, rank: int, module: str) -> np.ndarray:
    """An FP8 linear's weight as the artifact holds it, dequantized to HF [out, in] fp32."""
    inits = inits_by_name(graph(art, rank))
    q = initializer_array(art, rank, inits[module + ".weight"]).astype(np.float32)  # [in, out]
    scale = initializer_array(art, rank, inits[module + ".weight_scale"]).astype(np.float32)  # [out]
    return (q * scale[None, :]).T


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_artifact_holds_the_smoothed_weights(outlier_model, smoothed_arts, layout):
    """Undoing s (numpy, from transformers' activations) on each rank's dequantized up/down weights
    gives the checkpoint's weights back within FP8's rounding (one E4M3 step: 1/8 of the row's
    largest value or less), and ORT computes what the torch reference computes on the artifact."""
    path, model = outlier_model
    art = smoothed_arts[layout]
    tp = load_manifest(art).tp
    amax = hf_down_inputs(model, CAL_TOKENS)
    for i in range(LAYERS):
        mlp = model.model.layers[i].mlp
        down, up = mlp.down_proj.weight.detach().numpy(), mlp.up_proj.weight.detach().numpy()
        s = numpy_factors(amax[i].numpy(), down, ALPHA)
        got_down = np.concatenate([_dequantized(art, r, f"model.layers.{i}.mlp.down_proj") for r in range(tp)], axis=1)
        got_up = np.concatenate([_dequantized(art, r, f"model.layers.{i}.mlp.up_proj") for r in range(tp)], axis=0)
        restored_down, restored_up = got_down / s[None, :], got_up * s[:, None]
        for got, want in ((restored_down, down), (restored_up, up)):
            step = np.abs(want).max(axis=1, keepdims=True) / 8  # E4M3: <= 2^-4 relative, 1/8 of amax at worst
            assert np.all(np.abs(got - want) <= step + 1e-6), i
    ids = PROMPT[:16]
    got, _ = teacher_forced(OrtBackend(art), ids, prefill=12)
    ref, _ = teacher_forced(torch_backend_from_artifact(art), ids, prefill=12)
    assert max_abs(got, ref) <= 1e-4


def test_alpha_outside_the_unit_interval_is_refused():
    for alpha in (0.0, 1.5, -0.5, True):
        with pytest.raises(ConfigError, match="--fp8-smoothing"):
            ExportOptions(quant="fp8", fp8_smoothing=alpha).validate()


def test_factors_match_numpy():
    rng = np.random.default_rng(2)
    x, w = rng.uniform(0, 50, 32).astype(np.float32), rng.normal(size=(16, 32)).astype(np.float32)
    x[3] = 0.0  # a dead channel stays finite
    got = smoothing_factors(torch.from_numpy(x), torch.from_numpy(w), 0.7).numpy()
    np.testing.assert_allclose(got, numpy_factors(x, w, 0.7), rtol=1e-5)


def test_the_flag_reaches_the_export_options():
    from export.cli_flags import export_options_from
    from runner.cli import _parser
    base = ["export", "--checkpoint", "c", "--out", "o", "--quant", "fp8"]
    assert export_options_from(_parser().parse_args(base + ["--fp8-smoothing", "0.5"])).fp8_smoothing == 0.5
    assert export_options_from(_parser().parse_args(base + ["--fp8-smoothing", "none"])).fp8_smoothing is None
    assert export_options_from(_parser().parse_args(base)).fp8_smoothing is None  # off unless asked
    with pytest.raises(SystemExit):
        _parser().parse_args(base + ["--fp8-smoothing", "strong"])


@pytest.mark.parametrize("input_scale", ["one", None])
def test_a_prequantized_checkpoint_is_refused(outlier_model, tmp_path, input_scale):
    """Smoothing rescales unquantized weights with calibrated ranges: a checkpoint that is
    already FP8 (its own input scales, or calibrated ones over FP8 weights) cannot have it."""
    from export.errors import CheckpointError
    from tests.export.test_fp8 import write_fp8_checkpoint
    path, model = outlier_model
    fp8 = write_fp8_checkpoint(model, path, tmp_path / "fp8", "row", input_scale)
    options = ExportOptions(dtype="float32", quant="fp8", fp8_recipe="all", max_seq_len=64, fp8_smoothing=0.5)
    with pytest.raises(CheckpointError, match="drop --fp8-smoothing"):
        export_artifact(fp8.path, tmp_path / "art", options, calibration_tokens=CAL_TOKENS, calibration_source="t")
