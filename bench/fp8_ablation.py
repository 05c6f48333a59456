"""Where SmolLM2's FP8 error comes from: an ablation over transformers' fp32 model, for
docs/fp8-real-activations.md. `python -m bench.fp8_ablation CKPT [--out F.json]` (minutes on 2 cores).

Each FP8 linear is simulated with llama405's own quantizers (export/fp8.py: per-output-channel
weight scales, x / s clamped to ±448 and rounded by the float8_e4m3fn cast, per-tensor static
input scales from calibration) in front of transformers' LlamaForCausalLM in fp32; smoothing uses
export/smoothing.py's factors. Numbers differ slightly from the artifact's (float16 compute,
fp16 reference), which `make bench` (bench/suites/smollm2.py) measures for the chosen recipes;
the point here is the cheap sweep: one linear group at a time, alpha, exclusions, calibration size,
the floor of every-linear FP8 (`MODES`: what weights and activations each cost, per-token scales,
and E4M3 with an unbounded exponent range), structured 16-bit choices, and with --sensitivity each
linear's own cost (KL with only it FP8, on the calibration windows) and the top-k exclusion sweep.

Reported per variant: held-out perplexity and its change against the fp32 model with the paired
95 % interval of that change (per-token NLL differences, +-2 standard errors), top-1 agreement, and
the mean KL(fp32 || fp8) per position: the expected change of log-perplexity on text the model
predicts well (exp(KL) - 1 is the expected perplexity change), without the first-order noise
that makes a perplexity delta on ~900 tokens swing by about +-1 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from export.calibrate import checkpoint_calibration_tokens
from export.fp8 import FP8_MAX, _dequantize_eager, _quantize_eager, quantize_weight
from export.quantization import quantization_named
from export.smoothing import smoothing_factors
from export.tokenizer import model_tokenizer

# How a simulated linear rounds (the floor study): "static" is llama405's FP8 (export/fp8.py);
# "weights" / "activations" round only one operand; "per-token" gives each row of x its own scale
# (dynamic, as Meta's fbgemm kernels do; not the static per-tensor Q/DQ graph llama405 exports);
# "unbounded" rounds both to E4M3's 3-bit mantissa with no exponent limit: the floor any scaling
# of E4M3 operands can reach.
MODES = ("static", "weights", "activations", "per-token", "unbounded")


def mantissa3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 4 significant bits (E4M3's 1 + 3) at any exponent."""
    m, e = torch.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
    return torch.ldexp(torch.round(m * 16) / 16, e)


