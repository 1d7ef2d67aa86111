"""Blocked-mass telemetry: how much probability the mask removed, and which rules removed it.

Opt-in (``SafeLogitsProcessor(..., telemetry=True)`` or a :class:`Telemetry` object). At each step,
for each row, the *removed mass* is the softmax probability, under the scores the guard received,
of the ids it masked: ``Σ_masked exp(x - max) / Σ_all exp(x - max)`` — vectorised passes with
float64 sums, and no cancellation when almost everything is masked. When a row loses mass, the most probable masked candidate is named with the rules
that forbid it (the components whose automaton the token would drive into a match, narrowed to
the exact rules by the ``regex`` oracle on the row's text).

A sustained attack shows up as removed mass that stays high: with ``stop_threshold`` and
``stop_after`` the row fails closed — everything but EOS is masked once the removed mass has
exceeded the threshold on ``stop_after`` consecutive steps, so the sequence ends
(``finish_reason == "content_filter"``).

An optional JSONL audit log gets one line per blocked event. Secrets are redacted: the blocked
candidate is logged as its length and a SHA-256 prefix, never as text.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..engine.guide import Guide, GuideBatch, mask_guides

BLOCKED = 1e-6  # removed mass above this counts as a blocked step


@dataclass
class StepRecord:
    """One row at one step: the removed mass, and (if blocked) the top masked candidate's rules."""

    step: int
    removed_mass: float
    rules: tuple = ()
    token: int = -1


@dataclass
class RowReport:
    """Per-request summary: blocked steps, max and total removed mass, the steps themselves."""

    steps: list = field(default_factory=list)
    stopped: bool = False
    high_streak: int = 0

    def summary(self) -> dict:
        masses = [s.removed_mass for s in self.steps]
        blocked = [s for s in self.steps if s.removed_mass > BLOCKED]
        rules = sorted({r for s in blocked for r in s.rules})
        return {"steps": len(self.steps), "blocked_steps": len(blocked),
                "max_removed_mass": round(max(masses, default=0.0), 6),
                "total_removed_mass": round(float(sum(masses)), 6), "rules": rules,
                "stopped_early": self.stopped}


class Telemetry:
    """Collects :class:`StepRecord` per row around a guard's mask (see the module docstring)."""

    def __init__(self, compiled, *, stop_threshold: Optional[float] = None, stop_after: int = 3,
                 audit_log: Optional[str | Path] = None, request_id: str = ""):
        if stop_threshold is not None and not 0.0 < stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold={stop_threshold!r}: expected a probability in (0, 1]")
        if stop_after < 1:
            raise ValueError(f"stop_after={stop_after!r}: expected at least 1 step")
        self.compiled = compiled
        self.stop_threshold = stop_threshold
        self.stop_after = stop_after
        self.audit_path = Path(audit_log) if audit_log else None
        self.request_id = request_id
        self.rows: list[RowReport] = []
        self._lock = threading.Lock()
        self._weights = self._sums = None

    def reset(self) -> None:
        self.rows = []

    def before(self, scores: torch.Tensor) -> None:
        """Remember each row's unnormalised probabilities ``exp(x - max)`` and their sum (float64)."""
        rows = _as_float32(scores)
        self._weights = np.exp(rows - rows.max(axis=1, keepdims=True))
        self._sums = self._weights.sum(axis=1, dtype=np.float64)

    def after(self, input_ids: torch.Tensor, scores: torch.Tensor, batch: GuideBatch, new_generation: bool) -> None:
        """Record the step (``batch``: the rows' guides after it); apply the early stop where the
        removed mass stayed high: the row's guide is stopped (fail closed, only EOS is left)."""
        guides, prompt_length = batch.guides, batch.prompt_length
        masked = np.isneginf(_as_float32(scores))
        blocked_weights = np.where(masked, self._weights, np.float32(0.0))
        removed = np.clip(blocked_weights.sum(axis=1, dtype=np.float64) / self._sums, 0.0, 1.0)
        candidates = blocked_weights.argmax(axis=1)  # the most probable masked id of each row
        if new_generation or len(self.rows) != len(guides):
            self.rows = [RowReport() for _ in guides]
        step = input_ids.shape[1] - prompt_length
        for row, report in enumerate(self.rows):
            mass = float(removed[row])
            record = StepRecord(step, mass)
            if mass > BLOCKED:
                token = int(candidates[row])
                record.rules, record.token = self._rules_for(guides[row], token, input_ids[row, prompt_length:]), token
                self._audit(row, record)
            report.steps.append(record)
            report.high_streak = report.high_streak + 1 if (
                self.stop_threshold is not None and mass >= self.stop_threshold) else 0
            if report.high_streak >= self.stop_after and not report.stopped:
                report.stopped = True
                batch.stop(row)  # the next steps mask everything but EOS; this one now:
                mask_guides(scores, [row], [batch.guides[row]])

    def _rules_for(self, guide: Guide, token: int, generated: torch.Tensor) -> tuple:
        """The rules that forbid ``token`` after this row's text: among the components whose
        automaton the token drives into a match, the rules the ``regex`` oracle finds violated."""
        from ..policy.rules import rule_violated

        policy = self.compiled.policy
        members = self.compiled.component_rules
        if members is not None:
            suspects = sorted({i for k in guide.violating_components(token) for i in members[k]})
        else:  # a combined policy keeps no per-component rule list: ask the oracle about every rule
            suspects = range(len(policy.forbid))
        text = self.compiled.vocabulary.text(generated.tolist() + [token])
        ids = policy.rule_ids()
        return tuple(sorted({ids[i] for i in suspects if rule_violated(policy.forbid[i], text)}))

    def _audit(self, row: int, record: StepRecord) -> None:
        if self.audit_path is None:
            return
        data = self.compiled.vocabulary.token_bytes[record.token] or b""
        line = {"time": time.time(), "request": self.request_id, "row": row, "step": record.step,
                "removed_mass": round(record.removed_mass, 6), "rules": list(record.rules),
                "candidate": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}}
        with self._lock, open(self.audit_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def report(self, row: int = 0) -> dict:
        """The per-request summary of ``row`` (see :meth:`RowReport.summary`)."""
        return self.rows[row].summary() if row < len(self.rows) else RowReport().summary()


def _as_float32(scores: torch.Tensor) -> np.ndarray:
    """The scores as a float32 numpy array (a view on CPU float32, else a host copy)."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
        return scores.numpy()
    return scores.detach().float().cpu().numpy()
