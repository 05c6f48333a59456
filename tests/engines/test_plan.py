"""Memory planner: figures checked against arithmetic written out by hand (8B, 70B, 405B)."""

from __future__ import annotations

import argparse
import json

import pytest

from engines import cli
from engines.plan import (GiB, PlanRequest, activation_bytes, kv_cache_bytes, largest_max_batch, plan, plan_json,
                          suggestion, weights_bytes)
from export.cli_flags import ArgumentParser
from export.config import preset
from export.errors import ConfigError, ShardingError
from export.sharding import RankSpec
from tests.conftest import tiny_config

B8, B70, B405 = preset("llama-3.1-8b"), preset("llama-3.1-70b"), preset("llama-3.1-405b")
V = 128256
ROPE = 2 * 131072 * 64 * 2  # RoPE cos, sin tables [max_position_embeddings, head_dim / 2] fp16/bf16, every rank


# -- weights ---------------------------------------------------------------------------------

def test_8b_tp1_fp16_weights_are_two_bytes_per_parameter():
    # layer: attention 4096*128*(2*32 + 2*8) + MLP 3*4096*14336 + two norms 2*4096
    layer = 4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336 + 2 * 4096  # 218,112,000
    params = 32 * layer + 2 * V * 4096 + 4096  # embedding + lm_head + final norm
    assert params == B8.num_parameters() == 8_030_261_248
    assert weights_bytes(B8, RankSpec(0, 1), "none", "float16") == 2 * params + ROPE == 16_094_076_928


def test_70b_tp4_bf16_rank0_weights():
    # per rank: q 2048x8192, k/v 256x8192 each, o 8192x2048, gate/up/down 7168x8192, norms 2x8192
    layer = 2048 * 8192 + 2 * 256 * 8192 + 8192 * 2048 + 3 * 7168 * 8192 + 2 * 8192  # 213,925,888
    assert layer == 213_925_888
    # embedding rows 128256/4 = 32064; lm_head columns 8192/4 = 2048; final norm replicated
    elements = 80 * layer + 32064 * 8192 + 2048 * V + 8192
    assert weights_bytes(B70, RankSpec(0, 4), "none", "bfloat16") == 2 * elements + ROPE == 35_312_386_048


def test_70b_tp4_pp2_first_stage_has_embedding_last_has_head():
    layer = 213_925_888
    first = 2 * (32064 * 8192 + 40 * layer) + ROPE  # layers 0-39 + embedding
    last = 2 * (40 * layer + 8192 + 2048 * V) + ROPE  # layers 40-79 + final norm + lm_head
    assert weights_bytes(B70, RankSpec(0, 4, 0, 2), "none", "bfloat16") == first == 17_672_962_048
    assert weights_bytes(B70, RankSpec(3, 4, 1, 2), "none", "bfloat16") == last == 17_672_978_432


def test_405b_tp8_fp8_rank0_weights():
    # TP8 rank: 16 query heads (2048 rows), 1 KV head (128 rows), FFN 53248/8 = 6656.
    fp8_weights = (2048 * 16384          # q_proj
                   + 2 * 128 * 16384      # k_proj, v_proj
                   + 16384 * 2048         # o_proj
                   + 3 * 6656 * 16384)    # gate, up, down
    assert fp8_weights == 398_458_880  # 1 byte each
    # per-output-channel scales in fp16: q 2048, k 128, v 128, o 16384, gate 6656, up 6656, down 16384
    scales = 2 * (2048 + 128 + 128 + 16384 + 6656 + 6656 + 16384)  # 96,768
    act_scales = 7 * 2  # one per-tensor input scale per linear
    norms = 2 * 16384 * 2
    layer = fp8_weights + scales + act_scales + norms
    assert layer == 398_621_198
    embedding = 16032 * 16384 * 2  # 128256 / 8 rows, fp16
    lm_head = 2048 * V * 2  # 16384 / 8 columns, fp16
    final_norm = 16384 * 2
    expected = 126 * layer + embedding + lm_head + final_norm + ROPE
    assert weights_bytes(B405, RankSpec(0, 8), "fp8", "float16", "all") == expected == 51_310_531_300  # 47.79 GiB


