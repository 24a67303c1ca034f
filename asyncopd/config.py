"""The core's configuration, importable without torch: `check_finite`, the estimators' option names and
`ObjectiveConfig`.

A run's config is validated before anything heavy is imported (`python -m backends.run`: a config error shows up
in a second, not after torch, transformers and ray load), so every config schema lives in a module like this one:
stdlib only. `asyncopd.estimators` and `asyncopd.objective` re-export what is defined here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

# --- every config's float fields --------------------------------------------------------------------------------

def check_finite(cfg, prefix: str = "", allow_inf: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first field of the dataclass `cfg` that holds NaN or ±inf, or a list of
    numbers with one (`{prefix}{field} must be finite, got inf`). A field in `allow_inf` may be ±inf (its
    docstring says what inf means), never NaN. Every config calls it first in its `__post_init__`; nested
    configs check themselves."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, x in items:
            if not isinstance(x, numbers.Real) or isinstance(x, numbers.Integral) or math.isfinite(x):
                continue
            if math.isinf(x) and f.name in allow_inf:
                continue
            where = f"{prefix}{f.name}" + ("" if i is None else f"[{i}]")
            raise ValueError(f"{where} must be finite, got {x}")


# --- the estimators' options (asyncopd/estimators/ checks its arguments against the same tuples) -----------

TAILS = ("bucket", "renorm", "none")                                  # top-k tail handling (kl.py)
SIGNALS = ("recompute", "stale")                                      # reverse_kl_sampled's signal
CORRECTIONS = ("none", "is", "tis", "clip", "decoupled", "m2po")      # ... its off-policy correction
BASELINES = ("none", "vcpo")                                          # ... its baseline
DEFAULT_CHUNK_BYTES = 32 * 2**20   # bytes of one fp32 [rows, V] chunk block (see chunk_rows)


def chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per vocabulary chunk: the most rows whose fp32 [rows, V] block fits in chunk_bytes, at least 1.

    A chunk's row function holds a few such blocks at once (the logits' exp, log-probs, their gradient), so
    an estimator's memory beyond its one [N, V] gradient is a small multiple of chunk_bytes, whatever N and
    V are: 32 MiB is 256 rows at V = 32768, 55 at V = 152064 (benchmarks/loss_memory.py measures the peak).
    Smaller chunks cost time only through per-chunk overhead (a few kernel launches per chunk)."""
    return max(1, chunk_bytes // (4 * vocab))
TRAINABLE = ("forward_kl_topk", "reverse_kl_topk", "reverse_kl_sampled", "reverse_kl_mc")  # need no full logits


@dataclass
class ObjectiveConfig:
    """The `objective.*` keys of a run: which estimator, on which teacher-cache fields, with which stabilisers
    (asyncopd/objective.py computes it)."""
    estimator: str = "forward_kl_topk"   # one of TRAINABLE
    topk: int = 8                        # teacher top-k kept in the cache (top-k estimators), >= 1
    tail: str = "bucket"                 # top-k tail handling: bucket | renorm | none
    signal: str = "recompute"            # reverse_kl_sampled: stale (log π_β) | recompute (learner-time log π_θ)
    correction: str = "none"             # reverse_kl_sampled: none | is | tis | clip | decoupled | m2po
    is_cap: float = 2.0                  # truncation cap of tis / decoupled, > 1
    clip_eps: float = 0.2                # PPO clip range ε of clip / decoupled, in (0, 1)
    m2po_tau: float = 0.04               # M2PO second-moment bound, > 0
    n_samples: int = 4                   # reverse_kl_mc: sampler draws per position, >= 1
    self_normalize: bool = True          # reverse_kl_mc with a stale sampler: self-normalised IS
    ref_kl_coef: float = 0.0             # StableOPD divergence-to-reference weight, >= 0 (0 = off)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # bytes of one fp32 [rows, V] vocabulary chunk (chunk_rows), >= 1
    baseline: str = "none"               # reverse_kl_sampled: none | vcpo (VCPO's off-policy optimal baseline)

    def __post_init__(self):
        check_finite(self, "ObjectiveConfig.")
        choices = {"estimator": TRAINABLE, "tail": TAILS, "signal": SIGNALS, "correction": CORRECTIONS,
                   "baseline": BASELINES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ObjectiveConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, ok, rule in (("topk", self.topk >= 1, ">= 1"), ("is_cap", self.is_cap > 1, "> 1"),
                               ("clip_eps", 0 < self.clip_eps < 1, "in (0, 1)"),
                               ("m2po_tau", self.m2po_tau > 0, "> 0"), ("n_samples", self.n_samples >= 1, ">= 1"),
                               ("ref_kl_coef", self.ref_kl_coef >= 0, ">= 0"),
                               ("chunk_bytes", self.chunk_bytes >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"ObjectiveConfig.{name} must be {rule}, got {getattr(self, name)!r}")
        if self.baseline != "none" and self.estimator != "reverse_kl_sampled":
            raise ValueError(f"ObjectiveConfig.baseline={self.baseline!r} applies to estimator=reverse_kl_sampled "
                             f"only, got estimator={self.estimator!r}")
        if self.estimator == "reverse_kl_mc" and self.self_normalize and self.n_samples < 2:
            raise ValueError("ObjectiveConfig.n_samples must be >= 2 with self_normalize=True (reverse_kl_mc)")

    @property
    def name(self) -> str:
        """A readable label, e.g. 'reverse_kl_sampled[stale,tis]', 'reverse_kl_sampled[stale,tis,vcpo]' (with
        the VCPO baseline) or 'forward_kl_topk[k=8,bucket]'."""
        if self.estimator == "reverse_kl_sampled":
            extra = "" if self.baseline == "none" else f",{self.baseline}"
            return f"reverse_kl_sampled[{self.signal},{self.correction}{extra}]"
        if self.estimator == "reverse_kl_mc":
            return f"reverse_kl_mc[M={self.n_samples}]"
        return f"{self.estimator}[k={self.topk},{self.tail}]"
