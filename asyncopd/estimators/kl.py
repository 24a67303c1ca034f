"""Vocabulary-sized KL estimators: exact full-vocabulary, sparse top-k, and M-sample Monte Carlo.

Every function here reads student logits `[N, V]` (N = tokens flattened over the batch) and never holds a
`[N, V]` float32 log-softmax for the whole batch, in the forward pass or the backward pass. They all go
through one autograd Function, `_RowChunked`: its forward evaluates a per-row loss `chunk_size` rows at a
time under `no_grad` and saves only the inputs; its backward recomputes each row chunk with grad enabled
and writes `torch.autograd.grad` of that chunk into one preallocated `grad_logits` buffer. Peak extra
memory is therefore the gradient itself plus a few `[chunk_size, V]` temporaries (torchtune's chunked KD
loss chunks the same way, but over the sequence of an unmaterialised lm_head; here the caller owns the
logits). Teacher-side tensors are constants: no gradient flows into them. Chunks are sized in bytes: by
default (chunk_size=None) a chunk is `chunk_rows(V)` rows, the most whose fp32 [rows, V] block fits in
DEFAULT_CHUNK_BYTES (32 MiB), so the temporaries stay bounded whatever N and V are; chunk_size=0 runs the
unchunked reference (plain autograd over the whole batch) that the parity tests and the memory benchmark
compare with. `python benchmarks/loss_memory.py` measures every estimator's peak against it.

Conventions (shared with `policy_gradient.py` and `stability.py`): inputs are flattened per token; `mask`
`[N]` bool selects the tokens that count; every estimator returns `EstimatorOut(loss, metrics)` where
`loss` is the masked token mean whose gradient is the estimator's gradient and `metrics["kl"]` is the
estimator's value of the divergence (masked token mean), as python floats.

    from asyncopd.estimators import forward_kl_topk
    out = forward_kl_topk(logits.view(-1, V), topk_ids.view(-1, k), topk_logp.view(-1, k), mask.view(-1))
    out.loss.backward(); log(out.metrics)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from asyncopd.config import TAILS, chunk_rows   # torch-free, beside ObjectiveConfig that offers them
LOG_RATIO_GUARD = 20.0     # |log-ratio| clamp before exp() (e^20 ≈ 4.9e8); shared with policy_gradient.py
# A tail mass that rounds to exactly 0 (empty complement, or a teacher whose support mass rounds to 1) is
# read as the smallest normal float32 mass: finite loss, and the right sign of gradient, instead of inf.
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # ≈ −87.3


@dataclass(frozen=True)
class EstimatorOut:
    loss: torch.Tensor                                    # 0-dim; masked token mean; backward() this
    metrics: dict[str, float] = field(default_factory=dict)  # always has "kl"; python floats (host sync)


# --- shared helpers -------------------------------------------------------------------------------------

def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{mask} x / max(#mask, 1). `where`, not `x * mask`, so garbage (inf/nan) in masked rows cannot leak."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def _check_rows(name: str, t: torch.Tensor, n: int, ndim: int) -> None:
    if t.dim() != ndim or t.shape[0] != n:
        raise ValueError(f"{name} must be {ndim}-D with {n} rows (tokens), got shape {tuple(t.shape)}")


def _check_common(student_logits, mask, chunk_size) -> tuple[int, int]:
    """(N, rows per chunk): chunk_size None → `chunk_rows(V)` (DEFAULT_CHUNK_BYTES per fp32 [rows, V] block);
    0 → unchunked (see `_row_chunked`); else that many rows."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(f"mask must be bool [N]={n}, got {mask.dtype} {tuple(mask.shape)}")
    if chunk_size is None:
        return n, chunk_rows(student_logits.shape[1])
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 rows (0 = unchunked, None = by DEFAULT_CHUNK_BYTES), "
                         f"got {chunk_size}")
    return n, chunk_size


