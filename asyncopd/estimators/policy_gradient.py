"""1-sample reverse KL as a policy gradient, the off-policy corrections async training needs, and VCPO.

The sampled estimator needs no vocabulary-sized tensor: per generated token y_t it reads log π_θ(y_t)
(learner time, differentiable), log π_T(y_t) (teacher score) and, under staleness, log π_β(y_t) (rollout
time). The per-token advantage A_t = log π_T(y_t) − log π(y_t) turns reverse-KL minimisation into REINFORCE
with reward A (Gu et al. 2024 MiniLLM; Agarwal et al. 2024 GKD; Thinking Machines 2025 "On-policy
distillation"). Every correction is written as a detached per-token coefficient c_t = w_t · A_t on
log π_θ(y_t), so that all of them share one loss form, −mean(c · log π_θ), and reduce to the same loss and
gradient when π_β = π_θ; VCPO's minimum-variance baseline b enters as c_t = w_t · (A_t − b). Ratios are
formed in log space and clamped before exp (LOG_RATIO_GUARD), so a stale log-prob 1000 nats away gives
finite numbers.

    out = reverse_kl_sampled(student_logp, teacher_logp, mask, behav_logp=behav_logp, correction="tis")
"""

from __future__ import annotations

import math

import torch

from asyncopd.config import BASELINES, CORRECTIONS, SIGNALS   # torch-free, beside ObjectiveConfig that offers them
from asyncopd.estimators.kl import LOG_RATIO_GUARD, EstimatorOut, _check_common, _masked_mean


# --- VCPO -----------------------------------------------------------------------------------------------