def test_405b_tp8_fp8_meta_recipe_keeps_attention_and_end_layers_in_fp16():
    # Meta's recipe (export/fp8.py): attention linears and layers 0 and 125 stay fp16.
    attention_fp16 = (2048 * 16384 + 2 * 128 * 16384 + 16384 * 2048) * 2  # q, k, v, o
    mlp_fp8 = 3 * 6656 * 16384 + 2 * (6656 + 6656 + 16384) + 3 * 2  # weights + channel scales + input scales
    norms = 2 * 16384 * 2
    middle = attention_fp16 + mlp_fp8 + norms
    assert middle == 469_886_982
    end = (2048 * 16384 + 2 * 128 * 16384 + 16384 * 2048 + 3 * 6656 * 16384) * 2 + norms
    assert end == 796_983_296
    expected = 124 * middle + 2 * end + 2 * 525_336_576 + 16384 * 2 + ROPE
    assert weights_bytes(B405, RankSpec(0, 8), "fp8", "float16", "meta") == expected == 60_944_212_712
    # an explicit exclusion of every down_proj
    plain = weights_bytes(B405, RankSpec(0, 8), "fp8", "float16", "all")
    excluded = weights_bytes(B405, RankSpec(0, 8), "fp8", "float16", "all", ("*.mlp.down_proj",))
    assert excluded - plain == 126 * (16384 * 6656 * (2 - 1) - 16384 * 2 - 2)


# -- KV cache --------------------------------------------------------------------------------

def test_8b_kv_cache_is_one_gib_for_8k_tokens():
    # 32 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes x 8192 tokens = 2^30
    assert kv_cache_bytes(B8, RankSpec(0, 1), 1, 8192, "float16") == 32 * 8 * 128 * 2 * 2 * 8192 == GiB


def test_405b_kv_cache_one_head_per_rank():
    # 126 layers x 1 KV head/rank x 128 x 2 x 2 bytes x batch 1 x 131072 tokens
    expected = 126 * 1 * 128 * 2 * 2 * 1 * 131072
    assert kv_cache_bytes(B405, RankSpec(0, 8), 1, 131072, "float16") == expected == 8_455_716_864
    # TP16 replicates the 8 KV heads: still one head per rank
    assert kv_cache_bytes(B405, RankSpec(5, 16), 1, 131072, "float16") == expected
    # batch scales linearly; fp8 cache halves it; concat keeps past and present (twice)
    assert kv_cache_bytes(B405, RankSpec(0, 8), 8, 131072, "float16") == 8 * expected
    assert kv_cache_bytes(B405, RankSpec(0, 8), 1, 131072, "fp8") == expected // 2
    assert kv_cache_bytes(B405, RankSpec(0, 8), 1, 131072, "float16", "concat") == 2 * expected


def test_pipeline_stage_holds_its_layers_cache_only():
    # 405B PP2: 63 layers per stage
    full = kv_cache_bytes(B405, RankSpec(0, 8), 1, 1024, "float16")
    assert kv_cache_bytes(B405, RankSpec(0, 8, 1, 2), 1, 1024, "float16") == full // 2


# -- activations -----------------------------------------------------------------------------

def test_8b_decode_step_activations():
    # B=1, S=1, L=4096, fp16, last stage, unfused attention
    hidden = 4 * 1 * 1 * 4096 * 2
    qkv = 1 * 1 * (2 * 32 + 2 * 8) * 128 * 2
    rotary = 2 * 1 * 1 * 128 * 2
    scores = 1 * 32 * 1 * 4096 * (4 + 4 + 2)
    mask = 1 * 1 * 4096 * 4
    mlp = 3 * 1 * 1 * 14336 * 2
    logits = 1 * 1 * V * (2 + 4)
    expected = hidden + qkv + rotary + scores + mask + mlp + logits
    assert expected == 2_236_416
    assert activation_bytes(B8, RankSpec(0, 1), 1, 1, 4096, "float16") == expected
    assert activation_bytes(B8, RankSpec(0, 1), 1, 1, 4096, "float16", attention="fused") == expected - scores - mask
    assert activation_bytes(B8, RankSpec(0, 1), 1, 1, 4096, "float16", quant="fp8") == expected + (2 * 4096 + 32 * 128 + 14336)


def test_405b_prefill_scores_dominate_and_logits_only_on_last_stage():
    spec = RankSpec(0, 8)
    got = activation_bytes(B405, spec, 1, 2048, 131072, "float16", quant="fp8")
    scores = 16 * 2048 * 131072 * 10  # [1, 16 heads, 2048 tokens, 131072 keys] x (fp32 + fp32 + fp16)
    assert scores < got < scores * 1.1
    first_stage = activation_bytes(B405, RankSpec(0, 8, 0, 2), 1, 2048, 131072, "float16", quant="fp8")
    assert got - first_stage == 2048 * V * (2 + 4)  # the logits
    last_only = activation_bytes(B405, spec, 1, 2048, 131072, "float16", quant="fp8", logits="last")
    assert got - last_only == 2047 * V * (2 + 4)


