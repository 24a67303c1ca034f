"""asyncopd.estimators.kl: exact, top-k and MC KL against hand values, naive references and each other."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asyncopd.estimators import (ESTIMATORS, TAILS, EstimatorOut, forward_kl_exact, forward_kl_topk,
                                 reverse_kl_exact, reverse_kl_mc, reverse_kl_topk)

ROOT = Path(__file__).resolve().parents[1]


def logits_of(*probs):
    """Rows of logits whose softmax is exactly the given probabilities."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def grad_of(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out.loss.backward()
    return out, x.grad


def ones(n):
    return torch.ones(n, dtype=torch.bool)


# --- naive references: whole-batch log_softmax, plain autograd -------------------------------------------

def naive_exact(s, t, mask, direction):
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    rows = (lq.exp() * (lq - lp)).sum(-1) if direction == "forward" else (lp.exp() * (lp - lq)).sum(-1)
    return rows[mask].mean()


def naive_topk(s, ids, logq, mask, tail, direction):
    lp = torch.log_softmax(s, -1).gather(1, ids)
    P, Q = lp.exp().sum(-1), logq.exp().sum(-1)
    a, la, b, lb = (logq.exp(), logq, lp.exp(), lp) if direction == "forward" else (lp.exp(), lp, logq.exp(), logq)
    A, B = (Q, P) if direction == "forward" else (P, Q)
    if tail == "renorm":
        rows = ((a / A[:, None]) * ((la - A.log()[:, None]) - (lb - B.log()[:, None]))).sum(-1)
    else:
        rows = (a * (la - lb)).sum(-1)
        if tail == "bucket":
            rows = rows + (1 - A) * ((1 - A).log() - (1 - B).log())
    return rows[mask].mean()


def random_case(N=6, V=9, k=3, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(N, V, generator=g) * scale, torch.randn(N, V, generator=g) * scale
    logq_all = torch.log_softmax(t, -1)
    logq, ids = logq_all.topk(k, -1)
    mask = torch.rand(N, generator=g) > 0.3
    mask[0] = True
    return s, t, ids, logq, mask


# --- hand-built distributions ---------------------------------------------------------------------------

def test_exact_hand_values_two_tokens():
    s, t = logits_of([0.5, 0.5]), logits_of([0.75, 0.25])
    fwd, g = grad_of(forward_kl_exact, s, t, ones(1))
    assert fwd.loss.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert torch.allclose(g, torch.tensor([[0.5 - 0.75, 0.5 - 0.25]]), atol=1e-6)  # p − q
    rev = reverse_kl_exact(s, t, ones(1))
    assert rev.loss.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert rev.metrics["kl"] == pytest.approx(rev.loss.item())


def test_topk_hand_values_three_tokens():
    # teacher q = (.5, .3, .2), student p = (.2, .3, .5), support = the first two ids
    s, q = logits_of([0.2, 0.3, 0.5]), torch.tensor([[0.5, 0.3, 0.2]])
    ids = torch.tensor([[0, 1]])
    fwd = {tail: forward_kl_topk(s, ids, q[:, :2].log(), ones(1), tail=tail).loss.item() for tail in TAILS}
    assert fwd["none"] == pytest.approx(0.5 * math.log(2.5), abs=1e-6)
    assert fwd["bucket"] == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4), abs=1e-6)  # = exact here
    assert fwd["renorm"] == pytest.approx(5 / 8 * math.log(25 / 16) + 3 / 8 * math.log(5 / 8), abs=1e-6)
    assert fwd["bucket"] == pytest.approx(forward_kl_exact(s, q.log(), ones(1)).loss.item(), abs=1e-6)
    rev = {tail: reverse_kl_topk(s, ids, q[:, :2].log(), ones(1), tail=tail).loss.item() for tail in TAILS}
    assert rev["none"] == pytest.approx(0.2 * math.log(0.4), abs=1e-6)
    assert rev["bucket"] == pytest.approx(0.2 * math.log(0.4) + 0.5 * math.log(2.5), abs=1e-6)
    assert rev["renorm"] == pytest.approx(0.4 * math.log(16 / 25) + 0.6 * math.log(8 / 5), abs=1e-6)
    one = forward_kl_topk(s, ids[:, :1], q[:, :1].log(), ones(1), tail="bucket")   # k = 1: a 2-bucket KL
    assert one.loss.item() == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), abs=1e-6)
    assert one.metrics["teacher_tail_mass_mean"] == pytest.approx(0.5, abs=1e-6)
    assert one.metrics["student_tail_mass_mean"] == pytest.approx(0.8, abs=1e-6)


