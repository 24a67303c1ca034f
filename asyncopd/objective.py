"""The OPD objective as configuration: which estimator, on which teacher-cache fields, with which stabilisers.

Every learner computes what the objective reads from the student on the response tokens of a batch, flattened
along the token axis, with the batch's cache fields flattened the same way (`flat_inputs`). What the teacher
must put in the cache for a given objective is `cache_layout(cfg)`. The objective is three pieces, each
dispatched on the config once, here, so both backends train on exactly the same loss for the same config:

    sampled_term           reverse_kl_sampled from per-token vectors [N]: log π_θ(y_t), teacher logp, ...
    vocab_term             the vocabulary estimators from student logits [N, V] and the cache
    add_reference_penalty  StableOPD's ref_kl_coef · KL(π_θ‖π_ref) on the sampled tokens

`opd_loss` composes them on full [N, V] logits (the toy learner); the FSDP2 learner composes the same three
with the lm head applied chunk by chunk (`backends.vllm_fsdp.chunked_head.chunked_opd_loss`).

    estimator            uses from the cache                         direction
    forward_kl_topk      teacher top-k ids + logp (+ tail mass)      KL(π_T‖π_θ), robust to stale rollouts
    reverse_kl_topk      teacher top-k ids + logp as the support     KL(π_θ‖π_T) on the teacher's support
    reverse_kl_sampled   teacher logp of the sampled token           KL(π_θ‖π_T), 1-sample policy gradient
    reverse_kl_mc        teacher logp of M sampler draws             KL(π_θ‖π_T), M-sample MC

StableOPD's divergence constraint adds ref_kl_coef · KL(π_θ‖π_ref) on the sampled tokens (k3 estimator), with
π_ref the initial student. VCPO's minimum-variance baseline (baseline="vcpo", reverse_kl_sampled only) weights
each token by ‖e_y − p‖², the squared score norm at the logits (`logit_grad_sq`), in place of the paper's
per-sample parameter-gradient norm; VCPO's other half, the ESS-scaled learning rate, is the learner's
(ToyConfig.vcpo_lr), since it changes the step, not the loss.

`ObjectiveConfig` and `TRAINABLE` live in asyncopd/config.py (torch-free, so a run validates its config before
importing torch) and are re-exported here.
"""

from __future__ import annotations

import torch

from asyncopd.cache import TeacherScores
from asyncopd.config import TRAINABLE, ObjectiveConfig, chunk_rows   # torch-free there; ObjectiveConfig importable here too
from asyncopd.estimators import (EstimatorOut, forward_kl_topk, logit_grad_sq, reference_kl_penalty, reverse_kl_mc,
                                 reverse_kl_sampled, reverse_kl_topk, token_logp)


def cache_layout(cfg: ObjectiveConfig) -> tuple[int, int]:
    """(topk, n_samples) the teacher must score for this objective; the sampled-token logp is always kept."""
    topk = cfg.topk if cfg.estimator in ("forward_kl_topk", "reverse_kl_topk") else 0
    n_samples = cfg.n_samples if cfg.estimator == "reverse_kl_mc" else 0
    return topk, n_samples


def flat_inputs(scores: list[TeacherScores]) -> dict[str, torch.Tensor]:
    """Concatenate per-trajectory cache entries along the token axis, in batch order: [N], [N, k], [N, M]."""
    out = {"teacher_logp": torch.cat([s.sampled_logp for s in scores])}
    for name in ("topk_ids", "topk_logp", "sample_ids", "sample_logp", "sampler_logp"):
        if all(getattr(s, name) is not None for s in scores):
            out[name] = torch.cat([getattr(s, name) for s in scores])
    return out


def sampled_term(cfg: ObjectiveConfig, theta: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, *,
                 behav_logp: torch.Tensor | None = None, grad_sq: torch.Tensor | None = None) -> EstimatorOut:
    """reverse_kl_sampled with the config's signal and stabilisers, on per-token vectors of the whole batch:
    theta [N] = log π_θ(y_t) (grad), teacher_logp [N], mask [N] bool, behav_logp [N] (rollout-time log π_β),
    grad_sq [N] = ‖e_y − p‖² (`logit_grad_sq`, needed iff baseline="vcpo"). Batch statistics (ESS, VCPO's
    b*, M2PO's kept set) are over these N tokens, so a caller passes all of them at once."""
    return reverse_kl_sampled(theta, teacher_logp, mask, behav_logp=behav_logp, signal=cfg.signal,
                              correction=cfg.correction, is_cap=cfg.is_cap, clip_eps=cfg.clip_eps,
                              m2po_tau=cfg.m2po_tau, baseline=cfg.baseline, grad_sq=grad_sq)


