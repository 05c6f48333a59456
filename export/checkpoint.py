"""Hugging Face safetensors checkpoints, read one rank's slices at a time.

Nothing here loads a whole tensor file: `SafetensorsFile.read` copies out only the rows/columns a
rank holds (column slices page by page), so exporting one rank of 405B needs memory for a few
slices, not for the 800 GB model, and `iter_blocks` bounds even that to row blocks of a slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterator

import torch

from export.checkpoint_quant import CheckpointQuantization, read_checkpoint_quantization
from export.config import LlamaConfig
from export.errors import CheckpointError, ConfigError
from export.safetensors_file import DuplicateKey, SafetensorsFile, TensorInfo, unique_keys
from export.rank_layout import checkpoint_name, expected_shape, rank_tensor_names, tensor_slice
from export.sharding import RankSpec, TensorSlice

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _repeat_factor(heads: list[torch.Tensor], factors: list[int]) -> int:
    """The largest factor f such that, in every [n_kv, rows, hidden] tensor, each run of f
    consecutive heads holds f equal copies (1 when none does)."""
    n_kv, best = heads[0].shape[0], 1
    for factor in factors:
        grouped = [h.reshape(n_kv // factor, factor, *h.shape[1:]) for h in heads]
        if all(torch.equal(g[:, i], g[:, 0]) for g in grouped for i in range(1, factor)):
            best = factor
    return best


class Checkpoint:
    """A checkpoint directory: config, tensor -> file map, open file handles, KV-head layout."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory; pass the folder "
                                  "holding config.json and *.safetensors")
        file_config = LlamaConfig.from_hf(self.directory / "config.json")
        self._files: dict[Path, SafetensorsFile] = {}
        self.weight_map = self._read_weight_map()
        self.kv_dup_factor = self._detect_duplicated_kv_heads(file_config)
        try:
            self.config = file_config.replace(
                num_key_value_heads=file_config.num_key_value_heads // self.kv_dup_factor)
        except ConfigError as err:
            raise ConfigError(f"{self.directory / 'config.json'}: {err}") from None
        self._check_tensor_names()
        self.quantization: CheckpointQuantization = read_checkpoint_quantization(self.directory / "config.json")

    def _check_tensor_names(self) -> None:
        """Every tensor in the checkpoint is one the model reads, or is refused by name: a layer
        beyond num_hidden_layers, a bias, a tied head stored anyway would otherwise be dropped."""
        cfg = self.config
        used = {checkpoint_name(cfg, n) for n in rank_tensor_names(cfg, RankSpec(0, 1))}
        linears = {n[:-len(".weight")] for n in used if ".self_attn." in n or ".mlp." in n}
        fp8_scales = {f"{m}.{leaf}" for m in linears for leaf in ("weight_scale", "input_scale")}
        self._check_fp8_scales(linears)
        unused = sorted(set(self.weight_map) - used - fp8_scales)
        if not unused:
            return
        config = self.directory / "config.json"
        first = unused[0]
        if first == "lm_head.weight" and cfg.tie_word_embeddings:
            why = "config.json says tie_word_embeddings: true (lm_head = the embedding) but the checkpoint stores one"
        elif first.startswith("model.layers.") and first.split(".")[2].isdigit() and \
                int(first.split(".")[2]) >= cfg.num_hidden_layers:
            why = f"it belongs to a layer beyond num_hidden_layers={cfg.num_hidden_layers}"
        else:
            why = "llama405's Llama 3.1 model has no such tensor (a bias, another architecture?)"
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(f"{self.directory}: tensor {first!r}{more} would be ignored: {why}; fix {config} "
                              "or use a checkpoint of this model")

    def _check_fp8_scales(self, linears: set[str]) -> None:
        """A weight stored as FP8 is only meaningful with its weight_scale; casting it without one
        would use an implicit scale of 1 (transformers refuses to load such a checkpoint)."""
        for module in sorted(linears):
            name = f"{module}.weight"
            if name in self.weight_map and self.info(name).dtype.itemsize == 1 and \
                    f"{module}.weight_scale" not in self.weight_map:
                has_config = "quantization_config" in json.loads((self.directory / "config.json").read_text())
                why = "" if has_config else " and config.json has no quantization_config"
                raise CheckpointError(f"{self.directory}: {name!r} is stored as {self.info(name).dtype} but "
                                      f"{module}.weight_scale is missing{why}; llama405 will not guess a scale of 1 "
                                      "— use the checkpoint with its scales")

    # -- file layout -------------------------------------------------------------------------

    def _read_weight_map(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        for path in (index, single):
            if path.is_dir():
                raise CheckpointError(f"{path}: is a folder, not a file; a checkpoint's {path.name} must be a file")
        if index.is_file():
            try:
                raw = json.loads(index.read_text(), object_pairs_hook=unique_keys)["weight_map"]
            except DuplicateKey as dup:
                raise CheckpointError(f"{index}: tensor {dup.key!r} is listed twice in weight_map; "
                                      "re-download the index") from None
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err!r}); re-download it") from None
            if not isinstance(raw, dict) or not all(isinstance(f, str) and f for f in raw.values()):
                bad = next(iter(raw.items())) if not isinstance(raw, dict) else \
                    next((k, v) for k, v in raw.items() if not (isinstance(v, str) and v))
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names "
                                      f"(found {bad!r}); re-download it")
            files = {name: self.directory / fname for name, fname in raw.items()}
            for path in sorted(set(files.values())):
                if path.is_dir():
                    raise CheckpointError(f"{path}: shard named in {index.name} is a folder, not a file; "
                                          "download it again or fix the index")
                if not path.is_file():
                    raise CheckpointError(f"{path}: shard named in {index.name} is missing; "
                                          "download it again or fix the index")
            self._check_shards_agree(index, files)
            return files
        if single.is_file():
            return {name: single for name in self._file(single).tensors}
        raise CheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found; "
                              "point --checkpoint at a Hugging Face safetensors checkpoint")

    def _check_shards_agree(self, index: Path, files: dict[str, Path]) -> None:
        """Every tensor a shard holds is listed in the index for that shard, once: a second copy in
        another shard, or one the index does not list, would be silently dropped (the headers are
        read anyway; no tensor data)."""
        holder: dict[str, Path] = {}
        for path in sorted(set(files.values())):
            for name in self._file(path).tensors:
                if name in holder:
                    raise CheckpointError(f"{self.directory}: tensor {name!r} is stored in both {holder[name].name} "
                                          f"and {path.name}; keep one copy (Hugging Face refuses such a checkpoint)")
                holder[name] = path
        for name, path in sorted(holder.items()):
            if files.get(name) != path:
                listed = f"lists it in {files[name].name}" if name in files else "does not list it"
                raise CheckpointError(f"{path}: holds tensor {name!r} but {index.name} {listed}; "
                                      "re-download the index or the shard")

    def _file(self, path: Path) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def _file_of(self, name: str) -> Path:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is not in the checkpoint; "
                                  "is this a Llama checkpoint with the config.json beside it?") from None

    def info(self, name: str) -> TensorInfo:
        return self._file(self._file_of(name)).info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    # -- duplicated KV heads -----------------------------------------------------------------

    def _detect_duplicated_kv_heads(self, cfg: LlamaConfig) -> int:
        """Factor by which each KV head is repeated back to back (1 for ordinary checkpoints).

        Some 405B uploads carry num_key_value_heads 16 with every head stored twice, so 16-way
        tensor parallelism could split them. Serving them as 16 distinct heads doubles the KV
        cache for nothing. Layer 0's heads are compared whole; every other layer must show the
        same factor on each head's first row (n_kv rows per projection, not the whole tensors),
        so a checkpoint that duplicates some layers and not others is refused, not half-undone.
        """
        n_kv, d = cfg.num_key_value_heads, cfg.head_dim
        if n_kv == 1:
            return 1
        names = {layer: [f"model.layers.{layer}.self_attn.{proj}.weight" for proj in ("k_proj", "v_proj")]
                 for layer in range(cfg.num_hidden_layers)}
        if any(n not in self.weight_map or self.shape(n)[0] != n_kv * d for n in names[0]):
            return 1  # the load's name and shape checks report this properly
        factors = [f for f in range(2, n_kv + 1) if not n_kv % f and not cfg.num_attention_heads % (n_kv // f)]
        whole = [self._stored_bytes(self._read_part(n, None, None)).reshape(n_kv, d, -1) for n in names[0]]
        best = _repeat_factor(whole, factors)
        for layer in range(1, cfg.num_hidden_layers):
            if any(n not in self.weight_map or self.shape(n)[0] != n_kv * d for n in names[layer]):
                continue
            firsts = [torch.stack([self._stored_bytes(self._read_part(n, (h * d, h * d + 1), None))[0]
                                   for h in range(n_kv)])[:, None] for n in names[layer]]
            factor = _repeat_factor(firsts, factors)
            if factor != best:
                raise CheckpointError(
                    f"{self.directory}: layer 0 stores each of its KV heads {best} time(s) but layer {layer} "
                    f"{factor} time(s) (k_proj/v_proj); a checkpoint must repeat its heads the same way in "
                    "every layer — re-download or re-convert it")
        return best

    @staticmethod
    def _stored_bytes(raw: torch.Tensor) -> torch.Tensor:
        return raw.view(torch.uint8) if raw.element_size() == 1 else raw  # FP8: compare the stored bytes

    # -- reading one rank --------------------------------------------------------------------

    def read(self, name: str, part: TensorSlice) -> torch.Tensor:
        """One tensor (or the part `part` names) copied out of the file."""
        blocks = list(self.iter_blocks(name, part, None))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def iter_blocks(self, name: str, part: TensorSlice, max_bytes: int | None) -> Iterator[torch.Tensor]:
        """The part of a tensor in consecutive row blocks of at most ~max_bytes each (None: one
        block per run of rows); concatenated along dim 0 they are `read(name, part)`."""
        if part.axis not in (None, 0, 1):
            raise CheckpointError(f"{name}: slicing along axis {part.axis} is not supported")
        info = self.info(name)
        if not info.shape:
            yield self._read_part(name, None, None)
            return
        columns = tuple(part.blocks) if part.axis == 1 else None
        runs = part.blocks if part.axis == 0 else ((0, info.shape[0]),)
        row_bytes = info.row_bytes if columns is None else \
            sum(c1 - c0 for c0, c1 in columns) * info.dtype.itemsize
        for lo, hi in runs:
            step = hi - lo if max_bytes is None else max(1, max_bytes // max(1, row_bytes))
            for start in range(lo, hi, step):
                yield self._read_part(name, (start, min(start + step, hi)), columns)

    def _read_part(self, name: str, rows: tuple[int, int] | None,
                   columns: tuple[tuple[int, int], ...] | None) -> torch.Tensor:
        return self._file(self._file_of(name)).read(name, rows, columns)

    def check_shape(self, name: str) -> None:
        file_name = checkpoint_name(self.config, name)
        want = expected_shape(self.config, file_name, self.kv_dup_factor)
        got = self.shape(file_name)
        if got != want:
            raise CheckpointError(
                f"{self._file_of(file_name)}: tensor {file_name!r} has shape {list(got)} but "
                f"config.json implies {list(want)}; the config does not belong to these weights")

    def iter_rank_tensors(self, spec: RankSpec) -> Iterator[tuple[str, torch.Tensor]]:
        """(module state-dict name, local slice) for every tensor of one rank, one at a time."""
        for name in rank_tensor_names(self.config, spec):
            yield name, self.read_rank_tensor(name, spec)

    def read_rank_tensor(self, name: str, spec: RankSpec) -> torch.Tensor:
        self.check_shape(name)
        file_name = checkpoint_name(self.config, name)
        part = tensor_slice(self.config, spec, name, self.kv_dup_factor)
        return self.read(file_name, part)

    def iter_rank_blocks(self, name: str, spec: RankSpec, max_bytes: int | None) -> Iterator[torch.Tensor]:
        """read_rank_tensor in row blocks (see iter_blocks)."""
        self.check_shape(name)
        part = tensor_slice(self.config, spec, name, self.kv_dup_factor)
        return self.iter_blocks(checkpoint_name(self.config, name), part, max_bytes)

    def validate(self, spec: RankSpec) -> None:
        """Every tensor a rank needs is present with the right shape (headers only, no data)."""
        for name in rank_tensor_names(self.config, spec):
            self.check_shape(name)

    def tensor_dtype(self) -> torch.dtype:
        """The storage dtype of the checkpoint (taken from its first norm weight)."""
        name = "model.norm.weight" if "model.norm.weight" in self.weight_map else next(iter(self.weight_map))
        return self.info(name).dtype
