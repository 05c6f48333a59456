"""How a rank's linears are quantized: one strategy object per export, resolved once from
`--quant` (the manifest's `quant` names it) and asked by the model, the rank-tensor reader, the
exporter, the planner, the engine builder and parity instead of branching on the name (the
pattern of export/kv_cache.py; TensorRT-LLM keeps one `LinearMethod` per scheme the same way).

A strategy owns: which linears it quantizes (`quantizes`), the module such a linear becomes
(`linear`), the tensors a rank file holds for it (`rank_tensors`), bytes per weight and extra
activations for the planner, whether it needs static activation scales (calibration), TensorRT's
targets and preflight rule (`fp8_tensor_cores`), the parity tolerance key, and the key of its
manifest record (`record_key`: `extra.fp8`).

Adding a scheme is one subclass registered in QUANTIZATIONS (tests/export/test_quantization.py
plugs in a weight-only fake that way and exports a rank with it).

No torch at import time (the manifest, the planner and the CLI import this); the FP8 module and
tensors are imported when a strategy is asked for them.
"""

from __future__ import annotations

import abc
import dataclasses
import fnmatch
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from export.errors import ConfigError, InternalError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from export.checkpoint import Checkpoint
    from export.options import ExportOptions
    from export.sharding import RankSpec

# The FP8 recipes: which quantizable linears stay in the compute dtype. "meta" (the default) is Meta's
# choice for its FP8 Llama 3.1 405B (Llama 3 paper, 6.2): attention and the first and last layer
# stay 16-bit; "all" quantizes every linear. docs/fp8-real-activations.md measures why the default is
# meta: on a trained model (SmolLM2) every-linear E4M3 costs +2.7 % perplexity (mean KL 0.027)
# and no activation scaling can lower that (E4M3's 3-bit mantissa is the error), while meta's
# recipe keeps it near +1 % (KL 0.011; +0.34 % through the artifact).
RECIPES = ("meta", "all")
DEFAULT_RECIPE = "meta"
# Recipe names an earlier llama405 wrote into manifests, read back with the same meaning.
RENAMED_RECIPES = {"default": "all"}

TensorBlocks = Iterator[tuple[str, Iterator["torch.Tensor"]]]


