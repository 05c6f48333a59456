"""What a rank's module holds, read off the module itself: its tensor names in file order, each
tensor's parallel style (so its checkpoint slice, local and checkpoint shapes) and which linears
a quantization scheme may take — from a meta-device build of export/model.py, never from a table.

The checkpoint reader, the rank-tensor streamer, the exporter and the planner ask this module,
so a change of split or of the layer's linears in model.py reaches all of them at once.

Every decoder layer has the same modules, so one template (a one-layer build of the rank's TP
position, both pipeline ends present; milliseconds on the meta device even for 405B) answers
for every layer: `model.layers.{i}.LEAF` is the template's `model.layers.0.LEAF`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

from export.config import LlamaConfig
from export.errors import InternalError, ShardingError
from export.parallel import ParallelStyle
from export.sharding import RankSpec, TensorSlice, stage_layers

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TEMPLATE_LAYER = "model.layers.0."
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class TensorPlace:
    """One checkpoint tensor of the module: how it splits (export/parallel.py) and whether it is
    the weight of a linear a quantization scheme may take."""

    style: ParallelStyle
    quantizable: bool


@functools.lru_cache(maxsize=64)
def _template(cfg: LlamaConfig, tp_rank: int, tp_size: int) -> dict[str, TensorPlace]:
    """State-dict name -> place, in the module's own order, of a one-layer build at this TP position."""
    import torch

    from export.model import LlamaRank
    with torch.device("meta"):
        module = LlamaRank(dataclasses.replace(cfg, num_hidden_layers=1), RankSpec(tp_rank, tp_size))
    places = {}
    for name, _ in module.named_parameters():
        owner = module.get_submodule(name.rpartition(".")[0])
        style = getattr(owner, "parallel", None)
        if style is None:
            raise InternalError(f"{name}: its module {type(owner).__name__} declares no parallel style")
        places[name] = TensorPlace(style, owner.quantizable and name.endswith(".weight"))
    return places


@dataclasses.dataclass(frozen=True)
class RankLayout:
    cfg: LlamaConfig
    spec: RankSpec

    @functools.cached_property
    def _places(self) -> dict[str, TensorPlace]:
        return _template(self.cfg, self.spec.tp_rank, self.spec.tp_size)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """HF state-dict names the rank's module holds, in the module's order (the file order)."""
        template = list(self._places)
        ends = [n for n in template if not n.startswith(_TEMPLATE_LAYER)]
        leaves = [n[len(_TEMPLATE_LAYER):] for n in template if n.startswith(_TEMPLATE_LAYER)]
        first = [n for n in ends if n == EMBEDDING] if self.spec.is_first_stage else []
        last = [n for n in ends if n != EMBEDDING] if self.spec.is_last_stage else []
        layers = stage_layers(self.cfg.num_hidden_layers, self.spec.pp_size, self.spec.pp_rank)
        return tuple(first + [f"model.layers.{i}.{leaf}" for i in layers for leaf in leaves] + last)

    def place(self, name: str) -> TensorPlace:
        match = _LAYER_KEY.fullmatch(name)
        key = _TEMPLATE_LAYER + match[2] if match and int(match[1]) < self.cfg.num_hidden_layers else name
        try:
            return self._places[key]
        except KeyError:
            raise ShardingError(f"tensor {name!r} is not part of this Llama model") from None

    def tensor_slice(self, name: str, kv_dup_factor: int = 1) -> TensorSlice:
        """The part of checkpoint tensor `name` (HF layout [out, in]) this rank holds."""
        return self.place(name).style.tensor_slice(self.spec, kv_dup_factor)

    @functools.cached_property
    def linears(self) -> tuple[str, ...]:
        """Module paths of this rank's linears a quantization scheme may take, in module order."""
        return tuple(name.rpartition(".")[0] for name in self.names if self.place(name).quantizable)

    def quantized_linears(self, quant) -> frozenset[str]:
        """Module paths of this rank's linears that `quant` (export/quantization.py) quantizes."""
        return frozenset(m for m in self.linears if quant.quantizes(m, self.cfg.num_hidden_layers))


@functools.lru_cache(maxsize=256)
def rank_layout(cfg: LlamaConfig, spec: RankSpec) -> RankLayout:
    return RankLayout(cfg, spec)


def rank_tensor_names(cfg: LlamaConfig, spec: RankSpec) -> list[str]:
    """HF state-dict names a rank's module holds, in a fixed order (the export's file order)."""
    return list(rank_layout(cfg, spec).names)


def tensor_slice(cfg: LlamaConfig, spec: RankSpec, name: str, kv_dup_factor: int = 1) -> TensorSlice:
    return rank_layout(cfg, spec).tensor_slice(name, kv_dup_factor)


def expected_shape(cfg: LlamaConfig, name: str, kv_dup_factor: int = 1) -> tuple[int, ...]:
    """Full (unsharded) shape of a checkpoint tensor as config.json describes it."""
    return rank_layout(cfg, RankSpec(0, 1)).place(name).style.checkpoint_shape(kv_dup_factor)


def parameter_count(cfg: LlamaConfig) -> int:
    """Elements of every distinct checkpoint tensor the model reads (a tied head is the embedding)."""
    names = {checkpoint_name(cfg, n) for n in rank_tensor_names(cfg, RankSpec(0, 1))}
    return sum(math.prod(expected_shape(cfg, n)) for n in names)


def quantizable_linears(cfg: LlamaConfig) -> list[str]:
    """Module paths of every linear of the model a quantization scheme may take, layer by layer."""
    return list(rank_layout(cfg, RankSpec(0, 1)).linears)


def layer_linears(cfg: LlamaConfig) -> tuple[str, ...]:
    """Leaves (self_attn.q_proj, ...) of one decoder layer's quantizable linears, in module order."""
    return tuple(name[len(_TEMPLATE_LAYER):].rpartition(".")[0] for name, place in _template(cfg, 0, 1).items()
                 if name.startswith(_TEMPLATE_LAYER) and place.quantizable)


def shares_tied_head(cfg: LlamaConfig, spec: RankSpec) -> bool:
    """A tied lm_head is the embedding matrix itself on a rank holding both whole (TP1, one stage
    for both ends): its graph reads one initializer for both and stores vocab x hidden once. Under
    TP the embedding is split over vocab rows and lm_head over hidden columns: two slices."""
    return cfg.tie_word_embeddings and spec.tp_size == 1 and spec.is_first_stage and spec.is_last_stage


def stored_tensor_names(cfg: LlamaConfig, spec: RankSpec) -> list[str]:
    """The rank_tensor_names a rank's data file holds (a shared tied head is the embedding's)."""
    names = rank_tensor_names(cfg, spec)
    return [n for n in names if n != LM_HEAD] if shares_tied_head(cfg, spec) else names


def checkpoint_name(cfg: LlamaConfig, name: str) -> str:
    """Where a module tensor lives in the checkpoint (tied lm_head reads the embedding)."""
    if name == LM_HEAD and cfg.tie_word_embeddings:
        return EMBEDDING
    return name
