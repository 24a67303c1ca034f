"""Rollout records: what a rollout engine hands to the scheduler, and what the learner trains on.

A `Trajectory` is one sampled response. Staleness is counted in learner weight versions: a trajectory
whose weights changed while it was being generated (an in-flight weight update) carries a version per
token, and its `behav_version` is the *oldest* of them, so the staleness the scheduler bounds is the worst
case over its tokens. `admit_version` is the version the scheduler admitted it at: a worker that received
newer weights before starting it (a concurrent run) returns behav_version > admit_version; it defaults to
behav_version. The simulator builds content-free trajectories with `Trajectory.fake`; backends
fill in the tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:          # torch only in annotations: the simulator moves Trajectory.fake without importing torch
    import torch

FINISH_REASONS = ("stop", "length")  # stop token sampled | truncated at the maximum response length


@dataclass
class Trajectory:
    uid: int                                      # unique id, assigned by the producer
    behav_version: int                            # oldest weight version that produced any of its tokens
    n_tokens: int                                 # response tokens (the prompt is not counted)
    finish_reason: str = "stop"                   # one of FINISH_REASONS
    prompt_ids: torch.Tensor | None = None        # [P] int64
    response_ids: torch.Tensor | None = None      # [L] int64, L == n_tokens
    behav_logp: torch.Tensor | None = None        # [L] float32, log π_β(y_t | s_t) at sampling time
    token_versions: torch.Tensor | None = None    # [L] int64, weight version that produced each token
    student_topk_ids: torch.Tensor | None = None  # [L, k] int64, the sampler's top-k, if captured
    student_topk_logp: torch.Tensor | None = None # [L, k] float32
    sample_ids: torch.Tensor | None = None        # [L, M] int64, M extra tokens drawn from π_β at each position (MC)
    sample_behav_logp: torch.Tensor | None = None # [L, M] float32, log π_β of those samples
    prompt_key: int = -1                          # which prompt (for grouping / verification); -1 = none
    admit_version: int | None = None              # version the scheduler admitted it at; None = behav_version

    def __post_init__(self):
        if self.n_tokens < 0:
            raise ValueError(f"Trajectory.n_tokens must be >= 0, got {self.n_tokens}")
        if self.behav_version < 0:
            raise ValueError(f"Trajectory.behav_version must be >= 0, got {self.behav_version}")
        if self.admit_version is None:
            self.admit_version = self.behav_version
        if not 0 <= self.admit_version <= self.behav_version:
            raise ValueError(f"Trajectory.admit_version must be in [0, behav_version={self.behav_version}], "
                             f"got {self.admit_version}")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Trajectory.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        for name in ("response_ids", "behav_logp", "token_versions", "student_topk_ids", "student_topk_logp",
                     "sample_ids", "sample_behav_logp"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != self.n_tokens:
                raise ValueError(f"Trajectory.{name} has {t.shape[0]} rows, n_tokens is {self.n_tokens}")
        if self.token_versions is not None and self.n_tokens > 0:
            oldest = int(self.token_versions.min())
            if oldest != self.behav_version:
                raise ValueError(f"Trajectory.behav_version={self.behav_version} but the oldest token version is {oldest}")

    @classmethod
    def from_tokens(cls, uid: int, prompt_ids, response_ids, behav_logp, token_versions,
                    finish_reason: str, **extra) -> Trajectory:
        """Build from per-token tensors; `behav_version` is derived as the oldest token version."""
        n = int(response_ids.shape[0])
        behav_version = int(token_versions.min()) if n > 0 else int(extra.pop("behav_version", 0))
        return cls(uid=uid, behav_version=behav_version, n_tokens=n, finish_reason=finish_reason,
                   prompt_ids=prompt_ids, response_ids=response_ids, behav_logp=behav_logp,
                   token_versions=token_versions, **extra)

    @classmethod
    def fake(cls, uid: int, n_tokens: int, behav_version: int, finish_reason: str = "stop") -> Trajectory:
        """A content-free trajectory: what the simulator moves through the scheduler."""
        return cls(uid=uid, behav_version=behav_version, n_tokens=n_tokens, finish_reason=finish_reason)

    @property
    def newest_version(self) -> int:
        """Newest weight version among its tokens (== behav_version unless updated in flight)."""
        if self.token_versions is None or self.n_tokens == 0:
            return self.behav_version
        return int(self.token_versions.max())


@dataclass
class Batch:
    """Trajectories the learner trains on in one step, at learner weight version `version`."""

    trajs: list[Trajectory]
    version: int                                  # learner version when this batch is trained
    n_dropped: int = 0                            # too-stale trajectories dropped while assembling it
    staleness: list[int] = field(init=False)      # version - behav_version, per trajectory

    def __post_init__(self):
        self.staleness = [self.version - t.behav_version for t in self.trajs]
        if any(s < 0 for s in self.staleness):
            raise ValueError(f"Batch at version {self.version} holds a trajectory from a future version")

    def __len__(self) -> int:
        return len(self.trajs)

    @property
    def n_tokens(self) -> int:
        return sum(t.n_tokens for t in self.trajs)


def scored_tokens(trajs: list[Trajectory]) -> int:
    """Positions a teacher forwards for these trajectories (prompt + response): the `tokens` of a trace event."""
    return sum(len(t.prompt_ids) + t.n_tokens for t in trajs)


TENSOR_FIELDS = ("prompt_ids", "response_ids", "behav_logp", "token_versions", "student_topk_ids",
                 "student_topk_logp", "sample_ids", "sample_behav_logp")
SCALAR_FIELDS = ("uid", "behav_version", "n_tokens", "finish_reason", "prompt_key", "admit_version")


def dump_trajectories(trajs: list[Trajectory]) -> bytes:
    """Trajectories as the bytes of one safetensors file: tensors named "<i>/<field>", scalars as JSON in the
    metadata. Nothing in it is executed on load (no pickle), so a run folder from elsewhere is safe to resume."""
    from safetensors.torch import save
    tensors = {f"{i}/{name}": getattr(t, name).contiguous() for i, t in enumerate(trajs)
               for name in TENSOR_FIELDS if getattr(t, name) is not None}
    meta = {"trajectories": json.dumps([{name: getattr(t, name) for name in SCALAR_FIELDS} for t in trajs])}
    return save(tensors, metadata=meta)


def load_trajectories(path) -> list[Trajectory]:
    """The trajectories in a file holding `dump_trajectories` bytes (each checked by Trajectory's own validation)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        scalars = json.loads(f.metadata()["trajectories"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return [Trajectory(**s, **{name: tensors.get(f"{i}/{name}") for name in TENSOR_FIELDS})
            for i, s in enumerate(scalars)]
