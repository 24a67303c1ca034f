"""ToyLearner: one AdamW step of on-policy distillation on a tiny HF GPT-2 student.

The learner packs a batch's prompt + response sequences (right-padded), runs the student, flattens the logits
of the response tokens to [N, V] in batch order, and hands them with the teacher cache to
`asyncopd.objective.opd_loss`: the estimator is chosen by name in the config, the maths lives in the core.
Stabilisers: gradient-norm clipping, the corrections inside the estimator, VCPO's ESS-scaled learning rate
(lr_t = lr · ESS/N, from the estimator's `ess_frac`), and StableOPD's divergence to a frozen copy of the
initial student (`ref_kl_coef`). A non-finite loss or gradient raises `FloatingPointError` *before* the
optimiser touches the weights, so the caller's last checkpoint stays the last good state. The optimiser step,
the reference and the weights it publishes are backends/optim.py's, shared with the FSDP2 learner.
"""

from __future__ import annotations

import torch

from asyncopd.cache import TeacherScores
from asyncopd.objective import ObjectiveConfig, flat_inputs, opd_loss
from asyncopd.rollout import Batch
from backends import checkpoint, optim
from backends.toy_models import response_logits


class ToyLearner:
    forward_chunks = 4                   # student forwards per step (length-sorted groups: less padding)

    def __init__(self, model, objective: ObjectiveConfig, *, lr: float, pad_id: int, weight_decay: float = 0.0,
                 grad_clip: float = 1.0, vcpo_lr: bool = False, betas=(0.9, 0.999),
                 lr_warmup_steps: int = 0):
        optim.check_hyperparameters("ToyLearner", lr=lr, grad_clip=grad_clip, weight_decay=weight_decay,
                                  warmup_steps=lr_warmup_steps)
        self.lr_warmup_steps = lr_warmup_steps
        self.model, self.objective, self.pad_id = model.train(), objective, pad_id
        self.lr, self.grad_clip, self.vcpo_lr = lr, grad_clip, vcpo_lr
        self.optimizer = optim.adamw(model, lr=lr, betas=betas, weight_decay=weight_decay)
        self.reference = optim.frozen_reference(model, objective)     # StableOPD: the initial student, frozen

    def step(self, batch: Batch, scores: list[TeacherScores]) -> dict[str, float]:
        if len(scores) != len(batch.trajs):
            raise ValueError(f"{len(scores)} teacher scores for {len(batch.trajs)} trajectories")
        out, n_tokens = self.loss(batch.trajs, scores)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        return optim.apply_gradients(self.model, self.optimizer, out.loss, out.metrics, lr=self.lr,
                                     grad_clip=self.grad_clip, vcpo_lr=self.vcpo_lr, version=batch.version,
                                     n_tokens=n_tokens, warmup_steps=self.lr_warmup_steps)

    def loss(self, trajs: list, scores: list[TeacherScores]):
        """(EstimatorOut, response tokens) of the configured objective on these trajectories."""
        device = next(self.model.parameters()).device
        logits = response_logits(self.model, trajs, self.pad_id, self.forward_chunks)  # [N, V]
        ids = torch.cat([t.response_ids for t in trajs]).to(device)                  # [N]
        behav_logp = torch.cat([t.behav_logp for t in trajs]).to(device)            # [N]
        cache = {k: v.to(device) for k, v in flat_inputs(scores).items()}
        mask = torch.ones(len(ids), dtype=torch.bool, device=device)
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = response_logits(self.reference, trajs, self.pad_id).log_softmax(-1)
                ref_logp = ref_logp.gather(1, ids[:, None]).squeeze(1)
        return opd_loss(self.objective, logits, ids, cache, mask, behav_logp=behav_logp, ref_logp=ref_logp), len(ids)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The student's weights (detached clones), to publish to rollout engines or keep in the ring."""
        return optim.full_state_dict(self.model)

    def save_checkpoint(self, root, *, version: int, ring: dict, state: dict, extra: dict | None = None):
        """Weights, optimiser state, `ring` and `state` as checkpoint `version` under `root` (backends/checkpoint.py)."""
        return checkpoint.save(root, version=version, model=self.model, optimizer=self.optimizer, ring=ring,
                               state=state, extra=extra)

    def resume_checkpoint(self, root, *, digest: str):
        """Restore the latest checkpoint under `root` written by config `digest`: (path, ring, state) or None."""
        return checkpoint.resume(root, digest=digest, model=self.model, optimizer=self.optimizer)