def _check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def _weighted_log_ratio(log_w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_j e^{log_w} (log_a − log_b) over the last dim, with the convention 0·(±inf) = 0.

    The inner `where` makes zero-weight entries contribute 0 to the value *and* a finite (zero) gradient: a
    plain `where` on the product would still back-propagate 0·inf = nan through the unselected branch."""
    live = log_w > float("-inf")
    return (log_w.exp() * torch.where(live, log_a - log_b, 0.0)).sum(-1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a ≤ 0 (Mächler 2012): expm1 near 0, log1p far from it. a is clamped to ≤ 0."""
    a = a.clamp_max(0.0)
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _log_tail(x: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log Σ_{v∉S} softmax(x)_v per row, as logsumexp over the non-support logits (no 1 − Σ cancellation).

    x [n, V] fp32, ids [n, k] the support S, lse [n] = logsumexp(x). Rows whose complement is empty or all
    −inf return LOG_TINY; their input is replaced by zeros first so that logsumexp's backward (nan on an
    all-−inf row) never runs on them."""
    rest = x.scatter(1, ids, float("-inf"))                       # [n, V] copy, support removed
    has_tail = (rest > float("-inf")).any(-1)                     # [n]
    rest.masked_fill_(~has_tail[:, None], 0.0)                    # in place: scatter's backward keeps no output
    return torch.where(has_tail, torch.logsumexp(rest, -1) - lse, LOG_TINY)


def _student_log_tail(x, ids, lse, logp, tail: str) -> torch.Tensor:
    """log(1 − P): exact and differentiable for the bucket tail; for renorm/none it is only a metric, so
    the cheap log1mexp(logsumexp(log p_S)) (imprecise as P → 1) saves a [n, V] copy per chunk."""
    if tail == "bucket":
        return _log_tail(x, ids, lse)
    return _log1mexp(torch.logsumexp(logp, -1)).detach()


# --- the one chunking primitive -------------------------------------------------------------------------

class _RowChunked(torch.autograd.Function):
    """rows, aux = row_fn(logits[s:e], *(o[s:e] for o in others)) evaluated chunk by chunk.

    row_fn returns (loss_rows [n] fp32, aux [n, n_aux] fp32): loss_rows is differentiated w.r.t. the logits
    chunk only; aux are diagnostics (returned non-differentiable). Rows with mask False give 0 in both
    outputs and a zero gradient, and chunks without any masked-in row are skipped. Forward saves only the
    inputs; backward recomputes each chunk (one extra forward of row_fn: the price of O(chunk·V) memory)
    and writes its gradient into a single preallocated [N, V] buffer. Not twice differentiable."""

    @staticmethod
    def forward(ctx, row_fn, n_aux, chunk_size, mask, logits, *others):
        N = logits.shape[0]
        rows = torch.zeros(N, dtype=torch.float32, device=logits.device)
        aux = torch.zeros(N, n_aux, dtype=torch.float32, device=logits.device)
        live = [s for s in range(0, N, chunk_size) if bool(mask[s:s + chunk_size].any())]
        with torch.no_grad():
            for s in live:
                e, m = s + chunk_size, mask[s:s + chunk_size]
                r, a = row_fn(logits[s:e], *(o[s:e] for o in others))
                rows[s:e] = torch.where(m, r, 0.0)
                aux[s:e] = torch.where(m[:, None], a, 0.0)
        ctx.row_fn, ctx.chunk_size, ctx.live, ctx.n_others = row_fn, chunk_size, live, len(others)
        ctx.save_for_backward(mask, logits, *others)
        ctx.mark_non_differentiable(aux)
        return rows, aux

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, _grad_aux):
        mask, logits, *others = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)                       # the only [N, V] allocation
        c = ctx.chunk_size
        for s in ctx.live:
            e, m = s + c, mask[s:s + c]
            with torch.enable_grad():
                x = logits[s:e].detach().requires_grad_(True)        # [c, V] view, a leaf for this chunk
                r, _ = ctx.row_fn(x, *(o[s:e] for o in others))
                (g,) = torch.autograd.grad(r, x, torch.where(m, grad_rows[s:e], 0.0))
            grad_logits[s:e] = g.masked_fill_(~m[:, None], 0.0)     # masked rows may hold nan: drop them
            del g                                                    # before the next chunk's temporaries
        return (None, None, None, None, grad_logits, *([None] * ctx.n_others))


def _row_chunked(row_fn, n_aux, chunk_size, mask, logits, *others):
    """`_RowChunked` for chunk_size ≥ 1 rows. chunk_size = 0 is the unchunked reference: row_fn on the whole
    [N, V] batch under plain autograd, which keeps every [N, V] temporary for backward (the "naive" of
    benchmarks/loss_memory.py and the parity tests; masked rows must then hold finite values)."""
    if chunk_size == 0:
        rows, aux = row_fn(logits, *others)
        return torch.where(mask, rows, 0.0), torch.where(mask[:, None], aux, 0.0).detach()
    return _RowChunked.apply(row_fn, n_aux, chunk_size, mask, logits, *others)


def _no_aux(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape[0], 0)


def token_logp(logits, ids, mask, *, chunk_size=None) -> torch.Tensor:
    """log softmax(logits)[n, ids[n]] per row, [N] fp32, differentiable w.r.t. logits [N, V].

    The learner-time log π_θ(y_t) that reverse_kl_sampled and the reference penalty take. Chunked like the
    estimators, so neither forward nor backward holds more than one [chunk, V] log-softmax. Masked rows give 0."""
    N, chunk_size = _check_common(logits, mask, chunk_size)
    _check_rows("ids", ids, N, 1)

    def rows(x, y):
        x = x.float()
        return x.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(x, -1), _no_aux(x)

    return _row_chunked(rows, 0, chunk_size, mask, logits, ids)[0]


# --- exact full-vocabulary ------------------------------------------------------------------------------

def _exact_kl(student_logits, teacher_logits, mask, chunk_size, *, student_weighted: bool) -> EstimatorOut:
    """Σ_v w(v) [log w(v) − log u(v)] per row, w = π_θ (reverse) or π_T (forward), the other one u."""
    N, chunk_size = _check_common(student_logits, mask, chunk_size)
    _check_rows("teacher_logits", teacher_logits, N, 2)

    def rows(x, t):
        logp = torch.log_softmax(x.float(), -1)                   # [n, V]
        logq = torch.log_softmax(t.float(), -1)                   # [n, V] constant
        w, u = (logp, logq) if student_weighted else (logq, logp)
        return _weighted_log_ratio(w, w, u), _no_aux(x)

    per_row, _ = _row_chunked(rows, 0, chunk_size, mask, student_logits, teacher_logits.detach())
    loss = _masked_mean(per_row, mask)
    return EstimatorOut(loss, {"kl": loss.item()})


def forward_kl_exact(student_logits, teacher_logits, mask, *, chunk_size=None) -> EstimatorOut:
    """Exact forward KL per token, KL(π_T‖π_θ) = Σ_v π_T(v) [log π_T(v) − log π_θ(v)]. Inputs [N, V], mask [N].

    Gradient w.r.t. the student logits: softmax(student) − softmax(teacher) per row (cross-entropy to the
    teacher's soft labels); the teacher is a constant. Bias 0, variance 0 given the full teacher distribution
    (the reference every other estimator is compared with). Hinton et al. 2015 "Distilling the knowledge in
    a neural network"; GKD (Agarwal et al. 2024) with the teacher weighting, i.e. "supervised KD". Teacher
    logits are read one chunk of rows at a time too (chunk_size rows, see `_RowChunked`)."""
    return _exact_kl(student_logits, teacher_logits, mask, chunk_size, student_weighted=False)


def reverse_kl_exact(student_logits, teacher_logits, mask, *, chunk_size=None) -> EstimatorOut:
    """Exact reverse KL per token, KL(π_θ‖π_T) = Σ_v π_θ(v) [log π_θ(v) − log π_T(v)]. Inputs [N, V], mask [N].

    Gradient (through the student only): ∂/∂z_v = π_θ(v) [d_v − Σ_u π_θ(u) d_u], d = log π_θ − log π_T.
    Bias 0, variance 0: the quantity the sampled and MC estimators in this package estimate, and the
    target of the parity tests (Gu et al. 2024 MiniLLM; Agarwal et al. 2024 GKD with the student weighting).
    Needs full teacher logits, which a finite teacher-score cache does not keep: a reference, not a default."""
    return _exact_kl(student_logits, teacher_logits, mask, chunk_size, student_weighted=True)


# --- sparse top-k ---------------------------------------------------------------------------------------

def forward_kl_topk(student_logits, teacher_topk_ids, teacher_topk_logp, mask, *, tail="bucket",
                    chunk_size=None) -> EstimatorOut:
    """Forward KL(π_T‖π_θ) on the teacher's top-k support S. ids [N, k] int64 (unique per row), logp [N, k].

    `teacher_topk_logp` are full-vocabulary log-probs (Σ_S e^logp = Q ≤ 1); P = Σ_S π_θ is the student's
    mass on S, 1 − P computed as logsumexp of the non-support logits (stable when P → 1). Tails:

      bucket  Σ_S q (log q − log p) + (1−Q) [log(1−Q) − log(1−P)]   the (k+1)-bucket KL (tail = one bucket)
      renorm  Σ_S q̃ (log q̃ − log p̃),  q̃ = q/Q, p̃ = p/P              KL of the renormalised distributions
      none    Σ_S q (log q − log p)                                  unrenormalised (the seeds' reference)

    Bias (exact = KL(π_T‖π_θ)). Chain rule over the partition {S, tail}:
      exact = KL_bin(Q‖P) + Q·renorm + (1−Q)·KL(tail_T‖tail_θ),  KL_bin(Q‖P) = Q log Q/P + (1−Q) log (1−Q)/(1−P)
    so  bucket = KL_bin + Q·renorm ≤ exact  (data processing; the gap is the within-tail KL, ≤ (1−Q)·max),
        none = bucket − (1−Q) log((1−Q)/(1−P)), which can be negative and is not a divergence, and
        renorm ≤ bucket / Q. All three equal exact when k = V. `bucket` is ≥ 0 and 0 iff the k+1 buckets
    match; its gradient pulls the student's tail mass towards the teacher's. `none` drops the tail and so
    pushes up every top-k logit without bound on the tail (Σ_S q < 1 never balances). Variance 0: the
    estimator is deterministic given the cache entry. Sources: top-k (sparse) KD as cached by the
    teacher-score cache, whose bias "Sparse logit sampling" (Anshumann et al. 2025) analyses; the tail bucket
    follows DESIGN.md.

    metrics: kl, teacher_tail_mass_mean (1 − Q), student_tail_mass_mean (1 − P)."""
    N, chunk_size = _check_common(student_logits, mask, chunk_size)
    _check_tail(tail)
    _check_rows("teacher_topk_ids", teacher_topk_ids, N, 2)
    _check_rows("teacher_topk_logp", teacher_topk_logp, N, 2)
    full_support = teacher_topk_ids.shape[1] >= student_logits.shape[1]  # k = V: no tail on either side

    def rows(x, ids, logq):
        x, logq = x.float(), logq.float()
        lse = torch.logsumexp(x, -1)                              # [n]
        logp = x.gather(1, ids) - lse[:, None]                    # [n, k] student log-probs on S
        log_p_tail = _student_log_tail(x, ids, lse, logp, tail)   # [n] log(1 − P)
        log_q_tail = _log1mexp(torch.logsumexp(logq, -1))         # [n] log(1 − Q), constant
        if tail == "renorm":
            logq_n = logq - torch.logsumexp(logq, -1, keepdim=True)
            logp_n = logp - torch.logsumexp(logp, -1, keepdim=True)
            kl = _weighted_log_ratio(logq_n, logq_n, logp_n)
        else:
            kl = _weighted_log_ratio(logq, logq, logp)
            if tail == "bucket" and not full_support:
                kl = kl + _weighted_log_ratio(log_q_tail[:, None], log_q_tail[:, None], log_p_tail[:, None])
        aux = torch.stack([log_q_tail.exp(), log_p_tail.exp()], -1).detach()
        return kl, aux

    per_row, aux = _row_chunked(rows, 2, chunk_size, mask, student_logits, teacher_topk_ids,
                                teacher_topk_logp.detach())
    loss = _masked_mean(per_row, mask)
    return EstimatorOut(loss, {"kl": loss.item(),
                               "teacher_tail_mass_mean": _masked_mean(aux[:, 0], mask).item(),
                               "student_tail_mass_mean": _masked_mean(aux[:, 1], mask).item()})


def reverse_kl_topk(student_logits, support_ids, teacher_support_logp, mask, *, tail="bucket",
                    chunk_size=None) -> EstimatorOut:
    """Reverse KL(π_θ‖π_T) on a finite support S, e.g. the student's top-k captured at rollout time.

    support_ids [N, k] int64 (unique per row); teacher_support_logp [N, k] the teacher's full-vocabulary
    log-probs on S (Q = Σ_S q ≤ 1); P = Σ_S π_θ from the student logits. Tails, mirroring forward_kl_topk:

      bucket  Σ_S p (log p − log q) + (1−P) [log(1−P) − log(1−Q)]
      renorm  Σ_S p̃ (log p̃ − log q̃)
      none    Σ_S p (log p − log q)

    Bias: exact = KL_bin(P‖Q) + P·renorm + (1−P)·KL(tail_θ‖tail_T), hence bucket ≤ exact, none = bucket −
    (1−P) log((1−P)/(1−Q)), renorm ≤ bucket / P; all equal exact when k = V. The support is usually the
    *behaviour* student's top-k, so under staleness it is not the current student's top-k: the bias grows
    with the mass the current student moved off S (reported as student_tail_mass_mean). Variance 0 given
    the support. A teacher tail that rounds to 0 is read as LOG_TINY (finite, large penalty on 1−P).
    Gradient flows through the student only, including through P and the tail. Sources: GKD/MiniLLM reverse
    KL (Agarwal et al. 2024; Gu et al. 2024) restricted to a sparse support as in DESIGN.md.

    metrics: kl, teacher_tail_mass_mean (1 − Q), student_tail_mass_mean (1 − P)."""
    N, chunk_size = _check_common(student_logits, mask, chunk_size)
    _check_tail(tail)
    _check_rows("support_ids", support_ids, N, 2)
    _check_rows("teacher_support_logp", teacher_support_logp, N, 2)
    full_support = support_ids.shape[1] >= student_logits.shape[1]

    def rows(x, ids, logq):
        x, logq = x.float(), logq.float()
        lse = torch.logsumexp(x, -1)
        logp = x.gather(1, ids) - lse[:, None]                    # [n, k]
        log_p_tail = _student_log_tail(x, ids, lse, logp, tail)   # [n]
        log_q_tail = _log1mexp(torch.logsumexp(logq, -1))
        if tail == "renorm":
            logq_n = logq - torch.logsumexp(logq, -1, keepdim=True)
            logp_n = logp - torch.logsumexp(logp, -1, keepdim=True)
            kl = _weighted_log_ratio(logp_n, logp_n, logq_n)
        else:
            kl = _weighted_log_ratio(logp, logp, logq)
            if tail == "bucket" and not full_support:
                lq = log_q_tail.clamp_min(LOG_TINY)[:, None]
                kl = kl + _weighted_log_ratio(log_p_tail[:, None], log_p_tail[:, None], lq)
        aux = torch.stack([log_q_tail.exp(), log_p_tail.exp()], -1).detach()
        return kl, aux

    per_row, aux = _row_chunked(rows, 2, chunk_size, mask, student_logits, support_ids,
                                teacher_support_logp.detach())
    loss = _masked_mean(per_row, mask)
    return EstimatorOut(loss, {"kl": loss.item(),
                               "teacher_tail_mass_mean": _masked_mean(aux[:, 0], mask).item(),
                               "student_tail_mass_mean": _masked_mean(aux[:, 1], mask).item()})


# --- multi-sample Monte Carlo ---------------------------------------------------------------------------

def reverse_kl_mc(student_logits, sample_ids, teacher_sample_logp, mask, *, sample_logp=None,
                  self_normalize=True, chunk_size=None) -> EstimatorOut:
    """M-sample Monte-Carlo reverse KL(π_θ‖π_T) per position. sample_ids, teacher_sample_logp [N, M].

    Per sample f_m = log π_θ(y_m) − log π_T(y_m) (π_θ from the current logits, detached inside f).
    The loss's *value* is the KL estimate K̂ and its *gradient* is a score-function estimate of ∇KL:
    loss_row = K̂ + S − sg(S), S = Σ_m c_m log π_θ(y_m) with coefficients c_m (detached) below. The
    identity ∇KL = E_{π_θ}[(f + 1) ∇log π_θ] holds, and E[∇log π_θ] = 0 lets any baseline replace the 1.

    On-policy (sample_logp=None; y_m ~ π_θ, the current student):
      K̂ = (1/M) Σ f_m;  c_m = (f_m − b_m)/M with leave-one-out baseline b_m = mean_{j≠m} f_j (0 if M = 1).
      Bias 0 for value and gradient (b_m is independent of y_m). Variance Var_{π_θ}(f)/M for the value;
      the LOO baseline removes the E[f]² part of the gradient's second moment (Kool et al. 2019, "Buy 4
      REINFORCE samples, get a baseline for free!"). M = 1 is `reverse_kl_sampled` with signal="recompute".
    Stale sampler (sample_logp = log μ(y_m), y_m ~ μ ≠ π_θ), weights w_m = π_θ(y_m)/μ(y_m), log space:
      self_normalize=False:  K̂ = (1/M) Σ w_m f_m;  c_m = w_m (f_m − b_m)/M, LOO b_m.  Unbiased (value and
        gradient) up to the LOG_RATIO_GUARD clamp on log w; variance ∝ E_μ[w² f²]/M, unbounded when μ has
        lighter tails than π_θ.
      self_normalize=True:   w̃ = softmax(log w);  K̂ = Σ w̃_m f_m;  c_m = w̃_m (f_m − K̂)  (the gradient of K̂
        minus the O(1/M) term Σ w̃ ∇log π_θ). Biased O(1/M), consistent; invariant to the scale of w (no
        overflow, no guard); variance ≈ Σ w̃² (f − K̂)², bounded by max|f|. Needs M ≥ 2: with M = 1, w̃ ≡ 1
        and the gradient vanishes, so M = 1 raises ValueError.
    (Owen 2013 "Monte Carlo theory, methods and examples" ch. 9 for IS/SNIS bias and variance.)

    metrics: kl, ess_frac (mean over tokens of ESS/M of the weights; 1 on-policy), rho_mean (mean w),
    guard_frac (fraction of samples whose |log w| hit LOG_RATIO_GUARD; unnormalised IS only)."""
    N, chunk_size = _check_common(student_logits, mask, chunk_size)
    _check_rows("sample_ids", sample_ids, N, 2)
    _check_rows("teacher_sample_logp", teacher_sample_logp, N, 2)
    M = sample_ids.shape[1]
    stale = sample_logp is not None
    if stale:
        _check_rows("sample_logp", sample_logp, N, 2)
        if self_normalize and M < 2:
            raise ValueError("reverse_kl_mc: self_normalize=True needs M >= 2 samples per position "
                             "(with M = 1 the self-normalised weight is 1 and the gradient vanishes); "
                             "use self_normalize=False or reverse_kl_sampled")

    def loo(f):                                                   # [n, M] leave-one-out mean
        return (f.sum(-1, keepdim=True) - f) / (M - 1) if M > 1 else torch.zeros_like(f)

    def rows(x, ids, logq, *mu):
        x = x.float()
        logp = x.gather(1, ids) - torch.logsumexp(x, -1, keepdim=True)   # [n, M], carries the gradient
        f = logp.detach() - logq.float()                                   # [n, M]
        ones = torch.ones_like(f[:, 0])
        if not stale:
            value, coef, ess, rho, guard = f.mean(-1), (f - loo(f)) / M, ones, ones, torch.zeros_like(ones)
        elif self_normalize:
            logw = logp.detach() - mu[0].float()
            wn = torch.softmax(logw, -1)                                   # [n, M], Σ = 1
            value = (wn * f).sum(-1)
            coef = wn * (f - value[:, None])
            ess = 1.0 / (M * (wn * wn).sum(-1))
            rho, guard = logw.clamp(-LOG_RATIO_GUARD, LOG_RATIO_GUARD).exp().mean(-1), torch.zeros_like(ones)
        else:
            logw = logp.detach() - mu[0].float()
            w = logw.clamp(-LOG_RATIO_GUARD, LOG_RATIO_GUARD).exp()
            value = (w * f).mean(-1)
            coef = w * (f - loo(f)) / M
            ess = w.sum(-1) ** 2 / (M * (w * w).sum(-1))
            rho, guard = w.mean(-1), (logw.abs() > LOG_RATIO_GUARD).float().mean(-1)
        surrogate = (coef * logp).sum(-1)                                  # gradient carrier
        loss_rows = value + surrogate - surrogate.detach()
        return loss_rows, torch.stack([value, ess, rho, guard], -1).detach()

    others = (sample_ids, teacher_sample_logp.detach()) + ((sample_logp.detach(),) if stale else ())
    per_row, aux = _row_chunked(rows, 4, chunk_size, mask, student_logits, *others)
    loss = _masked_mean(per_row, mask)
    return EstimatorOut(loss, {"kl": _masked_mean(aux[:, 0], mask).item(),
                               "ess_frac": _masked_mean(aux[:, 1], mask).item(),
                               "rho_mean": _masked_mean(aux[:, 2], mask).item(),
                               "guard_frac": _masked_mean(aux[:, 3], mask).item()})