class SimulatedFp8Linear(nn.Module):
    """dq(q(x)) @ dq(W): what export/fp8.py's Fp8Linear computes, in fp32 (other MODES: the floor study)."""

    def __init__(self, linear: nn.Linear, input_scale: float, mode: str = "static"):
        super().__init__()
        self.mode, self.input_scale = mode, torch.tensor(input_scale)
        if mode in ("static", "weights", "per-token"):
            weight, scale = quantize_weight(linear.weight.data)
            self.weight = _dequantize_eager(weight, scale, 1)  # [in, out] fp32
        else:
            self.weight = linear.weight.data.t() if mode == "activations" else mantissa3(linear.weight.data).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("static", "activations"):
            x = _dequantize_eager(_quantize_eager(x, self.input_scale), self.input_scale, -1).to(x.dtype)
        elif self.mode == "per-token":
            scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # [..., 1]
            x = (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale
        elif self.mode == "unbounded":
            x = mantissa3(x)
        return x @ self.weight


class Ablation:
    def __init__(self, checkpoint: str, calib: tuple[int, int]):
        from transformers import LlamaForCausalLM
        self.checkpoint = checkpoint
        self.model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        text = resources.files("export").joinpath("data/heldout.txt").read_text(encoding="utf-8")
        self.ids = torch.tensor([model_tokenizer(checkpoint).encode(text, bos=True)])
        self.linears = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
        self.reference = self._logits()
        self.reference_ppl = math.exp(float(self._nll(self.reference).mean()))
        self.calibrate(calib)

    def _logits(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.ids).logits[0].double()  # [tokens, vocab]

    def _nll(self, logits: torch.Tensor) -> torch.Tensor:
        """[tokens - 1] each held-out token's negative log-likelihood."""
        logp = torch.log_softmax(logits[:-1], -1)
        return -logp[torch.arange(self.ids.shape[1] - 1), self.ids[0, 1:]]

    @contextlib.contextmanager
    def _simulated(self, quantized: list[str], amax: dict[str, float], mode: str = "static"):
        """`quantized` (module paths) replaced by simulated FP8 linears, restored on exit."""
        originals = {}
        try:
            for name in quantized:
                parent, leaf = name.rsplit(".", 1)
                originals[name] = getattr(self.model.get_submodule(parent), leaf)
                setattr(self.model.get_submodule(parent), leaf,
                        SimulatedFp8Linear(originals[name], amax[name] / FP8_MAX, mode))
            yield
        finally:
            for name, module in originals.items():
                parent, leaf = name.rsplit(".", 1)
                setattr(self.model.get_submodule(parent), leaf, module)

    def calibrate(self, calib: tuple[int, int]) -> None:
        """amax and per-channel amax of every linear input over the shipped calibration text."""
        tokens, _ = checkpoint_calibration_tokens(self.checkpoint, None, *calib)
        self.calib_ids = torch.as_tensor(tokens)  # [windows, seq]: sensitivity and local_error reuse them
        self.calib, self.amax, self.channel_amax = calib, {}, {}
        hooks = []
        for name in self.linears:
            def hook(module, args, name=name):
                x = args[0].detach().abs()
                per_channel = x.reshape(-1, x.shape[-1]).amax(dim=0)
                old = self.channel_amax.get(name)
                self.channel_amax[name] = per_channel if old is None else torch.maximum(old, per_channel)
                self.amax[name] = float(self.channel_amax[name].max())
            hooks.append(self.model.get_submodule(name).register_forward_pre_hook(hook))
        with torch.inference_mode():
            for row in self.calib_ids:
                self.model(row[None])
        for h in hooks:
            h.remove()

    def measure(self, quantized: list[str], smoothing_alpha: float | None = None,
                smoothed_layers: list[int] | None = None, mode: str = "static") -> dict:
        """Quantize `quantized` (module paths), optionally smoothing the up->down pair of
        `smoothed_layers` (None: every layer) first."""
        saved, layers = {}, self.model.model.layers
        amax = dict(self.amax)
        if smoothing_alpha is not None:
            for i, layer in enumerate(layers):
                if smoothed_layers is not None and i not in smoothed_layers:
                    continue
                name = f"model.layers.{i}.mlp.down_proj"
                s = smoothing_factors(self.channel_amax[name], layer.mlp.down_proj.weight.data, smoothing_alpha)
                saved[i] = (layer.mlp.up_proj.weight.data, layer.mlp.down_proj.weight.data)
                layer.mlp.up_proj.weight.data = saved[i][0] / s[:, None]
                layer.mlp.down_proj.weight.data = saved[i][1] * s[None, :]
                amax[name] = float((self.channel_amax[name] / s).max())
        try:
            with self._simulated(quantized, amax, mode):
                logits = self._logits()
        finally:
            for i, (up, down) in saved.items():
                layers[i].mlp.up_proj.weight.data, layers[i].mlp.down_proj.weight.data = up, down
        nll = self._nll(logits)
        nll_change = nll - self._nll(self.reference)  # [tokens - 1] per-token NLL differences
        ppl = math.exp(float(nll.mean()))
        half = 2 * float(nll_change.std()) / math.sqrt(len(nll_change))
        mean = float(nll_change.mean())
        ref_logp, logp = torch.log_softmax(self.reference, -1), torch.log_softmax(logits, -1)
        return {"perplexity": ppl, "delta_pct": 100 * (ppl / self.reference_ppl - 1),
                "delta_ci95_pct": [100 * (math.exp(mean - half) - 1), 100 * (math.exp(mean + half) - 1)],
                "top1": float((logits.argmax(-1) == self.reference.argmax(-1)).double().mean()),
                "kl": float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()),
                "fp8_linears": len(quantized), "calib": list(self.calib)}


    def sensitivity(self) -> dict[str, float]:
        """Each linear's own cost: the mean KL over the calibration windows with only it FP8 (the
        calibration text, so ranking linears by it does not peek at the held-out text)."""
        def logp() -> torch.Tensor:
            with torch.inference_mode():
                return torch.log_softmax(self.model(self.calib_ids).logits.double(), -1)
        reference, cost = logp(), {}
        for name in self.linears:
            with self._simulated([name], self.amax):
                cost[name] = float((reference.exp() * (reference - logp())).sum(-1).mean())
        return cost

    def local_error(self) -> dict[str, float]:
        """A cheap stand-in for `sensitivity`: each linear's own squared output error under FP8 on
        the calibration windows, sum((fp8(x) @ fp8(W) - x @ W)^2) — what a streamed calibration
        could compute layer by layer, with no whole-model forward per linear."""
        inputs, hooks = {}, []
        for name in self.linears:
            def keep(module, args, name=name):
                inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, in]
            hooks.append(self.model.get_submodule(name).register_forward_pre_hook(keep))
        try:
            with torch.inference_mode():
                self.model(self.calib_ids)
        finally:
            for h in hooks:
                h.remove()
        error = {}
        with torch.inference_mode():
            for name in self.linears:
                linear, x = self.model.get_submodule(name), inputs.pop(name)
                fp8 = SimulatedFp8Linear(linear, self.amax[name] / FP8_MAX)
                error[name] = float((fp8(x) - x @ linear.weight.t()).pow(2).sum())
        return error