def test_topk_bucket_gradient_hand_value():
    # k = 1, support {0}: bucket = q0 log(q0/p0) + (1−q0) log((1−q0)/(1−p0)); ∂/∂z = p − (q0, (1−q0)·p_v/(1−p0))
    s, q0 = logits_of([0.2, 0.3, 0.5]), 0.5
    _, g = grad_of(forward_kl_topk, s, torch.tensor([[0]]), torch.tensor([[math.log(q0)]]), ones(1))
    p = torch.tensor([0.2, 0.3, 0.5])
    target = p - torch.tensor([q0, (1 - q0) * 0.3 / 0.8, (1 - q0) * 0.5 / 0.8])
    assert torch.allclose(g[0], target, atol=1e-6)


# --- k = V and identical inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("tail", TAILS)
def test_topk_with_full_support_equals_exact(tail):
    s, t, _, _, mask = random_case(N=5, V=7, k=7, seed=1)
    ids = torch.stack([torch.randperm(7, generator=torch.Generator().manual_seed(i)) for i in range(5)])
    logq = torch.log_softmax(t, -1).gather(1, ids)
    fwd, gf = grad_of(forward_kl_topk, s, ids, logq, mask, tail=tail)
    ex, gex = grad_of(forward_kl_exact, s, t, mask)
    assert fwd.loss.item() == pytest.approx(ex.loss.item(), abs=1e-5)
    assert torch.allclose(gf, gex, atol=1e-6)
    # reverse: the support is the whole vocabulary, the teacher's log-probs on it
    rev, gr = grad_of(reverse_kl_topk, s, ids, logq, mask, tail=tail)
    rex, grex = grad_of(reverse_kl_exact, s, t, mask)
    assert rev.loss.item() == pytest.approx(rex.loss.item(), abs=1e-5)
    assert torch.allclose(gr, grex, atol=1e-6)


def test_identical_distributions_give_zero():
    s, _, _, _, mask = random_case(seed=2)
    logp = torch.log_softmax(s, -1)
    for fn in (forward_kl_exact, reverse_kl_exact):
        out, g = grad_of(fn, s, s.clone(), mask)
        assert out.loss.item() == pytest.approx(0.0, abs=1e-6) and g.abs().max() < 1e-6
    topv, topi = logp.topk(4, -1)
    for fn in (forward_kl_topk, reverse_kl_topk):
        for tail in TAILS:
            out, g = grad_of(fn, s, topi, topv, mask, tail=tail)
            assert out.loss.item() == pytest.approx(0.0, abs=1e-6), (fn, tail)
            # bucket and renorm are divergences (stationary at p = q); `none` is not: it keeps pushing
            # mass onto the support, the documented bias of dropping the tail
            assert (g.abs().max() < 1e-6) == (tail != "none"), (fn, tail)
    ids = torch.multinomial(logp.exp(), 5, replacement=True, generator=torch.Generator().manual_seed(0))
    out, g = grad_of(reverse_kl_mc, s, ids, logp.gather(1, ids), mask)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6) and g.abs().max() < 1e-6


# --- bounds and identities between the tail modes -------------------------------------------------------

