"""The backend roles as `typing.Protocol`s: any object with these methods plugs in. The run loops are annotated
with them (backends/lockstep.py, replay.py, engine_pump.py, toy_concurrent.py), so each protocol lists exactly
what some loop calls.

Drivers (the toy backend, the vLLM + FSDP2 backend, test doubles) implement them without inheriting from
anything. `RolloutEngine` is what the one-process loops use (a batch at once); `StreamingEngine` is what a
rollout worker pumps continuously (backends/engine_pump.py): requests come and go between steps and weights
change between steps, so every token carries the version in force when it was sampled.
"""

from __future__ import annotations

from typing import Protocol

import torch

from asyncopd.cache import TeacherScores
from asyncopd.rollout import Batch, Trajectory


class RolloutEngine(Protocol):
    version: int                         # weight version of the loaded weights

    def generate(self, prompts: list[torch.Tensor], uids: list[int]) -> list[Trajectory]:
        """Sample one response per prompt with the currently loaded weights (behaviour log-probs and
        per-token weight versions filled in)."""

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the sampling weights; tokens sampled afterwards carry `version`."""


class EngineCounters(Protocol):
    tokens: int                          # response tokens sampled so far
    prefill_tokens: int                  # prompt tokens prefilled so far


class StreamingEngine(Protocol):
    version: int                         # weight version of the loaded weights
    stats: EngineCounters                # read around each step for the decode_iter trace event

    @property
    def n_unfinished(self) -> int:
        """Requests added and not yet returned by `step`."""

    def add(self, prompt_ids: torch.Tensor, uid: int) -> None:
        """Queue one request; the engine starts it at a later `step`."""

    def step(self) -> list[Trajectory]:
        """One engine iteration; returns the trajectories it finished (per-token versions filled in)."""

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the sampling weights between steps; running sequences continue on them."""


class Teacher(Protocol):
    def score(self, trajs: list[Trajectory], *, topk: int, n_samples: int) -> list[TeacherScores]:
        """Teacher log-probs for every response token: sampled token, top-`topk`, `n_samples` MC samples."""


class Learner(Protocol):
    def step(self, batch: Batch, scores: list[TeacherScores]) -> dict[str, float]:
        """One optimiser step on `batch`; returns metrics (at least `loss` and `kl`)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The student's current weights, to publish to rollout engines."""

    def save_checkpoint(self, root, *, version: int, ring: dict, state: dict, extra: dict | None = None):
        """Weights, optimiser state, the ring of past versions and the run's JSON `state` under `root`."""

    def resume_checkpoint(self, root, *, digest: str):
        """Restore the latest checkpoint under `root` of config `digest`: (path, ring, state), or None."""