def vocab_term(cfg: ObjectiveConfig, student_logits: torch.Tensor, cache: dict[str, torch.Tensor],
               mask: torch.Tensor) -> EstimatorOut:
    """A vocabulary estimator (forward_kl_topk, reverse_kl_topk, reverse_kl_mc) on student_logits [N, V] (grad),
    cache from `flat_inputs`, mask [N] bool. The loss and metrics are masked token means of a per-token term,
    so a caller may run it on row chunks and combine the chunks with weights n_c / N."""
    c = chunk_rows(student_logits.shape[-1], cfg.chunk_bytes)
    if cfg.estimator == "forward_kl_topk":
        return forward_kl_topk(student_logits, cache["topk_ids"], cache["topk_logp"], mask, tail=cfg.tail,
                               chunk_size=c)
    if cfg.estimator == "reverse_kl_topk":
        return reverse_kl_topk(student_logits, cache["topk_ids"], cache["topk_logp"], mask, tail=cfg.tail,
                               chunk_size=c)
    if cfg.estimator == "reverse_kl_mc":
        return reverse_kl_mc(student_logits, cache["sample_ids"], cache["sample_logp"], mask,
                             sample_logp=cache.get("sampler_logp"), self_normalize=cfg.self_normalize, chunk_size=c)
    raise ValueError(f"vocab_term: {cfg.estimator!r} is not a vocabulary estimator (see sampled_term)")


def add_reference_penalty(cfg: ObjectiveConfig, out: EstimatorOut, theta: torch.Tensor | None,
                          ref_logp: torch.Tensor | None, mask: torch.Tensor | None) -> EstimatorOut:
    """StableOPD: out.loss + ref_kl_coef · mean k3(log π_ref − log π_θ) on the sampled tokens
    (`reference_kl_penalty`), theta [N] = log π_θ(y_t) (grad), ref_logp [N], mask [N] bool; the metrics gain
    `ref_kl`. With ref_kl_coef = 0, `out` itself (theta, ref_logp and mask are not read)."""
    if cfg.ref_kl_coef == 0:
        return out
    if ref_logp is None:
        raise ValueError("ObjectiveConfig.ref_kl_coef > 0 needs ref_logp, the reference model's log-prob of each "
                         "token")
    ref = reference_kl_penalty(theta, ref_logp, mask)
    return EstimatorOut(out.loss + cfg.ref_kl_coef * ref.loss, {**out.metrics, "ref_kl": ref.metrics["kl"]})


def opd_loss(cfg: ObjectiveConfig, student_logits: torch.Tensor, response_ids: torch.Tensor,
             cache: dict[str, torch.Tensor], mask: torch.Tensor, *, behav_logp: torch.Tensor | None = None,
             ref_logp: torch.Tensor | None = None) -> EstimatorOut:
    """The configured objective on flattened inputs: student_logits [N, V] (grad), response_ids [N],
    cache from `flat_inputs`, mask [N] bool, behav_logp [N] (rollout-time log π_β), ref_logp [N] (reference
    model on the sampled tokens; needed iff ref_kl_coef > 0). Returns the loss and the estimator's metrics,
    plus `ref_kl` with the reference term: sampled_term or vocab_term, then add_reference_penalty."""
    c = chunk_rows(student_logits.shape[-1], cfg.chunk_bytes)
    needs_theta = cfg.estimator == "reverse_kl_sampled" or cfg.ref_kl_coef > 0
    theta = token_logp(student_logits, response_ids, mask, chunk_size=c) if needs_theta else None  # [N]
    if cfg.estimator == "reverse_kl_sampled":
        grad_sq = logit_grad_sq(student_logits, response_ids, mask, chunk_size=c) if cfg.baseline == "vcpo" else None
        out = sampled_term(cfg, theta, cache["teacher_logp"], mask, behav_logp=behav_logp, grad_sq=grad_sq)
    else:
        out = vocab_term(cfg, student_logits, cache, mask)
    return add_reference_penalty(cfg, out, theta, ref_logp, mask)
