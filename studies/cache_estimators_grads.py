"""The maths of studies.cache_estimators: each cache layout's KL gradient against the exact one, at fixed prefixes.

The one idea: at N fixed rollout positions (prefixes s_n made by the behaviour student π_β), every cache layout
feeds one library estimator, and that estimator's gradient w.r.t. the current student's logits z [N, V] is
compared with the exact gradient of the same loss (masked token means over the same N positions):

    forward KL   g_F = ∇_z (1/N) Σ_n KL(π_T(·|s_n) ‖ π_θ(·|s_n))  = (π_θ − π_T)/N row by row
    reverse KL   g_R = ∇_z (1/N) Σ_n KL(π_θ(·|s_n) ‖ π_T(·|s_n))  (per position, prefixes held fixed: the
                 quantity the 1-sample policy gradient estimates at each prefix, not its effect on later prefixes)

Fresh: π_β = π_θ. Stale: prefixes, the student top-k and the MC draws come from π_β (older weights), the
gradient is taken at the current π_θ. A draw resamples every token an estimator reads from π_β(·|s_n) at the
same prefixes (the sampled token, or M MC samples); top-k layouts are deterministic given the prefixes. Over R
draws ĝ_r, with g the exact gradient and every norm relative to ‖g‖:

    bias_rel     ‖E ĝ − g‖, debiased: ‖ḡ − g‖² − tr Σ̂ / R, floored at 0 (its noise, bias_floor_rel = √(tr Σ̂ / R))
    cos_mean     cos(ḡ, g): direction of the mean gradient;  cos_draw: mean over draws of cos(ĝ_r, g)
    std_rel      √tr Σ̂ (Σ̂ the unbiased covariance over draws);  rmse_rel = √(mean_r ‖ĝ_r − g‖²)

In logit space rows are separate coordinates, so these are per-token properties (independent of N). After the
chain rule into parameters (`project`), noise averages over the batch and bias does not.

Layouts (bytes from asyncopd.cache.bytes_per_token; k is capped at V):
    teacher top-k / tail   forward_kl_topk or reverse_kl_topk on the teacher's top-k, tail bucket|renorm|none
    student top-k / tail   the same estimators on π_β's top-k captured at rollout, teacher log-probs on it
    sampled / variant      reverse: reverse_kl_sampled(signal, correction); forward: `forward_kl_is` (M = 1)
    mc-M / variant         reverse: reverse_kl_mc, loo (on-policy form, no sampler log-probs stored) or snis
                           (self-normalised IS with them; unnormalised is for M = 1); forward: `forward_kl_is`
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from asyncopd.cache import bytes_per_token
from asyncopd.config import check_finite
from asyncopd.estimators import (LOG_RATIO_GUARD, EstimatorOut, forward_kl_exact, forward_kl_topk,
                                 reverse_kl_exact, reverse_kl_mc, reverse_kl_sampled, reverse_kl_topk, token_logp)

DIRECTIONS = ("forward", "reverse")
SAMPLED_VARIANTS = ("recompute", "stale", "recompute+is", "recompute+tis")   # reverse_kl_sampled signal[+correction]


@dataclass(frozen=True)
class Layout:
    """One cache layout read by one estimator for one KL direction."""

    direction: str                       # forward | reverse: the KL whose exact gradient is the target
    family: str                          # teacher top-k | student top-k | sampled | mc
    variant: str                         # a tail, a sampled signal[+correction], or loo | snis | is
    k: int = 0                           # top-k entries stored (already capped at V)
    M: int = 0                           # MC draws per position
    sampler_logp: bool = False           # the layout stores log π_β of each draw (for importance weights)
    k_requested: int = 0                 # the k asked for, before capping at V

    @property
    def name(self) -> str:
        size = {"teacher top-k": f"teacher top-{self.k}", "student top-k": f"student top-{self.k}",
                "sampled": "sampled", "mc": f"mc-{self.M}"}[self.family]
        return f"{size} / {self.variant}"

    @property
    def stochastic(self) -> bool:
        return self.family in ("sampled", "mc")

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(k=self.k, n_samples=self.M, sampler_logp=self.sampler_logp)


def layouts(ks: Iterable[int], ms: Iterable[int], tails: Iterable[str], vocab_size: int) -> list[Layout]:
    """Every layout of the study for one vocabulary; top-k sizes above V become V (duplicates dropped)."""
    caps = sorted({min(k, vocab_size): k for k in sorted(ks, reverse=True)}.items())   # k_eff -> smallest k asking
    out = []
    for d in DIRECTIONS:
        out += [Layout(d, "teacher top-k", t, k=k, k_requested=kr) for k, kr in caps for t in tails]
        out += [Layout(d, "student top-k", "bucket", k=k, k_requested=kr) for k, kr in caps]
        if d == "forward":
            out.append(Layout(d, "sampled", "is"))
            out += [Layout(d, "mc", "is", M=M, sampler_logp=True) for M in ms]
        else:
            out += [Layout(d, "sampled", v) for v in SAMPLED_VARIANTS]
            for M in ms:
                out += [Layout(d, "mc", "loo", M=M), Layout(d, "mc", "snis" if M > 1 else "is", M=M, sampler_logp=True)]
    return out


@dataclass
class Positions:
    """N fixed rollout positions of one setting: what every layout and the exact gradient are built from."""

    student_logits: torch.Tensor         # [N, V] current student π_θ at learner time (no grad)
    teacher_logits: torch.Tensor         # [N, V] π_T
    behav_logits: torch.Tensor           # [N, V] π_β, the student that made the prefixes (== student when fresh)
    behav_topk_ids: torch.Tensor         # [N, k_max] int64, π_β's top-k captured at rollout

    def __post_init__(self):
        N, V = self.student_logits.shape
        for name in ("teacher_logits", "behav_logits"):
            if getattr(self, name).shape != (N, V):
                raise ValueError(f"Positions.{name} must be [N, V] = {[N, V]}, got {list(getattr(self, name).shape)}")
        if self.behav_topk_ids.dim() != 2 or self.behav_topk_ids.shape[0] != N:
            raise ValueError(f"Positions.behav_topk_ids must be [N={N}, k], got {list(self.behav_topk_ids.shape)}")
        self.teacher_logp = torch.log_softmax(self.teacher_logits.double(), -1).float()   # [N, V]
        self.behav_logp = torch.log_softmax(self.behav_logits.double(), -1).float()       # [N, V]


def forward_kl_is(student_logits, sample_ids, teacher_sample_logp, sampler_logp, mask) -> EstimatorOut:
    """Forward KL(π_T‖π_θ) from M draws y_m ~ μ by importance sampling. Inputs [N, V], [N, M] ×3, mask [N].

    ∇_z KL = π_θ − π_T per row, and π_T = E_μ[w e_y] with w = π_T(y)/μ(y), so
    loss_row = logsumexp(z) − (1/M) Σ_m sg(w_m) z_{y_m}  has gradient  π_θ − (1/M) Σ_m w_m e_{y_m}:
    unbiased (w clamped at e^±LOG_RATIO_GUARD), variance (1/M)(Σ_v π_T(v)²/μ(v) − ‖π_T‖²) per row, large where
    μ misses the teacher's mass. A study-local estimator (the library's forward KL reads top-k): it shows what a
    sampled-token or MC cache gives forward KL. metrics: kl = mean_m w (log π_T − log π_θ)(y_m)."""
    z = student_logits.float()
    lse = torch.logsumexp(z, -1)                                              # [N]
    logw = (teacher_sample_logp - sampler_logp).float().clamp(-LOG_RATIO_GUARD, LOG_RATIO_GUARD)
    w = logw.exp()                                                            # [N, M]
    zy = z.gather(1, sample_ids)                                              # [N, M]
    rows = lse - (w * zy).mean(-1)
    kl = (w * (teacher_sample_logp - (zy - lse[:, None])).detach()).mean(-1)
    loss = rows[mask].sum() / mask.sum().clamp_min(1)
    return EstimatorOut(loss, {"kl": kl[mask].mean().item()})


def exact_gradient(direction: str, pos: Positions) -> torch.Tensor:
    """∇_z of the exact forward or reverse KL (masked token mean) at the current student logits, [N, V]."""
    z = pos.student_logits.detach().float().requires_grad_()
    mask = torch.ones(z.shape[0], dtype=torch.bool)
    fn = forward_kl_exact if direction == "forward" else reverse_kl_exact
    return torch.autograd.grad(fn(z, pos.teacher_logits, mask).loss, z)[0]


def layout_gradient(layout: Layout, pos: Positions, draws: torch.Tensor | None) -> torch.Tensor:
    """∇_z of `layout`'s estimator at the current student logits, [N, V]. draws [N, M] int64: the tokens sampled
    from π_β that this draw of a stochastic layout stores (column 0 is the sampled token); None for top-k."""
    z = pos.student_logits.detach().float().requires_grad_()
    mask = torch.ones(z.shape[0], dtype=torch.bool)
    logq, logb, d = pos.teacher_logp, pos.behav_logp, layout.direction
    if layout.family == "teacher top-k":
        q, ids = logq.topk(layout.k, -1)
        fn = forward_kl_topk if d == "forward" else reverse_kl_topk
        out = fn(z, ids, q, mask, tail=layout.variant)
    elif layout.family == "student top-k":
        ids = pos.behav_topk_ids[:, :layout.k]
        fn = forward_kl_topk if d == "forward" else reverse_kl_topk
        out = fn(z, ids, logq.gather(1, ids), mask, tail=layout.variant)
    elif d == "forward":                                         # sampled or mc: importance sampling
        out = forward_kl_is(z, draws, logq.gather(1, draws), logb.gather(1, draws), mask)
    elif layout.family == "sampled":
        y = draws[:, 0]
        signal, _, correction = layout.variant.partition("+")
        out = reverse_kl_sampled(token_logp(z, y, mask), logq.gather(1, y[:, None]).squeeze(1), mask,
                                 behav_logp=logb.gather(1, y[:, None]).squeeze(1), signal=signal,
                                 correction=correction or "none")
    else:                                                        # mc
        stale = logb.gather(1, draws) if layout.sampler_logp else None
        out = reverse_kl_mc(z, draws, logq.gather(1, draws), mask, sample_logp=stale, self_normalize=layout.M > 1)
    return torch.autograd.grad(out.loss, z)[0]


def error_stats(grads: Iterable[torch.Tensor], exact: torch.Tensor) -> dict[str, float]:
    """Bias, cosine, spread and RMSE of gradient draws against the exact gradient (see the module doc); all
    norms relative to ‖exact‖. One draw (a deterministic layout) has std_rel = bias_floor_rel = 0.

    One pass, per draw only ‖x − g‖², x·g and ‖x‖²; then R tr Σ̂_ML = Σ_r ‖x_r − g‖² − R ‖x̄ − g‖²."""
    g = exact.float().flatten()
    total = torch.zeros_like(g)
    sq_err, cos_sum, R = 0.0, 0.0, 0
    gn = float(g.norm())
    for x in grads:
        x = x.float().flatten()
        R += 1
        total += x
        d = x - g
        sq_err += float(d @ d)
        cos_sum += float(x @ g) / max(float(x.norm()) * gn, 1e-30)
    if R == 0:
        raise ValueError("error_stats needs at least one gradient draw")
    mean = total / R
    n2, b2 = gn * gn, float((mean - g) @ (mean - g))
    var = max(sq_err - R * b2, 0.0) / (R - 1) if R > 1 else 0.0    # trace of the unbiased covariance
    return {"bias_rel": math.sqrt(max(b2 - var / R, 0.0) / n2), "bias_floor_rel": math.sqrt(var / R / n2),
            "cos_mean": float(mean @ g) / max(float(mean.norm()) * gn, 1e-30), "cos_draw": cos_sum / R,
            "std_rel": math.sqrt(var / n2), "rmse_rel": math.sqrt(sq_err / R / n2), "n_draws": R}


def compare(pos: Positions, lays: list[Layout], *, n_draws: int, seed: int,
            project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """One row per layout: its bytes and `error_stats` in logit space (and, with `project`, a map from logit
    gradients to parameter gradients, the same in parameter space, columns prefixed param_). Stochastic
    layouts draw n_draws independent sets of tokens from π_β; draw r of mc-M reads pool columns [rM, (r+1)M)."""
    M_max = max([1] + [lay.M for lay in lays])
    g = torch.Generator().manual_seed(seed)
    pool = torch.multinomial(pos.behav_logp.double().exp(), n_draws * M_max, replacement=True, generator=g)
    exact = {d: exact_gradient(d, pos) for d in DIRECTIONS}
    exact_param = {d: project(e) for d, e in exact.items()} if project else {}
    rows = []
    for lay in lays:
        M = max(lay.M, 1)
        draws = [pool[:, r * M:(r + 1) * M] for r in range(n_draws)] if lay.stochastic else [None]
        grads = [layout_gradient(lay, pos, d) for d in draws]
        row = {"direction": lay.direction, "layout": lay.name, "family": lay.family, "variant": lay.variant,
               "k": lay.k, "k_requested": lay.k_requested, "M": lay.M, "bytes_per_token": lay.bytes_per_token,
               **error_stats(grads, exact[lay.direction])}
        if project:
            row.update({f"param_{c}": v for c, v in error_stats(map(project, grads), exact_param[lay.direction]).items()
                        if c != "n_draws"})
        rows.append(row)
    return rows


def describe(pos: Positions) -> dict[str, float]:
    """Per-token means that characterise a setting: entropies, the KL to the teacher, and the drift
    KL(π_β‖π_θ) between the behaviour and the current student (0 when fresh)."""
    logp = torch.log_softmax(pos.student_logits.double(), -1)
    logq, logb = pos.teacher_logp.double(), pos.behav_logp.double()
    kl = lambda a, b: float((a.exp() * (a - b)).sum(-1).mean())   # noqa: E731
    return {"tokens": pos.student_logits.shape[0], "vocab": pos.student_logits.shape[1],
            "teacher_entropy": -kl(logq, torch.zeros_like(logq)), "student_entropy": -kl(logp, torch.zeros_like(logp)),
            "reverse_kl": kl(logp, logq), "forward_kl": kl(logq, logp), "drift_kl": kl(logb, logp),
            "teacher_top1_mass": float(logq.max(-1).values.exp().mean())}


# --- the synthetic large-vocabulary setting -----------------------------------------------------------------

@dataclass
class SyntheticConfig:
    vocab: int = 32768                   # V: large enough that top-64 truncates, >= 2
    positions: int = 128                 # N independent positions, >= 1
    zipf_min: float = 1.1                # teacher: p ∝ rank^-s per position, s log-uniform in [zipf_min,
    zipf_max: float = 4.0                #   zipf_max] (> 0): a few high-entropy positions, many near-deterministic
    student_noise: float = 1.0           # student logits = teacher logits + N(0, σ²) per entry, σ >= 0
    stale_shift: list[float] = field(default_factory=lambda: [0.0, 0.2])   # λ in [0, 1]: π_β's logits are
                                         #   z_θ − λ (z_T − z_θ), a student λ steps further from π_T; 0 = fresh

    def __post_init__(self):
        check_finite(self, "synthetic.")
        for name, ok, rule in (("vocab", self.vocab >= 2, ">= 2"), ("positions", self.positions >= 1, ">= 1"),
                               ("zipf_min", 0 < self.zipf_min <= self.zipf_max, "in (0, zipf_max]"),
                               ("student_noise", self.student_noise >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"synthetic.{name} must be {rule}, got {getattr(self, name)!r}")
        lam = list(self.stale_shift)
        if not lam or len(set(lam)) < len(lam) or not all(0 <= x <= 1 for x in lam):
            raise ValueError(f"synthetic.stale_shift must be distinct values in [0, 1], got {lam!r}")


def synthetic_positions(cfg: SyntheticConfig, shift: float, k_max: int, seed: int) -> Positions:
    """Zipf-like teacher logits z_T (a random rank order per position), a noisy student z_θ = z_T + σ ε, and
    staleness as training progress undone: π_β = softmax(z_θ − λ (z_T − z_θ)), the student as it was before it
    moved toward the teacher. π_θ and π_T are the same at every λ (same seed), so only π_β changes."""
    g = torch.Generator().manual_seed(seed)
    N, V = cfg.positions, cfg.vocab
    s = torch.empty(N, dtype=torch.float64).uniform_(math.log(cfg.zipf_min), math.log(cfg.zipf_max), generator=g).exp()
    rank = torch.rand(N, V, generator=g).argsort(-1).argsort(-1) + 1                  # [N, V] 1..V
    teacher = (-s[:, None] * rank.double().log()).float()
    student = teacher + cfg.student_noise * torch.randn(N, V, generator=g)
    behav = student - shift * (teacher - student)
    return Positions(student, teacher, behav, behav.topk(min(k_max, V), -1).indices)
