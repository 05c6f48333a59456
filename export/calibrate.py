"""Static FP8 activation scales by streaming calibration, one decoder layer at a time.

The hidden states of the calibration batch go through the model layer by layer, on the CPU or
a CUDA GPU (`device`). No layer is ever held whole: each linear reads its unsharded weight from
the checkpoint in fp32 row blocks of at most `block_bytes` while it computes (StreamedLinear), so
host memory is the activations plus one block — one 405B-width layer in fp32 is 12.7 GB, its
largest block here 128 MiB. Hooks record amax(|input|) of every linear. TP needs nothing extra: a
sharded linear input (o_proj, down_proj) on rank r is a slice of the full input seen here, so
the full-tensor amax is the max over ranks and every rank gets the same scale.
"""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.checkpoint import Checkpoint
from export.errors import CheckpointError, InputError, InternalError
from export.fp8 import FP8_MAX
from export.kv_cache import KV_CACHE_LAYOUTS
from export.model import DecoderLayer, additive_mask, load_rank_weights, rope_at, rope_tables
from export.rank_tensors import rank_module_blocks, rank_module_tensors
from export.quantization import Unquantized
from export.sharding import RankSpec, TensorSlice

FLOAT16_MAX = 65504.0
# fp32 bytes of one weight block a linear reads at a time (a 405B-width down_proj row is 213 KB).
BLOCK_BYTES = 128 << 20


@dataclasses.dataclass
class Calibration:
    amax: dict[str, float]  # linear module path -> max |input|
    max_activation: float  # largest |hidden state| seen (residual stream, fp32)
    samples: int
    seq_len: int
    source: str
    # linear module path -> max |input| per input channel [in_features] (export/smoothing.py)
    channel_amax: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def input_scales(self) -> dict[str, float]:
        return {name: value / FP8_MAX for name, value in self.amax.items()}

    def float16_headroom_warning(self) -> str | None:
        if self.max_activation > 0.5 * FLOAT16_MAX:
            return (f"calibration saw activations up to {self.max_activation:.0f}, within 2x of float16's "
                    f"limit {FLOAT16_MAX:.0f}; a float16 engine may overflow — consider --dtype bfloat16")
        return None


def default_calibration_text() -> str:
    return resources.files("export").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_tokens(token_ids: list[int], samples: int, seq_len: int) -> np.ndarray:
    """[samples, seq_len] windows over the token stream (wrapping when the text is short)."""
    if samples < 1 or seq_len < 2:
        raise InputError(f"--calib-samples {samples} / --calib-seq-len {seq_len}: need >= 1 sample of >= 2 tokens")
    if len(token_ids) < 2:
        raise InputError("the calibration text is empty; pass a --calib-text file with real text")
    stream = np.array(token_ids, dtype=np.int64)
    need = samples * seq_len
    stream = np.tile(stream, math.ceil(need / len(stream)))[:need]
    return stream.reshape(samples, seq_len)


def _embed(checkpoint: Checkpoint, tokens: np.ndarray) -> torch.Tensor:
    """Embedding rows for just the calibration tokens (not the vocab x hidden matrix)."""
    unique, inverse = np.unique(tokens, return_inverse=True)
    vocab = checkpoint.config.vocab_size
    if unique.max() >= vocab:
        raise InputError(f"calibration token id {int(unique.max())} is outside the checkpoint's vocabulary "
                         f"({vocab}); the tokenizer does not match this checkpoint")
    blocks = tuple((int(i), int(i) + 1) for i in unique)
    rows = checkpoint.read("model.embed_tokens.weight", TensorSlice(0, blocks)).float()  # [unique, hidden]
    return rows[torch.from_numpy(inverse.reshape(tokens.shape))]  # [samples, seq, hidden]


class StreamedLinear(nn.Module):
    """A bias-free linear whose weight is read from the checkpoint on every call, in fp32 row
    blocks of at most block_bytes, and never held whole.

    Row block [r0, r1) of W [out, in] gives output columns [r0, r1) of x @ W^T: each column is
    one dot product over `in`, computed by the same kernel as in one F.linear (measured bit-equal
    on the CPU up to 405B-width shapes, tests/export/test_fp8.py). A pre-quantized FP8 weight is
    dequantized block by block (export/rank_tensors.py). Re-read once per calibration batch.
    """

    def __init__(self, checkpoint: Checkpoint, spec: RankSpec, weight_name: str, out_features: int,
                 block_bytes: int):
        super().__init__()
        self.checkpoint, self.spec, self.weight_name = checkpoint, spec, weight_name
        self.out_features, self.block_bytes = out_features, block_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], self.out_features)  # [..., out]
        start = 0
        for _, blocks in rank_module_blocks(self.checkpoint, self.spec, torch.float32, Unquantized(), None,
                                            only=self.weight_name, max_bytes=self.block_bytes):
            for block in blocks:  # [rows, in] fp32, on the host
                rows = block.shape[0]
                out[..., start:start + rows] = F.linear(x, block.to(x.device))
                start += rows
        if start != self.out_features:
            raise InternalError(f"{self.weight_name}: read {start} rows, the layer has {self.out_features}")
        return out


