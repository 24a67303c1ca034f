"""ToyTeacher: scores rollouts with a tiny HF GPT-2 teacher into `TeacherScores` cache entries.

One batched forward per `batch_size` trajectories over prompt + response (right-padded, with an attention
mask: right padding leaves every real token's position and causal context unchanged), log_softmax at
temperature 1, then per response token: the teacher log-prob of the sampled token, the teacher's top-`topk`
ids and log-probs with the tail mass 1 − Σ exp(topk_logp), and, when `n_samples > 0`, the teacher log-probs of
the first `n_samples` of the trajectory's captured samples (drawn by the rollout engine from π_β, whose
log-probs are copied into `sampler_logp` for importance weighting). Only the response positions' [N, V]
log-probs of one batch exist at a time, fine at a toy vocabulary; a large-vocabulary teacher would chunk them.

    teacher = ToyTeacher(model, batch_size=64, version=0)
    scores = teacher.score(trajs, topk=8, n_samples=4)
"""

from __future__ import annotations

import copy

import torch

from asyncopd.cache import TeacherScores, check_scorable
from asyncopd.rollout import Trajectory
from backends.toy_models import response_logits


def scored_tokens(trajs: list[Trajectory]) -> int:
    """Positions a teacher forwards for these trajectories (prompt + response): the `tokens` of a trace event."""
    return sum(len(t.prompt_ids) + t.n_tokens for t in trajs)


class ToyTeacher:
    def __init__(self, model, *, batch_size: int = 64, version: int = 0, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)  # frozen: our own copy
        self.batch_size, self.version = batch_size, version
        self.vocab_size = model.config.vocab_size

    @torch.inference_mode()
    def score(self, trajs: list[Trajectory], *, topk: int, n_samples: int) -> list[TeacherScores]:
        """Teacher log-probs for every response token of every trajectory, in the order given."""
        check_scorable(trajs, topk, n_samples, max_topk=self.vocab_size)
        out = []
        for i in range(0, len(trajs), self.batch_size):
            out += self._score_batch(trajs[i:i + self.batch_size], topk, n_samples)
        return out

    def _score_batch(self, trajs: list[Trajectory], k: int, M: int) -> list[TeacherScores]:
        logits = response_logits(self.model, trajs, pad_id=0)            # [N, V]; padding is masked out
        logp_all = torch.log_softmax(logits.float(), -1).cpu()
        out = []
        for t, logp in zip(trajs, logp_all.split([t.n_tokens for t in trajs])):  # [L, V]: row j predicts token j
            fields = dict(sampled_logp=logp.gather(1, t.response_ids[:, None]).squeeze(1))
            if k:
                top = logp.topk(k, -1)
                fields.update(topk_ids=top.indices, topk_logp=top.values,
                              tail_mass=(1 - top.values.double().exp().sum(-1)).clamp_min(0).float())
            if M:
                sample_ids = t.sample_ids[:, :M].clone()
                fields.update(sample_ids=sample_ids, sample_logp=logp.gather(1, sample_ids),
                              sampler_logp=t.sample_behav_logp[:, :M].float().clone())
            out.append(TeacherScores(**fields, teacher_version=self.version))
        return out
