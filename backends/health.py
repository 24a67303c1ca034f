"""Collapse detection: a health check of every learner step, built on the monitors every run already logs.

The one idea: a run that stops learning must not end as "done". NaN/inf is divergence (the learner refuses to
step, backends/session.py names the last checkpoint); collapse is a run that keeps producing finite numbers while
the student falls apart: accuracy gone, the gradient exactly zero, responses shrunk to nothing, or the batch
dominated by truncated or repetitive rollouts (StableOPD's length inflation). Each signal compares a metrics row
with the run's own starting point (the step-0 evaluation, the first trained batch):

    accuracy          accuracy < accuracy_frac · initial accuracy, and at least min_accuracy_drop below it
                      (held-out greedy, eval steps; the absolute floor keeps a weak student's noise quiet)
    reverse KL        eval_reverse_kl > kl_factor · initial eval_reverse_kl (held-out, eval steps)
    zero gradient     grad_norm == 0 exactly (a whole batch without gradient: every token masked or clipped away)
    length collapse   response_len_mean < length_frac · the first batch's response_len_mean
    truncation        truncation_rate > max_truncation
    repetition        repetition_rate > max_repetition

A step is unhealthy when any signal fires (eval signals hold their last evaluated value until the next
evaluation). `patience` unhealthy steps in a row are a collapse: the run logs a warning and, with
on_collapse="stop" (the default), stops with an error naming the signals and the last checkpoint, so the command
exits non-zero; on_collapse="warn" keeps training (studies that measure collapse use it). Every row gets a
`health` column: "ok", or the signals that fired. Set a threshold to its off value (0 for the fractions, inf
for the others) to switch one signal off, or enabled=false for all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ON_COLLAPSE = ("stop", "warn")


@dataclass
class HealthConfig:
    enabled: bool = True                 # run the check every step
    on_collapse: str = "stop"            # stop: end the run with an error (non-zero exit) | warn: log and go on
    patience: int = 3                    # unhealthy steps in a row that make a collapse, >= 1
    accuracy_frac: float = 0.25          # accuracy below this fraction of the initial accuracy, in [0, 1]
    min_accuracy_drop: float = 0.1       # ... and at least this far below it (absolute), in [0, 1]
    kl_factor: float = 10.0              # held-out reverse KL above this multiple of the initial one, >= 1
    length_frac: float = 0.2             # mean response length below this fraction of the first batch's, in [0, 1]
    max_truncation: float = 0.9          # truncated share of the batch above this, in [0, 1]
    max_repetition: float = 0.9          # 3-gram repetition rate above this, in [0, 1]

    def __post_init__(self):
        if self.on_collapse not in ON_COLLAPSE:
            raise ValueError(f"health.on_collapse must be one of {ON_COLLAPSE}, got {self.on_collapse!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"health.patience must be an int >= 1, got {self.patience!r}")
        for name, lo, hi in (("accuracy_frac", 0, 1), ("min_accuracy_drop", 0, 1), ("kl_factor", 1, math.inf),
                             ("length_frac", 0, 1), ("max_truncation", 0, 1), ("max_repetition", 0, 1)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not math.isnan(v) and lo <= v <= hi):
                raise ValueError(f"health.{name} must be in [{lo}, {hi}], got {v!r}")


class CollapseError(RuntimeError):
    """The run collapsed (HealthConfig): raised by the session so the command exits non-zero."""


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class HealthCheck:
    """Feed it every metrics row in order (`__call__`): returns the signals that fired for that row."""

    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.initial: dict = {}              # accuracy, eval_reverse_kl at step 0; response_len_mean of step 1
        self.last_eval: dict = {}            # the latest evaluated accuracy / eval_reverse_kl
        self.streak = 0                      # unhealthy steps in a row

    def __call__(self, row: dict) -> list[str]:
        for key in ("accuracy", "eval_reverse_kl"):
            if (v := _num(row, key)) is not None:
                self.initial.setdefault(key, v)
                self.last_eval[key] = v
        if row.get("step", 0) == 0 or not self.cfg.enabled:
            return []
        if (v := _num(row, "response_len_mean")) is not None:
            self.initial.setdefault("response_len_mean", v)
        fired = self.signals(row)
        self.streak = self.streak + 1 if fired else 0
        return fired

    @property
    def collapsed(self) -> bool:
        return self.streak >= self.cfg.patience

    def signals(self, row: dict) -> list[str]:
        c, init, ev = self.cfg, self.initial, self.last_eval
        out = []
        if "accuracy" in init and (ev["accuracy"] < c.accuracy_frac * init["accuracy"]
                                   and init["accuracy"] - ev["accuracy"] >= c.min_accuracy_drop):
            out.append(f"accuracy {init['accuracy']:.3g} -> {ev['accuracy']:.3g}")
        if "eval_reverse_kl" in init and ev["eval_reverse_kl"] > c.kl_factor * max(init["eval_reverse_kl"], 1e-12):
            out.append(f"held-out reverse KL {init['eval_reverse_kl']:.3g} -> {ev['eval_reverse_kl']:.3g}")
        if _num(row, "grad_norm") == 0.0:
            out.append(f"gradient norm exactly 0 (loss {row.get('loss')})")
        length = _num(row, "response_len_mean")
        if length is not None and length < c.length_frac * init["response_len_mean"]:
            out.append(f"mean response length {init['response_len_mean']:.3g} -> {length:.3g}")
        if (t := _num(row, "truncation_rate")) is not None and t > c.max_truncation:
            out.append(f"truncation rate {t:.2f}")
        if (r := _num(row, "repetition_rate")) is not None and r > c.max_repetition:
            out.append(f"repetition rate {r:.2f}")
        return out