def _streamed_layer(checkpoint: Checkpoint, spec: RankSpec, layer_id: int, device: torch.device,
                    block_bytes: int) -> DecoderLayer:
    """Decoder layer `layer_id` with its norms loaded and every linear a StreamedLinear."""
    with torch.device("meta"):
        layer = DecoderLayer(checkpoint.config, spec, lambda x: x, layer_id, KV_CACHE_LAYOUTS["concat"])  # empty past
    prefix = f"model.layers.{layer_id}."
    for name, module in list(layer.named_modules()):
        if isinstance(module, nn.Linear):
            owner, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(owner), leaf, StreamedLinear(
                checkpoint, spec, f"{prefix}{name}.weight", module.out_features, block_bytes))
    # What is left are the norms (a few KB): read by name, nothing else of the layer.
    norms = (item for name in layer.state_dict()
             for item in rank_module_tensors(checkpoint, spec, torch.float32, only=prefix + name))
    load_rank_weights(layer, ((name[len(prefix):], t) for name, t in norms), torch.float32)
    return layer.to(device)


def calibrate(checkpoint: Checkpoint, tokens: np.ndarray, source: str = "", batch: int = 4,
              progress: bool = False, on_layer: Callable[[int], None] = lambda i: None,
              device: str | torch.device = "cpu", block_bytes: int = BLOCK_BYTES) -> Calibration:
    """device: where the hidden states and matmuls live ("cpu", "cuda:N"; the caller checked it
    exists: runner/device.py parses --calib-device). On CUDA, float32 matmuls run without TF32
    (the switch is restored after), so the scales match the CPU's within fp32 rounding."""
    device = torch.device(device)
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return _calibrate(checkpoint, tokens, source, batch, progress, on_layer, device, block_bytes)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return _calibrate(checkpoint, tokens, source, batch, progress, on_layer, device, block_bytes)


def _calibrate(checkpoint: Checkpoint, tokens: np.ndarray, source: str, batch: int, progress: bool,
               on_layer: Callable[[int], None], device: torch.device, block_bytes: int) -> Calibration:
    cfg = checkpoint.config
    spec = RankSpec(0, 1)
    samples, seq = tokens.shape
    h = _embed(checkpoint, tokens).to(device)  # [samples, seq, hidden] fp32
    positions = torch.arange(seq, device=device)[None].expand(samples, seq)
    tables = tuple(t.to(device) for t in rope_tables(cfg, torch.float32))  # [max_positions, head_dim / 2] each
    amax: dict[str, float] = {}
    channel_amax: dict[str, torch.Tensor] = {}
    max_activation = float(h.abs().max())
    for layer_id in tqdm(range(cfg.num_hidden_layers), desc="calibrate", disable=not progress):
        layer = _streamed_layer(checkpoint, spec, layer_id, device, block_bytes)
        prefix = f"model.layers.{layer_id}."
        hooks = [module.register_forward_pre_hook(_amax_hook(prefix + name, amax, channel_amax))
                 for name, module in layer.named_modules() if isinstance(module, StreamedLinear)]
        outputs = []
        with torch.inference_mode():
            for start in range(0, samples, batch):
                hb, pb = h[start:start + batch], positions[start:start + batch]
                ones = torch.ones(pb.shape, dtype=torch.int64, device=device)
                mask = additive_mask(ones, seq)
                empty = torch.zeros(hb.shape[0], layer.self_attn.n_kv, 0, cfg.head_dim, device=device)
                out, _, _ = layer(hb, rope_at(*tables, pb), mask, empty, empty, None)
                outputs.append(out)
        for hook in hooks:
            hook.remove()
        h = torch.cat(outputs)
        max_activation = max(max_activation, float(h.abs().max()))
        del layer, outputs
        on_layer(layer_id)
    for name, value in amax.items():
        if not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{checkpoint.directory}: calibration amax of {name} is {value}; a zero or "
                                  "non-finite activation range cannot give an FP8 scale — check the weights "
                                  "(NaN/inf?) or the calibration text")
    return Calibration(amax, max_activation, samples, seq, source, channel_amax)


def _amax_hook(name: str, amax: dict[str, float], channel_amax: dict[str, torch.Tensor]):
    def hook(module, inputs):
        x = inputs[0].detach().abs()
        value = float(x.max())
        amax[name] = max(amax.get(name, 0.0), value) if math.isfinite(value) else value
        per_channel = x.reshape(-1, x.shape[-1]).amax(dim=0)  # [in_features]
        channel_amax[name] = torch.maximum(channel_amax[name], per_channel) if name in channel_amax else per_channel
    return hook


def read_calibration_text(path: str | Path | None) -> tuple[str, str]:
    """(text, where it came from) for --calib-text FILE, or the shipped default when None."""
    if path is None:
        return default_calibration_text(), "llama405 default calibration text"
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--calib-text {path}: no such file; pass a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as err:
        raise InputError(f"--calib-text {path}: not UTF-8 text ({err})") from None


def checkpoint_calibration_tokens(checkpoint_dir: str | Path, text_path: str | Path | None, samples: int,
                                  seq_len: int) -> tuple[np.ndarray, str]:
    """([samples, seq_len] token windows, source) of the calibration text (None: the shipped
    default), tokenized with the checkpoint's own tokenizer (export/tokenizer.py; the bundled
    Llama 3 one for a checkpoint that has none). The ids, not the tokenizer's size, must fit the
    vocabulary: a cut-vocabulary test model calibrates on text whose ids stay inside it; an id
    past it refuses the tokenizer by file name."""
    from export.config import LlamaConfig
    from export.tokenizer import check_vocab, checkpoint_tokenizer
    text, source = read_calibration_text(text_path)
    files = checkpoint_tokenizer(checkpoint_dir)
    tokenizer = files.load()
    ids = tokenizer.encode(text, bos=False)
    vocab = LlamaConfig.from_hf(checkpoint_dir).vocab_size
    if ids and max(ids) >= vocab:
        check_vocab(files, tokenizer.vocab_size, vocab, str(Path(checkpoint_dir) / "config.json"))
    return calibration_tokens(ids, samples, seq_len), source
