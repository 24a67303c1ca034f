"""The OPD loss from the student's final hidden states, with only [chunk, V] logits alive at a time.

The one idea: a learner never needs the [N, V] logits of a batch at once. It runs the causal LM to its final
hidden states h [N, H] at the response positions (after the final norm), then, `chunk_tokens` rows at a time,
the lm head z = h W^T [c, V] and what the estimator needs from z, each chunk under activation checkpointing
(`torch.utils.checkpoint`, non-reentrant): forward keeps only h and W, backward recomputes the chunk's logits,
so forward and backward each hold a few [chunk, V] tensors and never [N, V] float32 logits.

What is computed per chunk depends on the estimator, and both cases are exact:

    reverse_kl_sampled, and StableOPD's reference term: the per-token log π_θ(y_t) [N] is all they read (and,
        for VCPO's baseline, ‖e_y − p‖² [N], `logit_grad_sq`), so the chunks only produce those vectors and
        `asyncopd.objective.sampled_term` / `add_reference_penalty` then run on all N tokens at once. Their
        batch statistics (ESS, VCPO's ESS/N and baseline b*, M2PO's kept set) are those of the whole batch.
    forward_kl_topk, reverse_kl_topk, reverse_kl_mc: the loss is a mean over tokens of a per-token term, so
        each chunk runs the estimator itself (`asyncopd.objective.vocab_term` on the chunk's logits) and the
        chunk means are combined with weights n_c / N; their metrics are token means too and combine the same way.

Data parallel (`group` = the ranks that split the batch's trajectories): the returned loss has the *value* of
the whole batch's objective and the *gradient* of this rank's share of it, so that FSDP2's average over
ranks of world·∇loss is the gradient of the whole batch. The per-token vectors of the sampled estimator are
all-gathered (a few floats per token), other ranks' entries detached; the vocabulary estimators' chunk sums
and metrics are all-reduced. Every metric is therefore the whole batch's, ESS and M2PO included.

Measured (`python benchmarks/fsdp_head_memory.py`, CPU, N = 4096, V = 32768, forward_kl_topk k = 64): the
peak memory of one learner step falls from 1714 MiB with [N, V] logits to 849 MiB at chunk_tokens = 1024 and
192 MiB at 256 (about six [chunk, V] fp32 temporaries at the peak).

    out = model(ids, attn, where, lambda h, w: chunked_opd_loss(cfg, h, w, resp, cache, mask, behav_logp=b))
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from asyncopd.estimators import EstimatorOut, logit_grad_sq, token_logp
from asyncopd.objective import ObjectiveConfig, add_reference_penalty, sampled_term, vocab_term

DEFAULT_CHUNK_TOKENS = 1024   # rows of lm-head logits per chunk: 4·1024·V bytes per fp32 [chunk, V] temporary


class ChunkedHeadModel(nn.Module):
    """A Hugging Face causal LM run to its final hidden states at the response positions, then
    head_fn(hidden [N, H], lm-head weight [V, H]).

    FSDP2 shards this module as its root, so the head and the loss run inside the root's forward: the root's
    parameters (embeddings, final norm, the lm head, tied to the embedding in GPT-2 and small Qwen models) are
    unsharded there, and FSDP2 sees one forward per step. Models whose logits are not plain h W^T (a bias on
    the head, Gemma-2's logit soft-capping) are refused."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        head = lm.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"ChunkedHeadModel needs an lm head that is a bias-free nn.Linear, got {head}")
        if getattr(lm.config, "final_logit_softcapping", None):
            raise ValueError("ChunkedHeadModel: final_logit_softcapping is set; logits are not h W^T")
        self.lm = lm

    def forward(self, input_ids, attention_mask, where, head_fn):
        """input_ids, attention_mask [B, S]; where [N] flat indices into B·S (backends.toy_models.pack)."""
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head_fn(hidden.flatten(0, 1)[where], self.lm.get_output_embeddings().weight)   # [N, H], [V, H]


def _chunked(fn, hidden, *rows, chunk_tokens: int, consts=()):
    """[fn(hidden[s:e], *consts, *(r[s:e] for r in rows)) per chunk of rows], checkpointed when grad is on."""
    out = []
    for s in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[s:s + chunk_tokens], *consts, *(r[s:s + chunk_tokens] for r in rows))
        out.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return out


def _chunk_token_terms(h, weight, ids, *, with_grad_sq: bool):
    """One chunk's log π_θ(y) [c] fp32 (grad) and, for VCPO's baseline, ‖e_y − p‖² [c] (no grad), both by the
    core's functions on the chunk's [c, V] logits."""
    z, every, c = F.linear(h, weight), torch.ones_like(ids, dtype=torch.bool), max(h.shape[0], 1)   # [c, V]
    grad_sq = logit_grad_sq(z, ids, every, chunk_size=c) if with_grad_sq else None
    return token_logp(z, ids, every, chunk_size=c), grad_sq


def head_token_terms(hidden, weight, ids, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_grad_sq: bool = False):
    """log softmax(h W^T)[n, ids[n]] per token, [N] fp32, differentiable w.r.t. hidden [N, H] and weight [V, H];
    and ‖∇_z log softmax(z)_y‖² [N] (`logit_grad_sq`) when with_grad_sq, else None."""
    pieces = _chunked(partial(_chunk_token_terms, with_grad_sq=with_grad_sq), hidden, ids,
                      chunk_tokens=chunk_tokens, consts=(weight,))
    logp = torch.cat([p[0] for p in pieces])
    return logp, (torch.cat([p[1] for p in pieces]) if with_grad_sq else None)


