"""The rank's tensors are read off the modules (export/rank_layout.py over export/parallel.py):
names and checkpoint shapes agree with transformers' own LlamaForCausalLM; every module
weight carries a style that sizes it; the TP slices of a tensor tile it the way Megatron's split
does (a share each, whole KV heads replicated past n_kv); the quantizable set is the decoder
layers' linears and nothing else."""

from __future__ import annotations

import pytest
import torch

from export.model import ModelOptions, build_rank_module
from export.quantization import Fp8
from export.rank_layout import (checkpoint_name, expected_shape, quantizable_linears, rank_layout, rank_tensor_names,
                                tensor_slice)
from export.sharding import RankSpec, all_ranks
from tests.conftest import tiny_config


def _hf_parameters(cfg):
    import transformers
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg.to_hf_dict()))
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("tied", [False, True])
def test_names_order_and_shapes_are_transformers(tied):
    cfg = tiny_config(num_hidden_layers=3, tie_word_embeddings=tied)
    hf = _hf_parameters(cfg)
    names = rank_tensor_names(cfg, RankSpec(0, 1))  # in the module's order (the rank file's), not HF's
    assert sorted(names) == sorted(hf) and len(set(names)) == len(names)
    for name in hf:
        assert expected_shape(cfg, checkpoint_name(cfg, name)) == hf[name], name


def test_pipeline_stages_hold_their_layers_and_ends_once():
    cfg = tiny_config(num_hidden_layers=5)
    stages = [rank_tensor_names(cfg, s) for s in all_ranks(1, 3)]
    assert [n for stage in stages for n in stage] == rank_tensor_names(cfg, RankSpec(0, 1))
    assert stages[0][0] == "model.embed_tokens.weight" and stages[-1][-2:] == ["model.norm.weight", "lm_head.weight"]


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_slices_tile_each_tensor(tp):
    """Over the TP group a split tensor is covered exactly once (KV heads: each head by tp / n_kv
    ranks when tp exceeds them); a replicated one whole on every rank."""
    cfg = tiny_config()  # 8 heads, 2 KV heads
    for name in rank_tensor_names(cfg, RankSpec(0, 1)):
        full = expected_shape(cfg, checkpoint_name(cfg, name))
        slices = [tensor_slice(cfg, s, name) for s in all_ranks(tp)]
        if len(full) == 1:
            assert all(s.axis is None for s in slices), name
            continue
        axis = {s.axis for s in slices}.pop()
        covered = sorted(b for s in slices for b in s.blocks)
        kv = name.endswith(("k_proj.weight", "v_proj.weight"))
        repeat = tp // cfg.num_key_value_heads if kv and tp > cfg.num_key_value_heads else 1
        width = full[axis] * repeat // tp
        assert covered == sorted((start, start + width) for start in range(0, full[axis], width) for _ in range(repeat))
        # The split axis follows Megatron: outputs for q/k/v/gate/up and the vocab, inputs for o/down/lm_head.
        row_parallel = name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight"))
        assert axis == (1 if row_parallel else 0), name


def test_duplicated_kv_heads_pick_one_copy_each():
    cfg = tiny_config()
    d = cfg.head_dim
    name = "model.layers.0.self_attn.k_proj.weight"
    assert expected_shape(cfg, name, kv_dup_factor=2) == (2 * 2 * d, cfg.hidden_size)
    assert tensor_slice(cfg, RankSpec(1, 2), name, kv_dup_factor=2).blocks == ((2 * d, 3 * d),)


@pytest.mark.parametrize("quant", [None, Fp8("all")])
def test_every_module_weight_is_sized_by_its_style(quant):
    cfg = tiny_config(num_hidden_layers=2)
    options = ModelOptions(quant=quant) if quant else ModelOptions()
    for spec in all_ranks(2, 2):
        module = build_rank_module(cfg, spec, options)
        layout = rank_layout(cfg, spec)
        params = dict(module.named_parameters())
        for name in layout.names:
            owner = module.get_submodule(name.rpartition(".")[0])
            local = owner.parallel.local_shape(spec)
            stored = params[name].shape  # an FP8 linear stores its weight [in, out]
            assert tuple(stored) in (local, local[::-1]), name


def test_quantizable_linears_are_the_decoder_layers_projections():
    cfg = tiny_config(num_hidden_layers=2)
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert quantizable_linears(cfg) == [f"model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves]
    assert rank_layout(cfg, RankSpec(1, 2, 1, 2)).quantized_linears(Fp8("all", ("*.k_proj",))) == {
        f"model.layers.1.{leaf}" for leaf in leaves if leaf != "self_attn.k_proj"}


def test_a_name_outside_the_model_is_refused():
    from export.errors import ShardingError
    cfg = tiny_config(num_hidden_layers=2)
    for name in ("model.layers.2.mlp.up_proj.weight", "model.layers.0.mlp.bias", "rotary.inv_freq"):
        with pytest.raises(ShardingError, match="not part of this Llama model"):
            tensor_slice(cfg, RankSpec(0, 2), name)