def test_bucket_never_exceeds_exact_and_tail_identities():
    for seed in range(120):
        g = torch.Generator().manual_seed(seed)
        V = int(torch.randint(2, 40, (1,), generator=g))
        k = int(torch.randint(1, V, (1,), generator=g))
        scale = float(torch.rand(1, generator=g)) * 6
        s, t = torch.randn(1, V, generator=g) * scale, torch.randn(1, V, generator=g) * scale
        lq_all, lp_all = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
        for direction, ex_fn, tk_fn, support_from in (("forward", forward_kl_exact, forward_kl_topk, lq_all),
                                                      ("reverse", reverse_kl_exact, reverse_kl_topk, lp_all)):
            ids = support_from.topk(k, -1).indices          # teacher's top-k (forward), student's (reverse)
            logq = lq_all.gather(1, ids)
            exact = ex_fn(s, t, ones(1)).loss.item()
            out = {tail: tk_fn(s, ids, logq, ones(1), tail=tail) for tail in TAILS}
            bucket, renorm, none = (out[x].loss.item() for x in TAILS)
            assert -1e-6 <= bucket <= exact + 1e-5, (seed, direction)
            # A = mass of the weighting distribution on S, B = of the other one (forward: A = Q, B = P),
            # in float64 from the logits; the metrics report the same tails in float32
            on_s = torch.zeros(V, dtype=torch.bool)
            on_s[ids[0]] = True
            p64, q64 = torch.softmax(s[0].double(), -1), torch.softmax(t[0].double(), -1)
            P, Q, P_tail, Q_tail = p64[on_s].sum(), q64[on_s].sum(), p64[~on_s].sum(), q64[~on_s].sum()
            assert out["bucket"].metrics["teacher_tail_mass_mean"] == pytest.approx(Q_tail.item(), rel=1e-5, abs=1e-6)
            assert out["bucket"].metrics["student_tail_mass_mean"] == pytest.approx(P_tail.item(), rel=1e-5, abs=1e-6)
            A, B, A_tail, B_tail = (Q, P, Q_tail, P_tail) if direction == "forward" else (P, Q, P_tail, Q_tail)
            A, B, A_tail, B_tail = (x.item() for x in (A, B, A_tail, B_tail))
            tail_term = A_tail * math.log(A_tail / B_tail)
            kl_bin = A * math.log(A / B) + tail_term
            assert bucket == pytest.approx(kl_bin + A * renorm, rel=1e-5, abs=1e-5), (seed, direction)
            assert none == pytest.approx(bucket - tail_term, rel=1e-5, abs=1e-5), (seed, direction)
            assert renorm * A <= bucket + 1e-5


@st.composite
def logit_pairs(draw):
    V = draw(st.integers(2, 8))
    row = st.lists(st.floats(-12, 12, allow_nan=False), min_size=V, max_size=V)
    return torch.tensor([draw(row)]), torch.tensor([draw(row)]), draw(st.integers(1, V))


@given(logit_pairs())
def test_exact_and_topk_kls_are_non_negative(case):
    s, t, k = case
    lq_all = torch.log_softmax(t, -1)
    for fn in (forward_kl_exact, reverse_kl_exact):
        assert fn(s, t, ones(1)).loss.item() >= -1e-6
    logq, ids = lq_all.topk(k, -1)
    for tail in ("bucket", "renorm"):
        fwd = forward_kl_topk(s, ids, logq, ones(1), tail=tail).loss.item()
        rev = reverse_kl_topk(s, ids, logq, ones(1), tail=tail).loss.item()
        assert fwd >= -1e-6 and rev >= -1e-6 and math.isfinite(fwd) and math.isfinite(rev)
    assert forward_kl_topk(s, ids, logq, ones(1)).loss.item() <= forward_kl_exact(s, t, ones(1)).loss.item() + 1e-4


# --- chunked == unchunked == naive ----------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 3, 6])
def test_exact_chunked_matches_naive(chunk_size):
    s, t, _, _, mask = random_case(seed=3)
    for direction, fn in (("forward", forward_kl_exact), ("reverse", reverse_kl_exact)):
        out, g = grad_of(fn, s, t, mask, chunk_size=chunk_size)
        ref, gref = grad_of(lambda x, *a: EstimatorOut(naive_exact(x, *a, direction)), s, t, mask)
        assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
        assert torch.allclose(g, gref, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 3, 6])
@pytest.mark.parametrize("tail", TAILS)
def test_topk_chunked_matches_naive(chunk_size, tail):
    s, t, ids, logq, mask = random_case(seed=4)
    for direction, fn in (("forward", forward_kl_topk), ("reverse", reverse_kl_topk)):
        out, g = grad_of(fn, s, ids, logq, mask, tail=tail, chunk_size=chunk_size)
        ref, gref = grad_of(lambda x, *a: EstimatorOut(naive_topk(x, *a, tail, direction)), s, ids, logq, mask)
        assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5), direction
        assert torch.allclose(g, gref, atol=1e-6), direction


