"""The three backend roles as `typing.Protocol`s: any object with these methods plugs in.

Drivers (the toy backend, the vLLM + FSDP2 backend, test doubles) implement them without inheriting from
anything. Each protocol has at most three methods; a fourth means the boundary is in the wrong place.
"""

from __future__ import annotations

from typing import Protocol

import torch

from asyncopd.cache import TeacherScores
from asyncopd.rollout import Batch, Trajectory


class RolloutEngine(Protocol):
    def generate(self, prompts: list[torch.Tensor], uids: list[int]) -> list[Trajectory]:
        """Sample one response per prompt with the currently loaded weights (behaviour log-probs and
        per-token weight versions filled in)."""

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the sampling weights; tokens sampled afterwards carry `version`."""


class Teacher(Protocol):
    def score(self, trajs: list[Trajectory], *, topk: int, n_samples: int) -> list[TeacherScores]:
        """Teacher log-probs for every response token: sampled token, top-`topk`, `n_samples` MC samples."""


class Learner(Protocol):
    def step(self, batch: Batch, scores: list[TeacherScores]) -> dict[str, float]:
        """One optimiser step on `batch`; returns metrics (at least `loss` and `kl`)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The student's current weights, to publish to rollout engines."""
