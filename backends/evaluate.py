"""Held-out evaluation of the student, the same yardstick for every backend and execution mode.

The sort task's held-out prompts (seed HELDOUT_SEED) are answered greedily by the current student for exact-match
accuracy, and 256 of them are sampled at T = 1 to measure the exact forward and reverse KL per token to the
teacher over the full (toy-sized) vocabulary. Generation uses the toy KV-cache engine on the Hugging Face GPT-2
student, so a vLLM run's student is evaluated by exactly the same code as a toy run's.
"""

from __future__ import annotations

import numpy as np
import torch

from asyncopd.estimators import forward_kl_exact, reverse_kl_exact
from backends.toy_engine import ToyRolloutEngine
from backends.toy_models import response_logits
from backends.toy_task import HELDOUT_SEED, SortTask


class Evaluator:
    """Held-out metrics of the current student: greedy exact-match accuracy, and the exact forward and reverse
    KL to the teacher per token on responses sampled from the student at T = 1 (full V-way distributions:
    the toy vocabulary is small), so every estimator is judged by the same yardstick."""

    def __init__(self, task: SortTask, student, teacher, *, n_prompts: int, seed: int, device):
        self.task, self.teacher = task, teacher
        self.prompts = task.make_prompts(n_prompts, HELDOUT_SEED)
        self.greedy = ToyRolloutEngine(student, max_batch=256, max_new_tokens=task.max_response_len,
                                       temperature=0.0, eos_id=task.eos_id, device=device)
        self.sampler = ToyRolloutEngine(student, max_batch=256, max_new_tokens=task.max_response_len,
                                        eos_id=task.eos_id, seed=seed + 7919, device=device)

    @classmethod
    def of_run(cls, cfg, task: SortTask, student, teacher, device) -> Evaluator:
        """The run's evaluator: `toy.eval_prompts` held-out prompts, sampling seeded by the run's seed."""
        return cls(task, student, teacher, n_prompts=cfg.toy.eval_prompts, seed=cfg.seed, device=device)

    @torch.no_grad()
    def __call__(self, student, weights, version: int) -> dict[str, float]:
        uids = list(range(len(self.prompts)))
        self.greedy.load_weights(weights, version)
        greedy = self.greedy.generate(self.prompts, uids)
        self.sampler.load_weights(weights, version)
        sampled = self.sampler.generate(self.prompts[:256], uids[:256])
        s_logits = response_logits(student, sampled, self.task.pad_id)
        t_logits = response_logits(self.teacher, sampled, self.task.pad_id)
        mask = torch.ones(len(s_logits), dtype=torch.bool, device=s_logits.device)
        return {"accuracy": float(np.mean([self.task.verify(p, t.response_ids) for p, t in zip(self.prompts, greedy)])),
                "eval_reverse_kl": reverse_kl_exact(s_logits, t_logits, mask).loss.item(),
                "eval_forward_kl": forward_kl_exact(s_logits, t_logits, mask).loss.item(),
                "eval_response_len": float(np.mean([t.n_tokens for t in greedy]))}
