"""The parity report: every step's row (runner/compare.py), the whole-run aggregate and verdict,
and its three renderings — the JSON report, the per-step table, and the text `llama405 parity`
prints around that table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from runner.compare import StepRow, Tolerance, relative, under


@dataclasses.dataclass
class ParityReport:
    backend_a: str
    backend_b: str
    prompt: list[int]
    steps: int
    tolerance: Tolerance
    rows: list[StepRow]
    context: dict[str, Any] = dataclasses.field(default_factory=dict)  # artifact, preset, ...
    overall: dict[str, Any] = dataclasses.field(default_factory=dict)
    overall_failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f for row in self.rows for f in row.failures] + self.overall_failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def summarize(self) -> None:
        """Aggregate the rows (exactly, from their sums) and judge the whole-run limits."""
        rows = self.rows
        weight = sum(r.logits["positions"] for r in rows)
        elements = sum(r.logits["elements"] for r in rows)
        self.overall = {
            "max_abs": max(r.logits["max_abs"] for r in rows),
            "mean_abs": sum(r.logits["mean_abs"] * r.logits["elements"] for r in rows) / max(elements, 1),
            "p99_abs": max(r.logits["p99_abs"] for r in rows),  # worst step's p99
            "rel_l2": relative(math.sqrt(sum(r.logits["l2_diff"] ** 2 for r in rows)),
                               math.sqrt(sum(r.logits["l2_ref"] ** 2 for r in rows))),
            "cosine": min(r.logits["cosine"] for r in rows),
            "top1": sum(r.logits["top1"] * r.logits["positions"] for r in rows) / max(weight, 1),
            "top5": sum(r.logits["top5"] * r.logits["positions"] for r in rows) / max(weight, 1),
            "positions": weight,
            "kv_max_abs": max(r.kv["max_abs"] for r in rows),
            "kv_rel_l2": max(r.kv["rel_l2"] for r in rows),
            "greedy_agreement": sum(r.next_a == r.next_b for r in rows) / len(rows),
        }
        self.overall_failures = []
        if under(self.overall["top1"], self.tolerance.min_top1):
            self.overall_failures.append(
                f"all steps logits top1 {self.overall['top1']:.3f} < {self.tolerance.min_top1} "
                f"(over {weight} positions)")

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({
            "passed": self.passed,
            "backend_a": self.backend_a, "backend_b": self.backend_b,
            **self.context,
            "prompt_tokens": self.prompt, "steps": self.steps,
            "tolerance": dataclasses.asdict(self.tolerance),
            "rows": [{"step": r.step, "kind": r.kind, "tokens": r.tokens, "logits": r.logits,
                      "kv_cache": r.kv, "next_token_a": r.next_a, "next_token_b": r.next_b,
                      "seconds_a": r.seconds_a, "seconds_b": r.seconds_b, "passed": r.passed,
                      "failures": r.failures} for r in self.rows],
            "overall": self.overall,
            "failures": self.failures,
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        head = (f"{'step':>4}  {'kind':<7} {'tokens':>6}  {'max_abs':>9}  {'rel_l2':>9}  {'cosine':>9}  "
                f"{'top1':>5}  {'top5':>5}  {'kv_max_abs':>10}  verdict")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lg = r.logits
            verdict = "ok" if r.passed else "FAIL " + ",".join(
                sorted({"kv_cache" if " kv_cache " in f else "logits" for f in r.failures}))
            lines.append(f"{r.step:>4}  {r.kind:<7} {len(r.tokens):>6}  {lg['max_abs']:>9.3g}  "
                         f"{lg['rel_l2']:>9.3g}  {lg['cosine']:>9.6f}  {lg['top1']:>5.3f}  "
                         f"{lg['top5']:>5.3f}  {r.kv['max_abs']:>10.3g}  {verdict}")
        o, t = self.overall, self.tolerance
        lines.append("-" * len(head))
        lines.append(f"{'all':>4}  {'':<7} {o['positions']:>6}  {o['max_abs']:>9.3g}  {o['rel_l2']:>9.3g}  "
                     f"{o['cosine']:>9.6f}  {o['top1']:>5.3f}  {o['top5']:>5.3f}  {o['kv_max_abs']:>10.3g}  "
                     f"{'PASS' if self.passed else 'FAIL'}")
        lines.append(f"{'limit':>4}  {'':<7} {'':>6}  {t.max_abs:>9.3g}  {t.rel_l2:>9.3g}  "
                     f"{t.min_cosine:>9.6f}  {t.min_top1:>5.3f}  {'':>5}  {t.kv_max_abs:>10.3g}")
        return "\n".join(lines)

    def format_text(self) -> str:
        """What `llama405 parity` prints: the two sides and the run, the table, the verdict
        (and the fidelity section of an FP8 artifact against its --reference)."""
        c = self.context
        lines = [f"parity  a = {c['a']}", f"        b = {c['b']} (reference)",
                 f"        {c['dtype']} tp{c['tp']} pp{c['pp']} {c['kv_cache']} cache; {len(self.prompt)} prompt "
                 f"tokens ({c['token_source']}) + {self.steps} decode steps; tolerance {c['tolerance_preset']}",
                 "", self.format_table(), ""]
        if c.get("fidelity"):
            from runner.fidelity import format_fidelity
            lines += [format_fidelity(c["fidelity"]), ""]
        if self.passed:
            lines.append(f"PASS: {self.backend_a} and {self.backend_b} agree within tolerance")
        else:
            lines += [f"FAIL: {failure}" for failure in self.failures]
        return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN/inf become null (their presence is already counted as non-finite)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value