def rank_correlation(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman's rho of two scores over the same names."""
    names = list(a)
    ranks = [torch.tensor([score[n] for n in names]).argsort().argsort().double() for score in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def without(linears: list[str], *suffixes: str) -> list[str]:
    return [n for n in linears if not n.endswith(suffixes)]


def down_projs(layers) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}.mlp.down_proj" for i in layers)


def _show(name: str, r: dict) -> None:
    low, high = r["delta_ci95_pct"]
    print(f"{name:55s} ppl {r['perplexity']:.3f} ({r['delta_pct']:+.2f}%, 95% {low:+.1f}..{high:+.1f}) "
          f"top-1 {r['top1']:.3f} KL {r['kl']:.5f} (expected {100 * math.expm1(r['kl']):+.2f}%) "
          f"fp8 {r['fp8_linears']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="SmolLM2 HF checkpoint (`llama405 convert-gguf --smollm2 --out DIR`)")
    p.add_argument("--out", type=Path, help="also write the results here (JSON)")
    p.add_argument("--only", help="';'-separated variant name prefixes to run (default: all)")
    p.add_argument("--sensitivity", action="store_true",
                   help="also each linear's own cost and the top-k exclusion sweep (~5 s per linear on one core)")
    p.add_argument("--local-error", action="store_true",
                   help="also rank the linears by their own FP8 output error (a cheap stand-in) and sweep its top-k")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ab = Ablation(args.checkpoint, (4, 256))
    every = ab.linears
    groups = tuple(dict.fromkeys(n.rsplit(".", 1)[1] for n in every))  # q_proj, ..., down_proj
    layers = len(ab.model.model.layers)

    def recipe(name: str, *exclude: str) -> list[str]:  # the linears llama405's export quantizes with these flags
        scheme = quantization_named("fp8", name, exclude)
        return [n for n in every if scheme.quantizes(n, layers)]
    meta = recipe("meta")
    massive = sorted(range(layers), key=lambda i: -ab.amax[down_projs([i])[0]])[:3]
    def layer(n: str) -> int:
        return int(n.split(".")[2])

    def fp8_between(first: int, last: int) -> list[str]:  # the first `first` and last `last` layers 16-bit
        return [n for n in every if first <= layer(n) < layers - last]
    variants = {  # the cheap-to-explain ones first: on a busy machine the sweep takes a while
        "all": lambda: ab.measure(every),
        **{f"floor: {mode}": (lambda mode=mode: ab.measure(every, mode=mode)) for mode in MODES[1:]},
        **{f"layers [0, {f}) and last {last} 16-bit": (lambda f=f, last=last: ab.measure(fp8_between(f, last)))
           for f, last in ((1, 1), (2, 2), (4, 2), (6, 2))},
        "meta + layers [0, 4) 16-bit": lambda: ab.measure(recipe("meta", "model.layers.[0-3].*")),
        "mlp 16-bit (attention FP8)": lambda: ab.measure(without(every, "gate_proj", "up_proj", "down_proj")),
        f"smoothing 0.5, layers {massive} only": lambda: ab.measure(every, 0.5, massive),
        f"smoothing 0.3, layers {massive} only": lambda: ab.measure(every, 0.3, massive),
        f"down_proj of layers {massive[:2]} 16-bit": lambda: ab.measure(without(every, *down_projs(massive[:2]))),
        f"down_proj of layers {massive} 16-bit": lambda: ab.measure(without(every, *down_projs(massive))),
        **{f"only {g}": (lambda g=g: ab.measure([n for n in every if n.endswith(g)])) for g in groups},
        "meta": lambda: ab.measure(meta),
        "all but down_proj": lambda: ab.measure(without(every, "down_proj")),
        **{f"smoothing {a}": (lambda a=a: ab.measure(every, a)) for a in (0.3, 0.5, 0.7, 0.85)},
        f"smoothing 0.5 + down_proj of layers {massive[:2]} 16-bit":
            lambda: ab.measure(without(every, *down_projs(massive[:2])), 0.5),
    }
    if args.sensitivity:
        cost = ab.sensitivity()
        ranked = sorted(every, key=lambda n: -cost[n])
        for rank, name in enumerate(ranked[:30], 1):
            print(f"sensitivity {rank:3d}: {name} KL {cost[name]:.5f}", flush=True)
        variants.update({f"sensitivity: top {k} 16-bit": (lambda k=k: ab.measure(
            [n for n in every if n not in ranked[:k]])) for k in (5, 10, 20, 30, 50, 80, 100, 126)})
    if args.local_error:
        error = ab.local_error()
        by_error = sorted(every, key=lambda n: -error[n])
        if args.sensitivity:
            print(f"local error vs sensitivity: Spearman rho {rank_correlation(error, cost):+.3f}", flush=True)
        variants.update({f"local error: top {k} 16-bit": (lambda k=k: ab.measure(
            [n for n in every if n not in by_error[:k]])) for k in (30, 80, 126)})
    results = {}
    for name, run in variants.items():
        if args.only and not any(name.startswith(o) for o in args.only.split(";")):
            continue
        results[name] = run()
        _show(name, results[name])
    for calib in ((1, 256), (8, 512)):
        ab.calibrate(calib)
        for name, alpha in ((f"all, calibration {calib[0]}x{calib[1]}", None),
                            (f"smoothing 0.5, calibration {calib[0]}x{calib[1]}", 0.5)):
            if args.only and not any(name.startswith(o) for o in args.only.split(";")):
                continue
            results[name] = ab.measure(every, alpha)
            _show(name, results[name])
    record = {"fp32_perplexity": ab.reference_ppl, "tokens": int(ab.ids.shape[1]),
              "down_proj_input_amax": {n: ab.amax[n] for n in every if n.endswith("down_proj")},
              "sensitivity": cost if args.sensitivity else None,
              "local_error": error if args.local_error else None, "results": results}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
