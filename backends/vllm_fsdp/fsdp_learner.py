"""FSDP2 learner: the toy learner's objective, data parallel over ranks, bf16 compute on fp32 master weights,
and an lm head evaluated in chunks of tokens. Its optimiser step (clipping, the finite check, VCPO's learning
rate), AdamW and the StableOPD reference are backends/optim.py's, as the toy learner's are.

The one idea: rank r of W trains on trajectories r, r+W, r+2W, … of the batch, and FSDP2
(`torch.distributed.fsdp.fully_shard`, each decoder block, then the root) shards the parameters and averages
the gradients over ranks. The objective is a mean over the batch's N response tokens; each rank's loss has the
value of the whole batch and the gradient of its own tokens' share (`chunked_head.chunked_opd_loss`), so it
back-propagates W·loss and the ranks' average gradient is exactly the gradient of the global token mean.

    mixed_precision="bf16"  FSDP2 `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the sharded
                            parameters (what AdamW updates, with its moments) stay fp32; each forward/backward
                            all-gathers a bf16 copy and computes in bf16; gradients are reduce-scattered in
                            fp32 onto the fp32 shards. Estimators upcast each [chunk, V] logit block to fp32.
    mixed_precision="fp32"  everything fp32 (the parity reference).

Logits: the root module is a `ChunkedHeadModel` whose forward stops at the final hidden states and applies
the lm head `head_chunk_tokens` rows at a time under activation checkpointing: no [N, V] float32 logits exist,
in forward or backward (see chunked_head.py).

Batch statistics under data parallelism are global, not per rank: the sampled reverse KL runs on the
all-gathered per-token log-probs of the whole batch, so ESS, VCPO's learning-rate scale ESS/N (`vcpo_lr`)
and M2PO's second-moment mask are those of one process training the whole batch; the vocabulary estimators'
metrics (their ess_frac too) are all-reduced token means. Every rank reports the same metrics.

Outside a process group the learner trains the whole batch in this process on the unsharded model (fp32
only): the chunked-head path without FSDP, which the parity tests compare with the toy learner. Checkpoints:
fsdp_checkpoint.py. Tests: tests/test_fsdp_learner.py.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from asyncopd.cache import TeacherScores
from asyncopd.objective import ObjectiveConfig, flat_inputs
from asyncopd.rollout import Batch
from backends import optim
from backends.toy_models import pack
from backends.vllm_fsdp import fsdp_checkpoint
from backends.vllm_fsdp.chunked_head import DEFAULT_CHUNK_TOKENS, ChunkedHeadModel, chunked_opd_loss, head_token_logp
from backends.vllm_fsdp.config import MIXED_PRECISION   # torch-free there, so RealConfig checks it early


def decoder_blocks(lm: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face causal LM: GPT-2's `h`, Llama/Qwen/Mistral's `layers`."""
    for name in ("h", "layers"):
        blocks = getattr(lm.base_model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"{type(lm).__name__}: no decoder blocks found (base_model.h or base_model.layers)")