# -- plans and suggestions -------------------------------------------------------------------

def test_405b_fp8_tp8_128k_batch1_plan_and_suggestion():
    request = PlanRequest.of(B405, tp=8, quant="fp8", fp8_recipe="all", max_batch=1, max_seq_len=131072)
    result = plan(request)
    assert len(result.ranks) == 8 and len({r.total_bytes for r in result.ranks}) == 1
    rank0 = result.ranks[0]
    assert rank0.weights_bytes == 51_310_531_300 and rank0.kv_cache_bytes == 8_455_716_864
    assert rank0.total_bytes == rank0.weights_bytes + rank0.kv_cache_bytes + rank0.activation_bytes
    assert not result.fits  # 2048-token prefill chunks against 128K keys, unfused: ~43 GiB of scores
    hint = suggestion(result)
    assert hint["max_batch"] is None  # batch 1 already does not fit
    for field in ("max_seq_len", "max_input_len"):
        value = hint[field]
        assert plan(request.replace(**{field: value})).fits
        assert not plan(request.replace(**{field: value + 1})).fits
    # 512-token prefill chunks fit a 80 GiB H100 with the 2 GiB reserve
    assert plan(request.replace(max_input_len=512)).fits


def test_batch_suggestion_and_capacity():
    request = PlanRequest.of(B8, tp=1, max_batch=64, max_seq_len=8192, max_input_len=512)
    result = plan(request)
    assert not result.fits
    best = suggestion(result)["max_batch"]
    assert 1 <= best < 64
    assert plan(request.replace(max_batch=best)).fits
    assert not plan(request.replace(max_batch=best + 1)).fits
    small = request.replace(max_batch=best)
    assert suggestion(plan(small)) is None
    assert largest_max_batch(small) == best  # open-ended search from a fitting plan


def test_weights_alone_too_big_says_so():
    result = plan(PlanRequest.of(B405, tp=1, max_batch=1, max_seq_len=1024))
    hint = suggestion(result)
    assert hint["max_batch"] is None and hint["max_seq_len"] is None and hint["max_input_len"] is None
    assert "weights alone" in hint["note"] and "--quant fp8" in hint["note"]


def test_plan_json_keys():
    doc = plan_json(plan(PlanRequest.of(B70, tp=8, pp=1, max_batch=4, max_seq_len=8192)))
    assert {"ranks", "gpu_bytes", "fits"} <= set(doc)
    assert doc["gpu_bytes"] == 80 * GiB
    assert all(set(r) == {"rank", "weights_bytes", "kv_cache_bytes", "activation_bytes", "total_bytes"}
               for r in doc["ranks"])
    assert [r["rank"] for r in doc["ranks"]] == list(range(8))
    assert doc["fits"] is True and doc["suggestion"] is None


def test_invalid_requests():
    with pytest.raises(ShardingError):
        plan(PlanRequest.of(B405, tp=3))
    with pytest.raises(ConfigError):
        plan(PlanRequest.of(B8, quant="int4"))
    with pytest.raises(ConfigError):
        plan(PlanRequest.of(B8, max_batch=0))


# -- command line ----------------------------------------------------------------------------

