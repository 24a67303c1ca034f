"""StableOPD terms: monitors for length inflation, and the divergence constraint to the reference.

On-policy distillation can fall into *truncation collapse* (Luo et al. 2026, "Demystifying OPD: Length
Inflation and Stabilization Strategies for Large Language Models", arXiv 2604.08527; StableOPD): rollouts
abruptly lengthen, truncated and repetitive trajectories dominate the batch, and validation collapses.
The two monitors here (`truncation_rate`, `ngram_repetition`) detect it; `reference_kl_penalty` is the
reference-based divergence constraint StableOPD adds to the distillation loss, with the reference being
the initial student. Rollout mixture distillation (mixing non-student rollouts into the batch) is a data
choice made by the run loop, not a loss term, so it has no function here.

    loss = reverse_kl_sampled(...).loss + ref_coef * reference_kl_penalty(student_logp, ref_logp, mask).loss
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from asyncopd.estimators.kl import (LOG_RATIO_GUARD, EstimatorOut, _masked_mean,
                                   reverse_kl_exact)


def truncation_rate(finish_reasons: Sequence[str] | torch.Tensor) -> float:
    """Fraction of responses cut at the maximum length. 0.0 for an empty batch.

    Accepts the `Trajectory.finish_reason` strings ("length" = truncated, "stop" = ended by the stop token;
    any other string raises ValueError) or a bool tensor (True = truncated). StableOPD's first symptom of
    truncation collapse is this rate jumping towards 1 within a few steps."""
    if isinstance(finish_reasons, torch.Tensor):
        if finish_reasons.dtype != torch.bool:
            raise ValueError(f"truncation_rate: a tensor must be bool (True = truncated), got {finish_reasons.dtype}")
        n = finish_reasons.numel()
        return float(finish_reasons.sum()) / n if n else 0.0
    bad = {r for r in finish_reasons} - {"stop", "length"}
    if bad:
        raise ValueError(f"truncation_rate: finish reasons must be 'stop' or 'length', got {sorted(bad)}")
    n = len(finish_reasons)
    return sum(r == "length" for r in finish_reasons) / n if n else 0.0


def ngram_repetition(ids: Sequence[int] | torch.Tensor, n: int = 4) -> float:
    """Fraction of the n-grams of one response that repeat an earlier n-gram of the same response.

    For y = (y_0 .. y_{L−1}) the n-grams are g_i = y[i : i+n], i = 0 .. L−n (L−n+1 of them). The rate is
    #{i : g_i = g_j for some j < i} / (L−n+1): the first occurrence of an n-gram never counts, each later
    occurrence counts once, overlapping occurrences included (so "a a a a a" with n = 2 gives 3/4). A
    response shorter than n has no n-grams and gives 0.0. Range [0, (L−n)/(L−n+1)]. 1-D ids only; average
    over a batch yourself. StableOPD reports repetition saturating together with truncation."""
    if n < 1:
        raise ValueError(f"ngram_repetition: n must be >= 1, got {n}")
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ngram_repetition: ids must be 1-D (one response), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    total = len(ids) - n + 1
    if total <= 0:
        return 0.0
    seen, repeats = set(), 0
    for i in range(total):
        g = tuple(ids[i:i + n])
        repeats += g in seen
        seen.add(g)
    return repeats / total


def reference_kl_penalty(student_logp, ref_logp, mask) -> EstimatorOut:
    """Divergence to the reference (the initial student) on sampled tokens, k3 estimator. Inputs [N].

    r = log π_ref(y) − log π_θ(y);  k3 = e^r − r − 1 ≥ 0  (Schulman 2020, "Approximating KL divergence"),
    computed as expm1(r) − r so it stays ≥ 0 and exact near r = 0. For y ~ π_θ, E[k3] = E[π_ref/π_θ] − E[r]
    − 1 = KL(π_θ‖π_ref): unbiased and non-negative, with lower variance than k1 = −r when the two policies
    are close. Value bias under staleness: samples come from π_β, not π_θ.

    Gradient: the loss is mean(k3) differentiated through log π_θ (as GRPO does), whose per-sample gradient
    is (1 − π_ref/π_θ) ∇log π_θ; its expectation under π_θ is −Σ_y π_ref ∇log π_θ = ∇KL(π_ref‖π_θ), the
    *forward* KL's gradient, not the reverse one's (Zhang et al. 2025 "On the design of KL-regularized policy
    gradient algorithms for LLM reasoning"). Both vanish at π_θ = π_ref and both pull towards the reference,
    which is what StableOPD's constraint needs; use `reference_kl_exact` for the exact reverse KL.
    An r beyond ±LOG_RATIO_GUARD would overflow e^r; it is clamped (count in guard_frac).

    metrics: kl (mean k3), k1 (mean log π_θ − log π_ref, the plain estimator), guard_frac."""
    N = student_logp.shape[0]
    if ref_logp.shape != (N,) or mask.dtype != torch.bool or mask.shape != (N,):
        raise ValueError(f"reference_kl_penalty: student_logp, ref_logp [N] and bool mask [N] required, got "
                         f"{tuple(student_logp.shape)}, {tuple(ref_logp.shape)}, {mask.dtype} {tuple(mask.shape)}")
    r_raw = ref_logp.detach().float() - student_logp.float()          # [N], differentiable through π_θ
    r = r_raw.clamp(-LOG_RATIO_GUARD, LOG_RATIO_GUARD)
    k3 = torch.where(mask, torch.expm1(torch.where(mask, r, 0.0)) - r, 0.0)
    loss = _masked_mean(k3, mask)
    return EstimatorOut(loss, {"kl": loss.item(), "k1": _masked_mean(-r_raw.detach(), mask).item(),
                               "guard_frac": _masked_mean((r_raw.detach().abs() > LOG_RATIO_GUARD).float(),
                                                          mask).item()})


def reference_kl_exact(student_logits, ref_logits, mask, *, chunk_size=None) -> EstimatorOut:
    """Exact KL(π_θ‖π_ref) from full logits [N, V], chunked over rows: `reverse_kl_exact` with the reference
    in the teacher's place. Bias 0, variance 0; costs one reference forward pass with full logits."""
    return reverse_kl_exact(student_logits, ref_logits, mask, chunk_size=chunk_size)
