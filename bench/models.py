"""The synthesized models the suites measure: their geometries, the checkpoint cache, prompts.

Synthesized checkpoints are cached under WORKDIR/checkpoints/, keyed by a digest of their
geometry, dtype and seed, so a second run reuses the ~21 GB 405B-width ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from bench.harness import dir_bytes, log

TP_WIDE = 8  # the 405B-width suites (load, export, engines) measure rank 0 of TP8


# -- checkpoints -----------------------------------------------------------------------------


def geometry_key(label: str, cfg, dtype: str, seed: int) -> str:
    """Directory name of a cached checkpoint: readable label + digest of everything that shapes it."""
    payload = json.dumps({"config": cfg.to_hf_dict(), "dtype": dtype, "seed": seed}, sort_keys=True)
    return f"{label}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def cached_checkpoint(workdir: Path, label: str, cfg, dtype: str, seed: int = 0,
                      created: list[Path] | None = None) -> Path:
    """A synthesized checkpoint under workdir/checkpoints/, written only when not there yet.

    synthesize_checkpoint publishes by renaming a finished temp dir, so a directory that exists
    is complete; a run killed half-way leaves only a dot-named temp dir, which is removed here.
    """
    from export.synth import synthesize_checkpoint
    root = workdir / "checkpoints"
    path = root / geometry_key(label, cfg, dtype, seed)
    if (path / "config.json").is_file():
        log(f"checkpoint {path.name}: cached")
        return path
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    log(f"checkpoint {path.name}: synthesizing ({cfg.num_parameters() / 1e9:.2f} B params, {dtype})")
    started = time.perf_counter()
    synthesize_checkpoint(cfg, path, dtype=dtype, seed=seed, force=True, progress=False, durable=False)
    log(f"checkpoint {path.name}: written in {time.perf_counter() - started:.0f} s")
    if created is not None:
        created.append(path)
    return path


def checkpoint_bytes(path: Path) -> int:
    return dir_bytes(path, ".safetensors")


# -- geometries ------------------------------------------------------------------------------


def wide_config(layers: int, quick: bool):
    """405B width (hidden 16384, ffn 53248, 128 heads, 8 KV heads) with `layers` layers.

    quick: hidden 1024 / ffn 3328 / 8 heads / vocab 32000 — the same TP8 layout at 1/16 width.
    """
    from export.synth import synth_config
    cfg = synth_config("llama-3.1-405b", None, layers, None)
    if quick:
        cfg = cfg.replace(hidden_size=1024, intermediate_size=3328, num_attention_heads=8,
                          num_key_value_heads=8, head_dim=128, vocab_size=32000)
    return cfg


def tiny_preset(layers: int):
    """The `llama-3.1-tiny` preset (hidden 256, 8 heads / 2 KV, Llama 3's vocabulary) with
    `layers` layers: what `llama405 synth --preset llama-3.1-tiny --layers N` writes."""
    from export.synth import synth_config
    return synth_config("llama-3.1-tiny", None, layers, None)


def peers_config(layers: int, quick: bool):
    """~1B parameters at 8 layers: Llama 3.2 1B's width, untied, Llama 3 vocabulary."""
    from export.config import LlamaConfig
    if quick:
        return LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                           bos_token_id=1, eos_token_id=(2,))
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def decode_config(quick: bool):
    """~100M parameters (fp32 ~0.5 GB): hidden 768, 12 layers, 12 heads / 4 KV, vocab 32000."""
    from export.config import LlamaConfig
    if quick:
        return LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                           bos_token_id=1, eos_token_id=(2,))
    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                       bos_token_id=1, eos_token_id=(2,))


def random_prompt(vocab: int, length: int) -> list[int]:
    """Greedy-decode prompt: `length` ids in [3, vocab), the same for every runtime (seed 0)."""
    import numpy as np
    return [int(t) for t in np.random.default_rng(0).integers(3, vocab, size=length)]