def matches(module_name: str, pattern: str) -> bool:
    """fnmatch, or `re:` + a regular expression matched from the start (compressed-tensors' form)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module_name) is not None
    return fnmatch.fnmatchcase(module_name, pattern)


@dataclasses.dataclass(frozen=True)
class Quantization(abc.ABC):
    """Which linears a scheme quantizes, and everything that follows from it.

    Names are module paths like model.layers.3.mlp.down_proj of the linears the model marks
    quantizable (export/rank_layout.py reads them off the modules: a decoder layer's projections;
    the embedding and lm_head stay in the compute dtype). `exclude` holds fnmatch or `re:`
    patterns (`--fp8-exclude` plus the checkpoint's own list); the "meta" recipe (the default) adds
    Meta's choice for its FP8 405B: attention and the first and last layer stay in the compute
    dtype; "all" adds nothing.
    """

    recipe: str = DEFAULT_RECIPE
    exclude: tuple[str, ...] = ()

    name: ClassVar[str]
    quantized: ClassVar[bool] = True  # some linear may leave the compute dtype (recipe/exclude matter)
    needs_activation_scales: ClassVar[bool] = False  # static input scales: the checkpoint's, else calibration
    fp8_tensor_cores: ClassVar[bool] = False  # TensorRT: FP8-capable targets only, Hopper+ to run
    record_key: ClassVar[str | None] = None  # the manifest's extra section this scheme writes

    @classmethod
    def from_options(cls, options: ExportOptions) -> Quantization:
        return cls(options.fp8_recipe, tuple(options.fp8_exclude))

    def patterns(self, num_layers: int) -> tuple[str, ...]:
        extra = ()
        if self.recipe == "meta":
            extra = ("*.self_attn.*", "model.layers.0.*", f"model.layers.{num_layers - 1}.*")
        return tuple(self.exclude) + extra

    def quantizes(self, module_name: str, num_layers: int) -> bool:
        """Whether this scheme takes the quantizable linear `module_name` (the model asks only for
        linears it marks quantizable; export/rank_layout.py's quantized_linears for a rank)."""
        return self.quantized and not any(matches(module_name, p) for p in self.patterns(num_layers))

    def layer_pattern(self, leaves: tuple[str, ...], layer: int, num_layers: int) -> tuple[bool, ...]:
        """Which of a layer's quantizable linears (`leaves`: rank_layout.layer_linears) this scheme quantizes."""
        return tuple(self.quantizes(f"model.layers.{layer}.{leaf}", num_layers) for leaf in leaves)

    def for_template(self, leaves: tuple[str, ...], pattern: tuple[bool, ...], template_layer: int) -> Quantization:
        """The same scheme, quantizing exactly `pattern` in a one-layer template at `template_layer`."""
        if not any(pattern):
            return Unquantized()
        keep = tuple(f"model.layers.{template_layer}.{leaf}" for leaf, q in zip(leaves, pattern) if not q)
        return dataclasses.replace(self, recipe="all", exclude=keep)

    @abc.abstractmethod
    def linear(self, in_features: int, out_features: int) -> nn.Module:
        """The module a quantized linear becomes (its state dict = what rank_tensors yields)."""

    @abc.abstractmethod
    def rank_tensors(self, checkpoint: Checkpoint, spec: RankSpec, weight_name: str, dtype: torch.dtype,
                     input_scales: dict[str, float] | None) -> TensorBlocks:
        """(state-dict name, blocks) of one quantized linear's rank slice, in `linear`'s layout."""

    @abc.abstractmethod
    def weight_bytes(self, elements: int, out_rows: int, compute_bytes: int) -> int:
        """Planner: bytes of one quantized linear ([out_rows, elements / out_rows]) with its scales."""

    def activation_bytes(self, tokens: int, hidden: int, q_width: int, ffn: int) -> int:
        """Planner: extra live activation bytes of one step of `tokens` (quantized copies of inputs)."""
        return 0

    def tolerance_key(self, dtype: str, reference: bool) -> str:
        """runner/compare.py DEFAULT_TOLERANCES key: the scheme against its unquantized reference
        (quantization error itself), or two backends on the same quantized artifact."""
        return self.name if reference else f"{self.name}-{dtype}"

    def weights_label(self, dtype: str) -> str:
        keeps = f", --fp8-recipe {self.recipe}" + (" + --fp8-exclude" if self.exclude else "")
        return f"{self.name} weights{keeps} ({dtype} compute)"


@dataclasses.dataclass(frozen=True)
class Unquantized(Quantization):
    name: ClassVar[str] = "none"
    quantized: ClassVar[bool] = False

    @classmethod
    def from_options(cls, options):
        return cls()  # FP8 choices of an export without quantization shape nothing

    def linear(self, in_features, out_features):
        raise InternalError("an unquantized export has no quantized linear")

    def rank_tensors(self, checkpoint, spec, weight_name, dtype, input_scales):
        raise InternalError("an unquantized export has no quantized linear")

    def weight_bytes(self, elements, out_rows, compute_bytes):
        raise InternalError("an unquantized export has no quantized linear")

    def tolerance_key(self, dtype, reference):
        return dtype

    def weights_label(self, dtype):
        return f"{dtype} weights"


@dataclasses.dataclass(frozen=True)
class Fp8(Quantization):
    """FP8 E4M3 weights per output channel, static per-tensor activation scales (export/fp8.py)."""

    name: ClassVar[str] = "fp8"
    needs_activation_scales: ClassVar[bool] = True
    fp8_tensor_cores: ClassVar[bool] = True
    record_key: ClassVar[str | None] = "fp8"

    def linear(self, in_features, out_features):
        from export.fp8 import Fp8Linear
        return Fp8Linear(in_features, out_features)

    def rank_tensors(self, checkpoint, spec, weight_name, dtype, input_scales):
        from export.rank_tensors import fp8_linear_tensors
        return fp8_linear_tensors(checkpoint, spec, weight_name, dtype, input_scales)

    def weight_bytes(self, elements, out_rows, compute_bytes):
        # FP8 weight + one scale per output channel + the input's per-tensor scale.
        return elements + out_rows * compute_bytes + compute_bytes

    def activation_bytes(self, tokens, hidden, q_width, ffn):
        # The FP8 copies of the quantized linears' inputs (1 byte each): 2 x hidden (q/k/v and
        # gate/up share one), attention output, the MLP's intermediate.
        return tokens * (2 * hidden + q_width + ffn)


QUANTIZATIONS: dict[str, type[Quantization]] = {cls.name: cls for cls in (Unquantized, Fp8)}


def _scheme(name: str) -> type[Quantization]:
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ConfigError(f"--quant {name!r}: choose {' or '.join(QUANTIZATIONS)}") from None


def quantization_named(name: str, recipe: str = DEFAULT_RECIPE, exclude: tuple[str, ...] = ()) -> Quantization:
    """The planner's what-if (a name and FP8 choices without an ExportOptions)."""
    return _scheme(name)(recipe, tuple(exclude)) if _scheme(name).quantized else _scheme(name)()


def quantization_of(options: ExportOptions) -> Quantization:
    return _scheme(options.quant).from_options(options)
