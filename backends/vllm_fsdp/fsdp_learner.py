"""FSDP2 learner: the toy learner's objective, data parallel over ranks with parameters sharded by FSDP2.

The one idea: rank r of W trains on trajectories r, r+W, r+2W, … of the batch and FSDP2
(`torch.distributed.fsdp.fully_shard`, each transformer block, then the root) shards the parameters and averages
the gradients over ranks. The objective is a mean over the batch's N response tokens; rank r holds n_r of
them, so it back-propagates W·(n_r/N)·loss_r: the ranks' average gradient is then exactly the gradient of the
global token mean, Σ_r (n_r/N)·∇loss_r. The reported loss is Σ_r (n_r/N)·loss_r (an all-reduce).

Parity (tests/test_fsdp_learner.py): two gloo ranks on CPU match one process to float32 round-off in loss and
gradients for token-mean estimators. Estimators with batch-level statistics (ESS, M2PO's second moment, VCPO's
learning rate) see only their rank's tokens: not yet handled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from asyncopd.cache import TeacherScores
from asyncopd.rollout import Batch
from backends.toy_learner import ToyLearner


def shard_gpt2(model, mesh=None):
    """fully_shard every transformer block, then the root (the pattern FSDP2 recommends)."""
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class FSDPLearner(ToyLearner):
    """ToyLearner on an FSDP2-sharded model; call inside an initialised process group. The model must be
    sharded (shard_gpt2) before the learner builds its optimiser."""

    forward_chunks = 1                   # every rank must run the same number of forwards: each is a collective

    def step(self, batch: Batch, scores: list[TeacherScores]) -> dict[str, float]:
        if len(scores) != len(batch.trajs):
            raise ValueError(f"{len(scores)} teacher scores for {len(batch.trajs)} trajectories")
        rank, world = dist.get_rank(), dist.get_world_size()
        if len(batch) < world:
            raise ValueError(f"a batch of {len(batch)} trajectories cannot feed {world} ranks")
        mine = list(range(rank, len(batch.trajs), world))
        n_total = sum(t.n_tokens for t in batch.trajs)
        out, n_local = self.loss([batch.trajs[i] for i in mine], [scores[i] for i in mine])
        share = n_local / n_total
        self.optimizer.zero_grad(set_to_none=True)
        (out.loss * share * world).backward()
        loss = (out.loss * share).detach().clone()
        dist.all_reduce(loss)
        return self.apply_gradients(loss, out.metrics, batch.version, n_total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights on every rank, to publish or checkpoint."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in self.model.state_dict().items()}
