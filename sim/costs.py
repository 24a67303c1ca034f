"""What the simulator needs to know about a cluster: per-role costs, the cluster shape and the workload.

The one idea: every cost is a small linear form, so a measured trace can fit it (calibration, issue 7) and a
replica can be advanced analytically. A rollout replica running n sequences takes one decode iteration of

    step_s(n) = decode_step_s + (n − 1) · decode_step_s_per_seq                 (n ≥ 1)

and produces one token per running sequence. Prefill and the learner are linear in tokens; a teacher call on n
sequences of T positions in all takes teacher_call_s + n·teacher_s_per_seq + T·teacher_s_per_token.
Every field is validated in `__post_init__` (ValueError naming the field and its range). Times in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from asyncopd.config import check_finite

DISTS = ("fixed", "lognormal", "empirical")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_time(obj, name: str, positive: bool = False) -> None:
    x = getattr(obj, name)
    ok = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)
    if not ok or x < 0 or (positive and x == 0):
        rng = "> 0" if positive else ">= 0"
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number {rng}, got {x!r}")


def _check_int(obj, name: str, lo: int) -> None:
    x = getattr(obj, name)
    if not _is_int(x) or x < lo:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {lo}, got {x!r}")


@dataclass  # not frozen: Hydra overrides (see scheduler.SchedulerConfig)
class CostModel:
    decode_step_s: float = 0.02          # s, one decode iteration of a replica at batch 1, > 0
    decode_step_s_per_seq: float = 2e-4  # s, added to an iteration per extra running sequence, >= 0
    prefill_s_per_token: float = 2e-5    # s per prompt token, paid when a sequence joins a replica, >= 0
    max_batch: int = 64                  # concurrent sequences per rollout replica, >= 1
    teacher_s_per_token: float = 5e-5    # s per scored position (prompt + response) on one teacher replica, >= 0
    teacher_s_per_seq: float = 0.0       # s per scored sequence (padding, per-sequence work), >= 0
    teacher_call_s: float = 0.0          # s, fixed cost of one teacher call (a batch of sequences), >= 0
    teacher_max_batch: int = 1           # sequences one separate teacher replica scores per call, >= 1
    learner_s_per_token: float = 1e-4    # s per trained response token, >= 0
    learner_step_s: float = 0.5          # s, fixed cost per learner step, >= 0
    publish_s: float = 0.0               # s the learner itself spends per step handing its weights out, >= 0
    weight_sync_s: float = 0.2           # s from a learner step's end until every rollout replica holds the new
                                         # weights (transfer and load); replicas start no request of the new
                                         # version before, the learner goes on after publish_s, >= 0

    def __post_init__(self):
        check_finite(self, "CostModel.")
        _check_time(self, "decode_step_s", positive=True)
        for name in ("decode_step_s_per_seq", "prefill_s_per_token", "teacher_s_per_token", "teacher_s_per_seq",
                     "teacher_call_s", "learner_s_per_token", "learner_step_s", "publish_s", "weight_sync_s"):
            _check_time(self, name)
        _check_int(self, "max_batch", 1)
        _check_int(self, "teacher_max_batch", 1)

    def score_s(self, n_seqs: int, tokens: int) -> float:
        """One teacher call scoring n_seqs sequences of `tokens` positions in all."""
        return self.teacher_call_s + n_seqs * self.teacher_s_per_seq + tokens * self.teacher_s_per_token

    def step_s(self, n: int) -> float:
        """One decode iteration with n ≥ 1 running sequences."""
        return self.decode_step_s + (n - 1) * self.decode_step_s_per_seq


PLACEMENTS = ("separate", "teacher_with_rollout", "teacher_with_learner")


@dataclass
class ClusterShape:
    """Which roles run where. `placement` says which roles share hardware (a shared resource in the model):

    - separate: rollout replicas, teacher replicas and the learner each have their own devices;
    - teacher_with_rollout: each rollout replica scores its own finished trajectories on its own device, and
      stops decoding while it does (the toy's colocate_teacher_with_rollout); teacher_replicas must be 0;
    - teacher_with_learner: the teacher runs on the learner's devices, so scoring and training take turns on
      one resource; teacher_replicas must be 0.

    The GPU counts are bookkeeping for `sim.plan` (a GPU budget); the costs in CostModel are per replica and,
    for the learner, for `learner_gpus` GPUs.
    """
    rollout_replicas: int = 1            # rollout engines, each with its own continuous batch, >= 1
    teacher_replicas: int = 1            # teacher servers, each one call at a time, >= 1 (0 if colocated)
    placement: str = "separate"          # separate | teacher_with_rollout | teacher_with_learner
    gpus_per_rollout_replica: int = 1    # GPUs one rollout replica occupies (tensor parallel), >= 1
    gpus_per_teacher_replica: int = 1    # GPUs one teacher replica occupies, >= 1
    learner_gpus: int = 1                # GPUs of the learner (FSDP) that costs.learner_* were measured on, >= 1
    score_group: int = 1                 # teacher_with_rollout: score once this many are finished (or the
                                         # replica's batch is empty), >= 1; the toy backend uses B // 4

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ClusterShape.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        _check_int(self, "rollout_replicas", 1)
        if self.placement == "separate":
            _check_int(self, "teacher_replicas", 1)
        elif self.teacher_replicas != 0:
            raise ValueError(f"ClusterShape.teacher_replicas must be 0 with placement={self.placement!r} (the "
                             f"teacher runs on the {self.placement.split('_')[-1]}'s devices), "
                             f"got {self.teacher_replicas!r}")
        for name in ("gpus_per_rollout_replica", "gpus_per_teacher_replica", "learner_gpus", "score_group"):
            _check_int(self, name, 1)

    @property
    def gpus(self) -> int:
        """GPUs this shape occupies."""
        return (self.rollout_replicas * self.gpus_per_rollout_replica
                + self.teacher_replicas * self.gpus_per_teacher_replica + self.learner_gpus)


@dataclass
class LengthDist:
    dist: str = "fixed"                  # "fixed" | "lognormal" | "empirical"
    mean: float = 256.0                  # tokens: the length (fixed) or the untruncated mean (lognormal), >= 1
    sigma: float = 0.5                   # lognormal shape (std of log length), >= 0
    max: int = 1024                      # tokens, every sample is truncated to at most this, >= 1
    values: list[int] = field(default_factory=list)  # empirical: observed lengths, sampled uniformly

    def __post_init__(self):
        check_finite(self, "LengthDist.")
        if self.dist not in DISTS:
            raise ValueError(f"LengthDist.dist must be one of {DISTS}, got {self.dist!r}")
        _check_time(self, "sigma")
        _check_int(self, "max", 1)
        if not (isinstance(self.mean, (int, float)) and math.isfinite(self.mean) and self.mean >= 1):
            raise ValueError(f"LengthDist.mean must be a finite number >= 1, got {self.mean!r}")
        if self.dist == "empirical" and (len(self.values) == 0 or not all(_is_int(v) and v >= 1 for v in self.values)):
            raise ValueError(f"LengthDist.values must be a non-empty list of ints >= 1 for dist='empirical', "
                             f"got {self.values!r}")

    def sample(self, rng: np.random.Generator) -> int:
        """One response length in [1, max]."""
        if self.dist == "fixed":
            n = round(self.mean)
        elif self.dist == "lognormal":        # E[exp(N(μ, σ²))] = mean  =>  μ = log(mean) − σ²/2
            n = round(rng.lognormal(math.log(self.mean) - self.sigma ** 2 / 2, self.sigma))
        else:
            n = int(self.values[rng.integers(len(self.values))])
        return int(min(self.max, max(1, n)))


@dataclass
class Workload:
    batch_size: int = 64                 # trajectories per learner step (B), >= 1; overrides the scheduler's
    prompt_len: int = 128                # tokens per prompt, >= 0
    length: LengthDist = field(default_factory=LengthDist)  # response lengths

    def __post_init__(self):
        _check_int(self, "batch_size", 1)
        _check_int(self, "prompt_len", 0)
        if isinstance(self.length, dict):
            self.length = LengthDist(**self.length)