def head_token_logp(hidden, weight, ids, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """log π(y_t) per token [N] from final hidden states: what the StableOPD reference contributes."""
    return head_token_terms(hidden, weight, ids, chunk_tokens=chunk_tokens)[0]


def _vocab_loss(cfg, hidden, weight, cache, mask, chunk_tokens):
    """A vocabulary estimator chunk by chunk: (Σ_c n_c·loss_c [0-dim, grad], {metric: Σ_c n_c·m_c}, Σ_c n_c),
    n_c = masked tokens of chunk c. `vocab_term` runs on each chunk's [c, V] logits (rows chunked again inside)."""
    keys = sorted(cache)

    def chunk_loss(h, w, m, *fields):
        out = vocab_term(cfg, F.linear(h, w), dict(zip(keys, fields)), m)
        return out.loss, out.metrics

    pieces = _chunked(chunk_loss, hidden, mask, *(cache[k] for k in keys), chunk_tokens=chunk_tokens,
                      consts=(weight,))
    n_c = [int(m.sum()) for m in mask.split(chunk_tokens)]
    total = sum(n * loss for n, (loss, _) in zip(n_c, pieces))
    sums = {k: sum(n * metrics[k] for n, (_, metrics) in zip(n_c, pieces)) for k in pieces[0][1]}
    return total, sums, sum(n_c)


def _all_tokens(columns: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """All ranks' [n_r, F] rows, concatenated in rank order, and this rank's first row in them."""
    n = torch.tensor([columns.shape[0]], device=columns.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    padded = columns.new_zeros(max(counts), columns.shape[1])
    padded[:columns.shape[0]] = columns
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[:rank])


def _per_token_inputs(theta, vectors: dict, mask, group):
    """theta [n] (grad) and named [n] vectors of the whole batch: all-gathered over `group`, with only this
    rank's theta carrying a gradient. Without a group the inputs themselves."""
    if group is None:
        return theta, vectors, mask
    names = list(vectors)
    cols = torch.stack([theta.detach(), *(vectors[k].float() for k in names), mask.float()], 1)   # [n, F]
    full, start = _all_tokens(cols, group)
    n = theta.shape[0]
    theta_all = torch.cat([full[:start, 0], theta.float(), full[start + n:, 0]])
    return theta_all, {k: full[:, 1 + i] for i, k in enumerate(names)}, full[:, -1] > 0.5


def chunked_opd_loss(cfg: ObjectiveConfig, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                     cache: dict[str, torch.Tensor], mask: torch.Tensor, *, behav_logp: torch.Tensor | None = None,
                     ref_logp: torch.Tensor | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                     group=None) -> EstimatorOut:
    """`asyncopd.objective.opd_loss` with the lm head applied chunk by chunk. hidden [N, H] final hidden states
    at the response positions (grad), weight [V, H] the lm head, ids [N], cache from `flat_inputs`, mask [N]
    bool, behav_logp [N], ref_logp [N] (needed iff ref_kl_coef > 0). Same loss, gradient and metrics as
    opd_loss on the logits h W^T, up to float rounding. With `group` (a process group whose ranks hold the
    rest of the batch's tokens) the value and metrics are the whole batch's and the gradient this rank's share."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    theta_all, vec, mask_all = None, {}, None
    needs_theta = cfg.estimator == "reverse_kl_sampled" or cfg.ref_kl_coef > 0
    if needs_theta:                                           # [n] log π_θ(y_t) (grad), [n] ‖e_y − p‖² or None
        theta, grad_sq = head_token_terms(hidden, weight, ids, chunk_tokens=chunk_tokens,
                                          with_grad_sq=cfg.baseline == "vcpo")
        vectors = {"teacher": cache["teacher_logp"], "behav": behav_logp, "ref": ref_logp, "grad_sq": grad_sq}
        theta_all, vec, mask_all = _per_token_inputs(theta, {k: v for k, v in vectors.items() if v is not None},
                                                     mask, group)
    if cfg.estimator == "reverse_kl_sampled":
        out = sampled_term(cfg, theta_all, vec["teacher"], mask_all, behav_logp=vec.get("behav"),
                           grad_sq=vec.get("grad_sq"))
    else:
        total, sums, n = _vocab_loss(cfg, hidden, weight, cache, mask, chunk_tokens)
        keys = sorted(sums)
        if group is None:
            loss = total / max(n, 1)
        else:                                                 # Σ over ranks of n·loss, n·metrics and n
            red = torch.tensor([total.item(), *(sums[k] for k in keys), n], dtype=torch.float64,
                               device=hidden.device)
            dist.all_reduce(red, group=group)
            whole, sums, n = red[0].item(), dict(zip(keys, red[1:-1].tolist())), max(red[-1].item(), 1)
            loss = total / n
            loss = loss + (whole / n - loss.detach())         # value: the whole batch; gradient: this rank's share
        out = EstimatorOut(loss, {k: sums[k] / max(n, 1) for k in keys})
    return add_reference_penalty(cfg, out, theta_all, vec.get("ref"), mask_all)
