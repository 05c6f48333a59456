"""ONNX Runtime on exported artifacts vs the Hugging Face transformers oracle.

Every layout runs a batch of two prompts of different lengths through prefill and 8 decode
steps, driven exactly like runner/generate.py (right-padded prompts, the padding slots masked,
attention_mask one column longer per step), but teacher-forced:
the decode tokens are fixed in advance, so the oracle is one unpadded full-sequence forward of
`LlamaForCausalLM` per prompt (prompt + forced tokens) and every real position of every
sequence is compared: all prompt positions at prefill, then one position per decode step.

The checkpoint is conftest's 3-layer `hf_checkpoint`, so PP2 splits it into unequal stages
(layers 0-1 and 2). TP4 exceeds its 2 KV heads: each KV head is replicated on two ranks.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from runner.backends.base import make_feed
from runner.backends.ort import OrtBackend
from tests.export.test_export_artifact import MAX_SEQ_LEN, shared_artifact

PROMPTS = [[1, 17, 42, 99, 5, 200, 31], [1, 8, 250]]
DECODE_STEPS = 8
# Tokens fed at decode steps 0..7 (teacher forcing): the same for the artifact and the oracle.
FORCED = np.random.default_rng(1234).integers(3, 256, size=(len(PROMPTS), DECODE_STEPS))
PAD_ID = 0

FP32_MAX_ABS = 1e-4  # the quality bar vs transformers

pytestmark = pytest.mark.slow  # 15 exported ranks (~6 s each on an idle 2-core machine)

LAYOUTS = [
    pytest.param(dict(tp=1, pp=1, kv_cache="static", dtype="float32"), id="tp1-static-fp32"),
    pytest.param(dict(tp=2, pp=1, kv_cache="concat", dtype="float32"), id="tp2-concat-fp32"),
    pytest.param(dict(tp=4, pp=1, kv_cache="static", dtype="float32"), id="tp4-static-fp32-replicated-kv"),
    pytest.param(dict(tp=1, pp=2, kv_cache="concat", dtype="float32"), id="pp2-concat-fp32"),
    pytest.param(dict(tp=2, pp=2, kv_cache="static", dtype="float32"), id="tp2xpp2-static-fp32"),
    pytest.param(dict(tp=2, pp=1, kv_cache="static", dtype="float16"), id="tp2-static-fp16"),
]


@pytest.fixture(scope="module")
def oracle(hf_checkpoint) -> list[np.ndarray]:
    """Per prompt: HF logits [len(prompt) + DECODE_STEPS, vocab] of prompt + forced tokens."""
    _, model = hf_checkpoint
    out = []
    with torch.no_grad():
        for prompt, forced in zip(PROMPTS, FORCED):
            ids = torch.tensor([prompt + forced.tolist()])
            out.append(model(ids).logits[0].float().numpy())
    return out


def teacher_forced(backend) -> tuple[np.ndarray, list[np.ndarray]]:
    """(prefill logits [batch, width, vocab], per decode step logits [batch, vocab])."""
    batch, lengths = len(PROMPTS), np.array([len(p) for p in PROMPTS])
    width = int(lengths.max())
    ids = np.full((batch, width), PAD_ID, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for b, prompt in enumerate(PROMPTS):
        ids[b, :len(prompt)], mask[b, :len(prompt)] = prompt, 1
    positions = np.tile(np.arange(width), (batch, 1))
    backend.start(batch)
    prefill = backend.infer(make_feed(ids, positions, mask))["logits"]
    steps = []
    for step in range(DECODE_STEPS):
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feed = make_feed(FORCED[:, step:step + 1], (lengths + step)[:, None], mask)
        logits = backend.infer(feed)["logits"]
        assert logits.shape == (batch, 1, backend.config.vocab_size)
        steps.append(logits[:, -1])
    return prefill, steps


def errors_vs_oracle(prefill, steps, oracle) -> dict[str, float]:
    """Max-abs error per step kind over the real positions of every sequence."""
    prefill_err, decode_err = 0.0, 0.0
    for b, prompt in enumerate(PROMPTS):
        n = len(prompt)
        prefill_err = max(prefill_err, float(np.abs(prefill[b, :n] - oracle[b][:n]).max()))
        for step, logits in enumerate(steps):
            decode_err = max(decode_err, float(np.abs(logits[b] - oracle[b][n + step]).max()))
    return {"prefill": prefill_err, "decode": decode_err}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ort_logits_match_transformers(hf_checkpoint, oracle, tmp_path_factory, layout):
    checkpoint, _ = hf_checkpoint
    artifact = shared_artifact(tmp_path_factory, checkpoint, max_seq_len=MAX_SEQ_LEN, **layout)
    backend = OrtBackend(artifact)
    assert (backend.tp, backend.pp, backend.cache_layout.name) == (layout["tp"], layout["pp"], layout["kv_cache"])
    prefill, steps = teacher_forced(backend)
    assert prefill.shape == (len(PROMPTS), max(map(len, PROMPTS)), backend.config.vocab_size)
    err = errors_vs_oracle(prefill, steps, oracle)
    scale = max(float(np.abs(o).max()) for o in oracle)  # largest |logit| of the oracle (~4-5 here)
    print(f"{layout}: max-abs error prefill {err['prefill']:.3g}, decode {err['decode']:.3g}; "
          f"logit scale {scale:.3g}")
    if layout["dtype"] == "float32":
        assert err["prefill"] <= FP32_MAX_ABS and err["decode"] <= FP32_MAX_ABS, err
    else:
        # float16 noise: weights and activations are rounded to fp16 (unit roundoff 2^-11 ~ 4.9e-4
        # relative) at every matmul input/output through 3 layers, embedding and lm_head, so the
        # logits carry an error of a few roundoffs of their own scale (measured 1.6e-3 of the
        # largest |logit|, 6.5e-3 absolute on a scale of ~4). Allow 1e-2 of the largest |logit|:
        # ~20 roundoffs, 6x the measurement and still far below what a real bug does (a dropped
        # norm, a wrong RoPE band or a misplaced cache slot moves logits by O(scale)).
        tolerance = 1e-2 * scale
        assert err["prefill"] <= tolerance and err["decode"] <= tolerance, (err, tolerance)
        # And the fp16 errors are not uniformly near the bound: the mean error stays small.
        mean = np.mean([np.abs(steps[s][b] - oracle[b][len(PROMPTS[b]) + s]).mean()
                        for b in range(len(PROMPTS)) for s in range(DECODE_STEPS)])
        assert mean <= 2e-3 * scale, mean


_POOL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from runner.backends.graph_split import make_session, split_at_collectives
    from runner.backends.ort import OrtBackend
    artifact = Path(sys.argv[1])
    OrtBackend(artifact)  # installs onnxruntime's process-wide thread pool
    rank_dir = artifact / "rank0"
    make_session(split_at_collectives(rank_dir / "model.onnx")[0], rank_dir)  # default options
""")


def test_default_sessions_still_work_after_an_ort_backend(hf_checkpoint, tmp_path_factory):
    # In a fresh interpreter: the global pool cannot be removed again once installed.
    checkpoint, _ = hf_checkpoint
    artifact = shared_artifact(tmp_path_factory, checkpoint, tp=1, kv_cache="static", dtype="float32")
    done = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(artifact)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