def _flat(rho: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked entries of ρ as a flat fp32 vector, divided by their max: ESS and b* are invariant to the
    scale of ρ, and the division keeps Σρ² from overflowing (ρ ~ 1e20) or underflowing (ρ ~ 1e-30)."""
    rho = rho.detach().float().reshape(-1)
    rho = rho if mask is None else rho[mask.reshape(-1)]
    top = rho.max() if rho.numel() else rho.new_zeros(())
    return rho / torch.where(top > 0, top, 1.0)


def vcpo_ess(rho: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Effective sample size of importance weights, ESS = (Σρ)² / Σρ² over the masked entries (0-dim).

    ESS = N for uniform ρ, 1 for a one-hot ρ, and 0 for an empty or all-zero ρ. Kish's ESS; VCPO (Huang et
    al. 2026, "Stable Asynchrony: Variance-Controlled Off-Policy RL for LLMs", arXiv 2602.17616) finds that
    collapse under staleness is predicted by a falling ESS. A diagnostic: no gradient."""
    r = _flat(rho, mask)
    s2 = (r * r).sum()
    return torch.where(s2 > 0, r.sum() ** 2 / torch.where(s2 > 0, s2, 1.0), 0.0)


def vcpo_lr_scale(rho: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """VCPO learning-rate scale ESS/N in [0, 1] (0-dim; N = number of masked entries, 0 when N = 0).

    Multiply the step size by it: a batch whose weights concentrate on a few tokens carries the information
    of ESS tokens, so its step is damped proportionally (VCPO, arXiv 2602.17616, §"ESS-scaled learning
    rate"). Equals 1 when ρ ≡ 1 (on-policy), so synchronous training is unchanged."""
    n = _flat(rho, mask).numel()
    return vcpo_ess(rho, mask) / max(n, 1)


def vcpo_baseline(weight: torch.Tensor, reward: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean reward b = Σ c R / Σ c over the masked entries, c = weight ≥ 0 (0-dim; 0 if Σc = 0).

    The constant b minimising Σ c (R − b)². VCPO's closed-form off-policy optimal baseline (OPOB, arXiv
    2602.17616) is this mean with c_i = w_i² ‖∇_θ log π_θ(y_i)‖²: setting d/db of the estimator's second
    moment E[w² (R − b)² ‖∇log π_θ‖²] to 0 gives b* = E[w² ‖∇log π‖² R] / E[w² ‖∇log π‖²], the baseline of
    least variance for the weighted gradient w (R − b) ∇log π_θ, with no value model (`reverse_kl_sampled`
    with baseline="vcpo" passes these weights). With c = ρ it is the self-normalised IS mean reward instead.
    Reduces to mean(R) when c is constant. Invariant to the scale of c."""
    r = _flat(weight, mask)
    R = reward.detach().float().reshape(-1)
    R = R if mask is None else R[mask.reshape(-1)]
    s = r.sum()
    return torch.where(s != 0, (r * R).sum() / torch.where(s != 0, s, 1.0), 0.0)


def logit_grad_sq(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, *,
                  chunk_size: int | None = None) -> torch.Tensor:
    """‖∇_z log softmax(z)_y‖² = ‖e_y − p‖² = 1 − 2 p_y + Σ_v p_v² per token: [N] fp32 in [0, 2], no gradient.

    The squared norm of the score function with respect to the token's logits z: the part of
    ‖∇_θ log π_θ(y_t)‖² that the unembedding W (z = W h) sees, times ‖h‖² (near-constant after the final
    layer norm). A one-pass proxy for VCPO's per-sample gradient norm, which would need a backward pass per
    token. 0 when π puts all its mass on y, largest for confident wrong guesses. Chunked over rows like the
    estimators (one [chunk, V] softmax at a time); masked rows give 0."""
    N, chunk_size = _check_common(logits, mask, chunk_size)
    chunk_size = chunk_size or N                                  # 0: unchunked, one block of every row
    if ids.shape != (N,):
        raise ValueError(f"ids must be [N]={N}, got {tuple(ids.shape)}")
    out = logits.new_zeros(N, dtype=torch.float32)
    with torch.no_grad():
        for lo in range(0, N, chunk_size):
            p = logits[lo:lo + chunk_size].detach().float().softmax(-1)                 # [chunk, V]
            p_y = p.gather(1, ids[lo:lo + chunk_size, None]).squeeze(1)
            out[lo:lo + chunk_size] = 1 - 2 * p_y + (p * p).sum(-1)
    return torch.where(mask, out.clamp_min(0), 0.0)


# --- corrections ----------------------------------------------------------------------------------------

def _m2po_keep(m2: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """M2PO mask: drop the tokens with the largest m2 = (log ρ)² until the mean m2 of the kept ones is ≤ τ.

    Sorting ascending, the mean of the m smallest values is non-decreasing in m, so the kept set is the
    longest prefix whose running mean is ≤ τ (the "largest first" removal of Zheng et al. 2025). [N] bool."""
    N = m2.shape[0]
    vals = torch.where(mask, m2.double(), float("inf"))          # masked-out tokens sort last, never kept
    srt, order = torch.sort(vals, stable=True)
    running = srt.cumsum(0) / torch.arange(1, N + 1, device=m2.device, dtype=torch.float64)
    ok = (running <= tau) & torch.isfinite(srt)
    m = int(ok.long().cumprod(0).sum())                          # length of the all-True prefix
    keep = torch.zeros(N, dtype=torch.bool, device=m2.device)
    keep[order[:m]] = True
    return keep


def _clipped(log_ratio: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO's zero-gradient region, in log space: ratio > 1+ε with A > 0, or ratio < 1−ε with A < 0."""
    hi = log_ratio > math.log1p(eps)
    lo = log_ratio < math.log1p(-eps) if eps < 1 else torch.zeros_like(hi)
    return (hi & (adv > 0)) | (lo & (adv < 0))


def reverse_kl_sampled(student_logp, teacher_logp, mask, *, behav_logp=None, prox_logp=None,
                       signal="recompute", correction="none", is_cap=2.0, clip_eps=0.2,
                       m2po_tau=0.04, baseline="none", grad_sq=None) -> EstimatorOut:
    """1-sample MC reverse KL(π_θ‖π_T) as a policy-gradient surrogate. All inputs [N] per generated token.

    A_t = log π_T(y_t) − log π(y_t),  loss = −mean_t sg(w_t A_t) · log π_θ(y_t)  (masked token mean),
    with π = sg(π_θ) for signal="recompute" (the AsyncOPD surrogate: the learner already has log π_θ(y_t))
    or π = π_β for signal="stale" (the reward fixed at rollout time). The loss *value* is a surrogate;
    metrics["kl"] = mean(log π(y) − log π_T(y)) is the KL estimate (the k1 estimator, unbiased on-policy).

    Bias/variance of the signal: on-policy (y ~ π_θ), recompute is unbiased for ∇KL(π_θ‖π_T) since
    E[(log π_θ − log π_T)∇log π_θ] = ∇KL (E[∇log π_θ] = 0 absorbs the "+1"), with the high variance of a
    one-sample score-function estimator. Stale signal adds a bias from using log π_β in place of log π_θ in
    A, growing with staleness. Samples from π_β make both biased unless reweighted by ρ = π_θ/π_β:

      none       w = 1                           bias: E_{π_β} in place of E_{π_θ}; lowest variance
      is         w = exp(clamp(Δ, ±G))           Δ = log π_θ − log π_β; unbiased up to the guard; variance
                                                 E[ρ² A²] (heavy-tailed under staleness). G = LOG_RATIO_GUARD
      tis        w = min(ρ, is_cap)              truncated IS (Ionides 2008; Yao et al. 2025 "Your efficient
                                                 RL framework secretly brings you off-policy RL training"):
                                                 bias from truncation, variance ≤ is_cap² E[A²]
      clip       w = ρ·1[not clipped]            PPO ratio π_θ/π_β, clip ε = clip_eps (Schulman et al. 2017):
                                                 tokens outside the trust region in the improving direction
                                                 get no gradient; the other side is unbounded, so ρ uses the
                                                 same guard as `is`
      decoupled  w = min(π_prox/π_β, is_cap) · r·1[r not clipped],  r = π_θ/π_prox
                                                 decoupled PPO (Fu et al. 2025, AReaL, arXiv 2505.24298):
                                                 clip against a recent proximal policy, correct the
                                                 behaviour gap by a truncated weight. prox_logp defaults to
                                                 sg(student_logp) (r ≡ 1: then it is TIS with a no-op clip).
                                                 AReaL's code drops tokens above the cap; here they are
                                                 truncated, like tis
      m2po       w = ρ·1[kept]                   M2PO (Zheng et al. 2025, arXiv 2510.01161): drop the tokens
                                                 with the largest Δ² until mean_kept Δ² ≤ m2po_tau, IS-weight
                                                 the rest (no clipping). Dropped tokens stay in the
                                                 denominator of the mean, like clipped ones in PPO

    baseline="vcpo" subtracts VCPO's off-policy optimal baseline (OPOB, arXiv 2602.17616) from A:
    c_t = w_t (A_t − b*),  b* = Σ_t w_t² s_t A_t / Σ_t w_t² s_t  over the batch's masked tokens,
    with s_t = grad_sq (‖∇log π_θ(y_t)‖² or a proxy such as `logit_grad_sq`; 1 when None) and w the effective
    weight above. On-policy, or with w = ρ, E[w ∇log π_θ] = 0, so b adds no bias and is the constant that
    minimises the gradient's second moment; with truncated/clipped w, or w = 1 on stale samples, it shifts
    the estimate of E_β[w A ∇log π_θ] by −b·E_β[w ∇log π_θ] ≠ 0. b* is estimated from the batch itself,
    each token's own term included (as VCPO's group baseline is): an O(1/N) bias, larger when few tokens carry
    the weight w² s. One scalar per batch (the paper's per-prompt groups do not exist in OPD, where each
    prompt has one response). A constant A_t ≡ a gives b* = a and no gradient at all.

    Every correction but `none` needs behav_logp (ValueError otherwise), and so does signal="stale";
    prox_logp is read by `decoupled` only (ignored otherwise, so a run loop can always pass it). When
    behav_logp equals student_logp all corrections give w ≡ 1, i.e. the `none` loss and gradient exactly.
    Masked tokens contribute nothing to the loss or its gradient, whatever their values.

    metrics: kl; with behav_logp also rho_mean (mean of the weight w/o masking by clip/m2po), clip_frac
    (fraction of tokens whose weight was truncated, clipped or dropped), guard_frac (|Δ| > G), ess and
    ess_frac (VCPO ESS and ESS/N of the effective weights w), rho_ess_frac (ESS/N of the ρ of rho_mean: the
    staleness diagnostic, comparable across corrections), log_ratio_abs_mean (mean |Δ|); with
    baseline="vcpo" also baseline (b*)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if behav_logp is None and (correction != "none" or signal == "stale"):
        raise ValueError(f"reverse_kl_sampled(correction={correction!r}, signal={signal!r}) needs behav_logp, "
                         "the rollout-time log π_β(y_t)")
    N = student_logp.shape[0]
    for name, t in (("student_logp", student_logp), ("teacher_logp", teacher_logp),
                    ("behav_logp", behav_logp), ("prox_logp", prox_logp), ("grad_sq", grad_sq)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"{name} must be [N]={N}, got {tuple(t.shape)}")
    if mask.dtype != torch.bool or mask.shape != (N,):
        raise ValueError(f"mask must be bool [N]={N}, got {mask.dtype} {tuple(mask.shape)}")

    theta = student_logp.float()                                  # [N] carries the gradient
    theta_d = theta.detach()
    pi = theta_d if signal == "recompute" else behav_logp.detach().float()
    adv = teacher_logp.detach().float() - pi                      # [N] A_t
    metrics = {"kl": _masked_mean(-adv, mask).item()}

    w = torch.ones_like(theta_d)                                  # [N] effective weight
    if behav_logp is not None:
        G = LOG_RATIO_GUARD
        delta = theta_d - behav_logp.detach().float()             # [N] log ρ, may be ±1000
        rho = delta.clamp(-G, G).exp()                            # finite by construction
        altered = torch.zeros_like(mask)
        if correction == "is":
            w = rho
        elif correction == "tis":
            w = delta.clamp(max=math.log(is_cap)).exp()
            altered = delta > math.log(is_cap)
        elif correction == "clip":
            altered = _clipped(delta, adv, clip_eps)
            w = torch.where(altered, 0.0, rho)
        elif correction == "decoupled":
            prox = theta_d if prox_logp is None else prox_logp.detach().float()
            log_r = theta_d - prox                                # [N] trust-region ratio, log space
            behav_w = (prox - behav_logp.detach().float()).clamp(max=math.log(is_cap)).exp()
            altered = _clipped(log_r, adv, clip_eps)
            w = behav_w * torch.where(altered, 0.0, log_r.clamp(-G, G).exp())
            rho = behav_w
            altered = altered | (prox - behav_logp.detach().float() > math.log(is_cap))
        elif correction == "m2po":
            keep = _m2po_keep(delta * delta, mask, m2po_tau)
            altered = ~keep
            w = torch.where(keep, rho, 0.0)
            metrics["m2_kept"] = _masked_mean(torch.where(keep, delta * delta, 0.0), keep & mask).item()
        metrics.update(rho_mean=_masked_mean(rho, mask).item(),
                       clip_frac=_masked_mean(altered.float(), mask).item(),
                       guard_frac=_masked_mean((delta.abs() > G).float(), mask).item(),
                       log_ratio_abs_mean=_masked_mean(delta.abs(), mask).item(),
                       ess=vcpo_ess(w, mask).item(), ess_frac=vcpo_lr_scale(w, mask).item(),
                       rho_ess_frac=vcpo_lr_scale(rho, mask).item())

    if baseline == "vcpo":
        s = torch.ones_like(w) if grad_sq is None else grad_sq.detach().float()
        b = vcpo_baseline(w * w * s, adv, mask)                   # OPOB b*; w ≤ e^G, so w² stays finite
        adv = adv - b
        metrics["baseline"] = b.item()
    coef = torch.where(mask, w * adv, 0.0)                        # detached; sanitised so grads stay finite
    loss = -_masked_mean(coef * theta, mask)
    return EstimatorOut(loss, metrics)