@pytest.mark.parametrize("mode", ["on_policy", "is", "snis"])
def test_mc_chunked_matches_unchunked(mode):
    s, t, _, _, mask = random_case(seed=5)
    g = torch.Generator().manual_seed(0)
    mu = torch.log_softmax(s + torch.randn(s.shape, generator=g), -1)
    ids = torch.multinomial(mu.exp(), 4, replacement=True, generator=g)
    logq = torch.log_softmax(t, -1).gather(1, ids)
    kw = {} if mode == "on_policy" else dict(sample_logp=mu.gather(1, ids), self_normalize=mode == "snis")
    outs = [grad_of(reverse_kl_mc, s, ids, logq, mask, chunk_size=c, **kw) for c in (1, 3, 6)]
    for out, grad in outs[:2]:
        assert out.loss.item() == pytest.approx(outs[2][0].loss.item(), abs=1e-6)
        assert out.metrics == pytest.approx(outs[2][0].metrics, abs=1e-6)
        assert torch.allclose(grad, outs[2][1], atol=1e-7)


def test_chunked_graph_saves_no_vocabulary_sized_intermediate():
    # the autograd graph keeps only the inputs: no [N, V] log-softmax (or anything [N, V]) beyond the logits
    s, t, ids, logq, mask = random_case(N=16, V=50, seed=9)
    x = s.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t_: saved.append(t_) or t_, lambda t_: t_):
        losses = [forward_kl_topk(x, ids, logq, mask, chunk_size=4).loss, reverse_kl_exact(x, t, mask).loss,
                  reverse_kl_mc(x, ids, logq, mask, chunk_size=4).loss]
    big = [t_ for t_ in saved if t_.numel() >= x.numel()]
    assert big and all(t_.data_ptr() in (x.data_ptr(), t.data_ptr()) for t_ in big)
    sum(losses).backward()
    assert torch.isfinite(x.grad).all()


def test_bf16_logits_give_bf16_grads_and_fp32_maths():
    s, _, ids, logq, mask = random_case(seed=10)
    sb = s.bfloat16()
    out, g = grad_of(forward_kl_topk, sb, ids, logq, mask, chunk_size=2)
    ref, gref = grad_of(forward_kl_topk, sb.float(), ids, logq, mask)
    assert g.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert out.loss.item() == ref.loss.item() and torch.allclose(g.float(), gref, atol=1e-2)


# --- masks, errors, registry ----------------------------------------------------------------------------

def test_masked_rows_contribute_nothing():
    s, t, ids, logq, mask = random_case(seed=6)
    s2, t2, logq2 = s.clone(), t.clone(), logq.clone()
    s2[~mask], t2[~mask], logq2[~mask] = float("nan"), 1e4, float("-inf")      # garbage in masked rows
    mc_ids = ids.clone()
    cases = [(forward_kl_exact, (t,), (t2,), {}), (reverse_kl_exact, (t,), (t2,), {}),
             (reverse_kl_mc, (mc_ids, logq), (mc_ids, logq2), {})]
    cases += [(fn, (ids, logq), (ids, logq2), dict(tail=tail)) for fn in (forward_kl_topk, reverse_kl_topk)
              for tail in TAILS]
    for fn, a, a2, kw in cases:
        out, g = grad_of(fn, s, *a, mask, **kw)
        out2, g2 = grad_of(fn, s2, *a2, mask, **kw)
        assert out.loss.item() == pytest.approx(out2.loss.item(), abs=1e-6), fn
        assert torch.equal(g2[~mask], torch.zeros_like(g2[~mask])) and torch.allclose(g, g2, atol=1e-7), fn


def test_all_masked_gives_zero_loss_and_grad():
    s, t, _, _, _ = random_case(seed=7)
    out, g = grad_of(forward_kl_exact, s, t, torch.zeros(6, dtype=torch.bool))
    assert out.loss.item() == 0.0 and g.abs().sum() == 0


def test_invalid_arguments_raise():
    s, t, ids, logq, mask = random_case(seed=8)
    with pytest.raises(ValueError, match="tail must be one of"):
        forward_kl_topk(s, ids, logq, mask, tail="drop")
    with pytest.raises(ValueError, match="chunk_size"):
        reverse_kl_exact(s, t, mask, chunk_size=-1)
    with pytest.raises(ValueError, match="mask must be bool"):
        forward_kl_exact(s, t, mask.float())
    with pytest.raises(ValueError, match="M >= 2"):
        reverse_kl_mc(s, ids[:, :1], logq[:, :1], mask, sample_logp=logq[:, :1])


def test_estimators_dict_maps_names_to_functions():
    assert set(ESTIMATORS) == {"forward_kl_exact", "reverse_kl_exact", "forward_kl_topk", "reverse_kl_topk",
                               "reverse_kl_sampled", "reverse_kl_mc"}
    assert all(fn.__name__ == name for name, fn in ESTIMATORS.items())