def shard(model: ChunkedHeadModel, *, mesh=None, mixed_precision: str = "fp32") -> ChunkedHeadModel:
    """fully_shard every decoder block, then the root (the pattern FSDP2 recommends), with one precision policy."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    for block in decoder_blocks(model.lm):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


class FSDPLearner:
    """The objective and optimiser of the toy learner on an FSDP2-sharded `ChunkedHeadModel(model)`. Give it the
    plain Hugging Face model: the learner wraps and shards it (and the StableOPD reference) itself when a process
    group is initialised, with `mesh` (default: all ranks). lr, weight_decay, grad_clip, vcpo_lr and betas mean
    what they mean to ToyLearner."""

    def __init__(self, model, objective: ObjectiveConfig, *, lr: float, pad_id: int, mixed_precision: str = "fp32",
                 head_chunk_tokens: int = DEFAULT_CHUNK_TOKENS, mesh=None, weight_decay: float = 0.0,
                 grad_clip: float = 1.0, vcpo_lr: bool = False, betas=(0.9, 0.999),
                 lr_warmup_steps: int = 0):
        optim.check_hyperparameters("FSDPLearner", lr=lr, grad_clip=grad_clip, weight_decay=weight_decay,
                                  warmup_steps=lr_warmup_steps)
        self.lr_warmup_steps = lr_warmup_steps
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"FSDPLearner.mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        if head_chunk_tokens < 1:
            raise ValueError(f"FSDPLearner.head_chunk_tokens must be >= 1, got {head_chunk_tokens}")
        self.sharded = dist.is_available() and dist.is_initialized()
        if mixed_precision == "bf16" and not self.sharded:
            raise ValueError("FSDPLearner.mixed_precision='bf16' needs an initialised process group: the bf16 "
                             "compute copy is FSDP2's MixedPrecisionPolicy")
        self.model, self.objective, self.pad_id = ChunkedHeadModel(model).train(), objective, pad_id
        self.lr, self.grad_clip, self.vcpo_lr = lr, grad_clip, vcpo_lr
        self.mixed_precision, self.head_chunk_tokens = mixed_precision, head_chunk_tokens
        self.reference = optim.frozen_reference(self.model, objective)   # StableOPD: the initial student, frozen
        if self.sharded:
            for m in (self.model, self.reference):
                if m is not None:
                    shard(m, mesh=mesh, mixed_precision=mixed_precision)
        # after sharding: FSDP2 replaced every parameter by its shard, which AdamW updates
        self.optimizer = optim.adamw(self.model, lr=lr, betas=betas, weight_decay=weight_decay)

    def step(self, batch: Batch, scores: list[TeacherScores]) -> dict[str, float]:
        if len(scores) != len(batch.trajs):
            raise ValueError(f"{len(scores)} teacher scores for {len(batch.trajs)} trajectories")
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.sharded else (0, 1)
        if len(batch) < world:
            raise ValueError(f"a batch of {len(batch)} trajectories cannot feed {world} ranks")
        mine = range(rank, len(batch.trajs), world)
        out, _ = self.loss([batch.trajs[i] for i in mine], [scores[i] for i in mine])
        self.optimizer.zero_grad(set_to_none=True)
        (out.loss * world).backward()                        # FSDP2 averages the ranks' gradients
        n_total = sum(t.n_tokens for t in batch.trajs)
        return optim.apply_gradients(self.model, self.optimizer, out.loss.detach(), out.metrics, lr=self.lr,
                                     grad_clip=self.grad_clip, vcpo_lr=self.vcpo_lr, version=batch.version,
                                     n_tokens=n_total)

    def loss(self, trajs: list, scores: list[TeacherScores]):
        """(EstimatorOut of the whole batch, this rank's response tokens) for this rank's trajectories."""
        device = next(self.model.parameters()).device
        ids, attn, where = (t.to(device) for t in pack(trajs, self.pad_id))
        response_ids = torch.cat([t.response_ids for t in trajs]).to(device)        # [n]
        behav_logp = torch.cat([t.behav_logp for t in trajs]).to(device)            # [n]
        cache = {k: v.to(device) for k, v in flat_inputs(scores).items()}
        mask = torch.ones(len(response_ids), dtype=torch.bool, device=device)
        c = self.head_chunk_tokens
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = self.reference(ids, attn, where, partial(head_token_logp, ids=response_ids, chunk_tokens=c))
            if self.sharded:
                self.reference.reshard()                     # FSDP2 keeps a root unsharded after forward
        group = dist.group.WORLD if self.sharded else None
        head_fn = partial(chunked_opd_loss, self.objective, ids=response_ids, cache=cache, mask=mask,
                          behav_logp=behav_logp, ref_logp=ref_logp, chunk_tokens=c, group=group)
        return self.model(ids, attn, where, head_fn), len(response_ids)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) fp32 weights under the model's own names, on every rank, to publish or checkpoint."""
        return optim.full_state_dict(self.model.lm)

    def save_checkpoint(self, root, *, version: int, ring: dict, state: dict, extra: dict | None = None):
        """Collective: full fp32 weights and AdamW state, written by rank 0 in the toy layout (fsdp_checkpoint.py)."""
        return fsdp_checkpoint.save(root, self.model.lm, self.optimizer, version=version, state=state, ring=ring,
                                    extra=extra)

    def resume_checkpoint(self, root, *, digest: str):
        """Collective: restore the latest checkpoint under `root` of config `digest`: (path, ring, state) or None."""
        return fsdp_checkpoint.resume(root, self.model.lm, self.optimizer, digest=digest)