def _plan_cli(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser()  # llama405's: scoped flags are checked (and defaulted) where parsed
    sub = parser.add_subparsers(dest="command")
    cli.add_parsers(sub)
    return parser.parse_args(["plan", *argv])


def test_plan_cli_preset_json(capsys):
    args = _plan_cli(["--preset", "llama-3.1-405b", "--tp", "8", "--quant", "fp8", "--max-batch", "1",
                      "--max-seq-len", "131072", "--max-input-len", "512", "--json"])
    assert cli.run_plan(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is True and len(doc["ranks"]) == 8
    assert doc["ranks"][0]["weights_bytes"] == 60_944_212_712 and doc["request"]["fp8_recipe"] == "meta"  # the default


def test_plan_cli_fp8_recipe(capsys):
    args = _plan_cli(["--preset", "llama-3.1-405b", "--tp", "8", "--quant", "fp8", "--fp8-recipe", "all", "--json"])
    assert cli.run_plan(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranks"][0]["weights_bytes"] == 51_310_531_300 and doc["request"]["fp8_recipe"] == "all"


def test_plan_cli_table_and_gpu_size(capsys):
    args = _plan_cli(["--preset", "llama-3.1-8b", "--gpu-mem", "24GiB", "--max-batch", "32", "--max-seq-len", "8192",
                      "--max-input-len", "256"])
    assert cli.run_plan(args) == 0
    out = capsys.readouterr().out
    assert "does NOT fit a 24.00 GiB GPU" in out and "--max-batch" in out


def test_plan_cli_config_and_checkpoint(tmp_path, capsys, hf_checkpoint):
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert cli.run_plan(_plan_cli(["--config", str(tmp_path / "config.json"), "--tp", "2", "--json"])) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranks"][0]["weights_bytes"] == weights_bytes(cfg, RankSpec(0, 2))
    checkpoint, _ = hf_checkpoint
    assert cli.run_plan(_plan_cli(["--checkpoint", str(checkpoint), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["request"]["parameters"] == tiny_config(num_hidden_layers=3).num_parameters()


def test_build_host_memory_is_the_measured_factor_times_the_weights(capsys):
    from engines.plan import BUILDER_HOST_BYTES_PER_WEIGHT_BYTE, BUILDER_HOST_FIXED_BYTES
    request = PlanRequest.of(config=B405, tp=8, pp=1, quant="fp8", max_batch=1, max_seq_len=131072)
    doc = plan_json(plan(request))
    biggest = max(rank["weights_bytes"] for rank in doc["ranks"])
    assert doc["build_host_bytes"] == int(BUILDER_HOST_FIXED_BYTES + BUILDER_HOST_BYTES_PER_WEIGHT_BYTE * biggest)
    from engines.plan import format_table
    line = [x for x in format_table(plan(request)).splitlines() if x.startswith("engine build:")]
    assert len(line) == 1 and f"{BUILDER_HOST_BYTES_PER_WEIGHT_BYTE:g}x its weights" in line[0]


def test_parallel_build_warning_uses_the_factor(monkeypatch):
    import psutil

    from engines.build import host_memory_warning
    from engines.plan import BUILDER_HOST_BYTES_PER_WEIGHT_BYTE, builder_host_bytes
    from export.manifest import Manifest, RankEntry
    from export.options import ExportOptions
    ranks = tuple(RankEntry(r, r, 0, (0, 1), (), (), 0) for r in range(4))
    files = {f"rank{r}/model.onnx.data": {"size": 10 * GiB, "sha256": ""} for r in range(4)}
    manifest = Manifest(config=tiny_config(), options=ExportOptions(tp=4, max_batch=1, max_seq_len=64), opset=24,
                        ranks=ranks, files=files, source={}, toolchain={})
    available = 2 * builder_host_bytes(10 * GiB) + GiB  # two parallel builds fit, three do not
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": available})())
    assert host_memory_warning(manifest, [0, 1, 2, 3], workers=2) is None
    warning = host_memory_warning(manifest, [0, 1, 2, 3], workers=3)
    assert warning and "lower --workers" in warning and f"{BUILDER_HOST_BYTES_PER_WEIGHT_BYTE:g}x" in warning


def test_gpu_decode_width_follows_the_cache_read_against_the_weights():
    """Fixed-width decode (one shape: CUDA graphs) while reading all max_seq_len slots adds at
    most 10 % to a step's bytes; power-of-two buckets beyond (docs/batching.md)."""
    from engines.plan import format_table, gpu_decode_width
    short = plan(PlanRequest.of(B405, tp=8, quant="fp8", max_batch=8, max_seq_len=4096))
    width = gpu_decode_width(short)
    # per rank: 126 layers x 1 KV head x 128 x 2 (K, V) x 2 bytes x 4096 slots x 8 rows, over FP8 weights
    assert width["policy"] == "max" and 0.03 < width["kv_read_share"] < 0.05
    assert "GPU decode: attention over all max_seq_len slots every step" in format_table(short)
    long = plan(PlanRequest.of(B405, tp=8, quant="fp8", max_batch=8, max_seq_len=131072))
    assert gpu_decode_width(long)["policy"] == "buckets" and gpu_decode_width(long)["kv_read_share"] > 1
    assert plan_json(long)["gpu_decode_width"]["policy"] == "buckets"
    assert gpu_decode_width(plan(PlanRequest.of(B405, tp=8, quant="fp8", kv_cache="concat"))) is None  # no choice