# --- Monte Carlo against exact --------------------------------------------------------------------------

def _mc_case(M=4096, V=6, seed=0, stale=False):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(1, V, generator=g), torch.randn(1, V, generator=g)
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    lmu = torch.log_softmax(s + 0.7 * torch.randn(1, V, generator=g), -1) if stale else lp
    ids = torch.multinomial(lmu.exp(), M, replacement=True, generator=g)     # [1, M]
    f = (lp - lq)[0, ids[0]]                                                   # [M]
    score = torch.nn.functional.one_hot(ids[0], V).float() - lp.exp()          # [M, V] ∇_z log π_θ(y_m)
    return s, t, ids, lq.gather(1, ids), lmu.gather(1, ids), f, score


def test_mc_on_policy_matches_exact_within_3_sigma():
    s, t, ids, logq, _, f, score = _mc_case(seed=0)
    M = ids.shape[1]
    out, g = grad_of(reverse_kl_mc, s, ids, logq, ones(1))
    ex, gex = grad_of(reverse_kl_exact, s, t, ones(1))
    assert abs(out.metrics["kl"] - ex.loss.item()) <= 3 * f.std().item() / math.sqrt(M)
    assert out.loss.item() == pytest.approx(out.metrics["kl"], abs=1e-6)       # value = the KL estimate
    per_sample = (f - f.mean())[:, None] * score                               # ≈ the LOO-baselined terms
    se = per_sample.std(0) / math.sqrt(M)
    assert ((g[0] - gex[0]).abs() <= 3 * se).all(), (g, gex, se)


@pytest.mark.parametrize("self_normalize", [False, True])
def test_mc_stale_sampler_importance_weighted_matches_exact(self_normalize):
    s, t, ids, logq, lmu, f, score = _mc_case(seed=1, stale=True)
    M = ids.shape[1]
    out, g = grad_of(reverse_kl_mc, s, ids, logq, ones(1), sample_logp=lmu, self_normalize=self_normalize)
    ex, gex = grad_of(reverse_kl_exact, s, t, ones(1))
    logw = torch.log_softmax(s, -1)[0, ids[0]] - lmu[0]
    if self_normalize:
        wn = torch.softmax(logw, 0)
        sigma = ((wn * (f - out.metrics["kl"])) ** 2).sum().sqrt().item()
        h = (f - out.metrics["kl"])[:, None] * score
        se = ((wn[:, None] * (h - (wn[:, None] * h).sum(0))) ** 2).sum(0).sqrt()
    else:
        w = logw.exp()
        sigma = (w * f).std().item() / math.sqrt(M)
        se = (w[:, None] * (f - f.mean())[:, None] * score).std(0) / math.sqrt(M)
    assert abs(out.metrics["kl"] - ex.loss.item()) <= 3 * sigma
    assert ((g[0] - gex[0]).abs() <= 3 * se).all(), (g, gex, se)
    assert 0.3 < out.metrics["ess_frac"] < 1.0                                 # a real, imperfect reweighting


def test_mc_unweighted_stale_samples_are_biased():
    # the same stale samples without sample_logp estimate E_μ[f], not the KL: the IS test above is not vacuous
    s, t, ids, logq, _, f, _ = _mc_case(seed=1, stale=True)
    out = reverse_kl_mc(s, ids, logq, ones(1))
    ex = reverse_kl_exact(s, t, ones(1)).loss.item()
    assert abs(out.metrics["kl"] - ex) > 6 * f.std().item() / math.sqrt(ids.shape[1])


# --- benchmark smoke ------------------------------------------------------------------------------------

def test_loss_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "loss_memory.csv"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), "--n", "256", "--v", "4096",
                          "--k", "8", "--chunk-mib", "0.5", "--only", "forward_kl_topk/bucket", "token_logp",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ratio = float(res.stdout.split("worst ratio to unchunked: ")[1].split()[0])
    assert 0 < ratio < 1                                 # 4 MiB of logits: the chunked peak is measurably smaller
    table = pd.read_csv(out)
    assert list(zip(table.estimator, table.impl)) == [("forward_kl_topk/bucket", "unchunked"),
                                                      ("forward_kl_topk/bucket", "chunked"),
                                                      ("token_logp", "unchunked"), ("token_logp", "chunked")]
    chunked = table[table.impl == "chunked"]
    assert (chunked.rows_per_chunk == 32).all() and (chunked.max_abs_diff_grad < 1e-6).all()
