"""asyncopd.estimators.policy_gradient: the 1-sample surrogate, off-policy corrections, VCPO."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asyncopd.estimators import (CORRECTIONS, LOG_RATIO_GUARD, SIGNALS, reverse_kl_exact, reverse_kl_sampled,
                                 vcpo_baseline, vcpo_ess, vcpo_lr_scale)


def ones(n):
    return torch.ones(n, dtype=torch.bool)


def grad_sampled(student_logp, *args, **kw):
    x = student_logp.detach().clone().requires_grad_(True)
    out = reverse_kl_sampled(x, *args, **kw)
    out.loss.backward()
    return out, x.grad


def tokens(N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(N, generator=g) * 3                   # log π_θ(y_t)
    teacher = -torch.rand(N, generator=g) * 3                   # log π_T(y_t)
    behav = student + torch.randn(N, generator=g) * 0.3         # log π_β(y_t), mildly stale
    return student, teacher, behav


# --- hand values ----------------------------------------------------------------------------------------

def test_no_correction_hand_values():
    student, teacher = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    out, g = grad_sampled(student, teacher, ones(2))
    adv = teacher - student                                      # A = (−0.5, 1.0)
    assert out.loss.item() == pytest.approx(-(adv * student).mean().item(), abs=1e-6)
    assert torch.allclose(g, -adv / 2)
    assert out.metrics["kl"] == pytest.approx(-adv.mean().item(), abs=1e-6)      # mean(log π_θ − log π_T)
    stale, gs = grad_sampled(student, teacher, ones(2), behav_logp=torch.tensor([-1.2, -2.5]), signal="stale")
    assert torch.allclose(gs, -torch.tensor([-1.5 + 1.2, -1.0 + 2.5]) / 2)      # A from π_β
    assert stale.metrics["kl"] == pytest.approx(((-1.2 + 1.5) + (-2.5 + 1.0)) / 2, abs=1e-6)


def test_corrections_hand_values():
    # token t: Δ = log π_θ − log π_β, A = log π_T − log π_θ; gradient of the loss w.r.t. log π_θ is −w·A/N
    student = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    delta = torch.tensor([math.log(3.0), 0.5, -0.5, 0.0])
    teacher = student + torch.tensor([1.0, 1.0, -1.0, 2.0])     # A = (1, 1, −1, 2)
    behav = student - delta
    A = torch.tensor([1.0, 1.0, -1.0, 2.0])
    expect = {
        "is": torch.tensor([3.0, math.exp(0.5), math.exp(-0.5), 1.0]),
        "tis": torch.tensor([2.0, math.exp(0.5), math.exp(-0.5), 1.0]),          # cap 2
        # clip ε = 0.2: A > 0 and ρ > 1.2 clipped (tokens 0, 1); A < 0 and ρ < 0.8 clipped (token 2)
        "clip": torch.tensor([0.0, 0.0, 0.0, 1.0]),
        # Δ² = (1.207, .25, .25, 0): sorted running means 0, .125, .167, .427 → keep only token 3 at τ = 0.1
        "m2po": torch.tensor([0.0, 0.0, 0.0, 1.0]),
    }
    for correction, w in expect.items():
        out, g = grad_sampled(student, teacher, ones(4), behav_logp=behav, correction=correction, m2po_tau=0.1)
        assert torch.allclose(g, -w * A / 4, atol=1e-6), correction
        assert out.metrics["clip_frac"] == pytest.approx({"is": 0, "tis": 0.25, "clip": 0.75, "m2po": 0.75}[
            correction]), correction
    # m2po with τ = 0.2 keeps tokens 1, 2, 3 (running mean .167 ≤ .2) and IS-weights them
    out, g = grad_sampled(student, teacher, ones(4), behav_logp=behav, correction="m2po", m2po_tau=0.2)
    assert torch.allclose(g, -torch.tensor([0.0, math.exp(0.5), math.exp(-0.5), 1.0]) * A / 4, atol=1e-6)
    assert out.metrics["m2_kept"] == pytest.approx(0.5 / 3, abs=1e-6)


def test_decoupled_hand_values():
    # r = π_θ/π_prox clipped at 1 ± ε; behaviour weight π_prox/π_β truncated at is_cap
    student = torch.tensor([-1.0, -1.0, -1.0])
    prox = torch.tensor([-1.5, -1.0, -1.1])                      # log r = (.5, 0, .1)
    behav = prox - torch.tensor([0.0, math.log(3.0), math.log(1.5)])  # π_prox/π_β = (1, 3, 1.5)
    teacher = student + 1.0                                      # A = 1
    out, g = grad_sampled(student, teacher, ones(3), behav_logp=behav, prox_logp=prox, correction="decoupled")
    w = torch.tensor([0.0, 2.0 * 1.0, 1.5 * math.exp(0.1)])      # token 0 clipped (r = e^.5 > 1.2, A > 0)
    assert torch.allclose(g, -w / 3, atol=1e-6)
    assert out.metrics["rho_mean"] == pytest.approx((1 + 2 + 1.5) / 3, abs=1e-6)
    assert out.metrics["clip_frac"] == pytest.approx(2 / 3)      # one clipped, one truncated


# --- reduction to the uncorrected estimator -------------------------------------------------------------

@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_on_policy_corrections_reduce_to_no_correction(signal, correction):
    student, teacher, _ = tokens(seed=1)
    base, gbase = grad_sampled(student, teacher, ones(8))
    out, g = grad_sampled(student, teacher, ones(8), behav_logp=student.clone(), signal=signal,
                          correction=correction)
    assert out.loss.item() == base.loss.item() and torch.equal(g, gbase)
    if correction != "none":
        assert out.metrics["rho_mean"] == 1.0 and out.metrics["ess_frac"] == pytest.approx(1.0)
        assert out.metrics["clip_frac"] == 0.0


@given(st.lists(st.floats(-30, 0, allow_nan=False), min_size=1, max_size=20), st.sampled_from(CORRECTIONS))
def test_rho_is_one_when_behaviour_is_student(logp, correction):
    student = torch.tensor(logp)
    out = reverse_kl_sampled(student, student.flip(0), ones(len(logp)), behav_logp=student.clone(),
                             correction=correction)
    assert out.metrics["rho_mean"] == 1.0 and out.metrics["guard_frac"] == 0.0


# --- unbiasedness of the recompute surrogate ------------------------------------------------------------

def _policy(seed, V=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g), torch.log_softmax(torch.randn(V, generator=g), -1), g


@pytest.mark.parametrize("stale", [False, True])
def test_recompute_surrogate_gradient_matches_exact_reverse_kl(stale):
    # samples from the student (or from a stale π_β with correction="is"): the mean surrogate gradient
    # w.r.t. the student logits estimates ∇ KL(π_θ‖π_T); compare per coordinate within 4 standard errors
    z, logq, g = _policy(seed=2)
    S, V = 20000, z.shape[0]
    logp = torch.log_softmax(z, -1)
    log_beh = torch.log_softmax(z + 0.5 * torch.randn(V, generator=g), -1) if stale else logp
    y = torch.multinomial(log_beh.exp(), S, replacement=True, generator=g)
    zz = z.clone().requires_grad_(True)
    kw = dict(behav_logp=log_beh[y], correction="is") if stale else {}
    reverse_kl_sampled(torch.log_softmax(zz, -1)[y], logq[y], ones(S), **kw).loss.backward()
    zx = z[None].clone().requires_grad_(True)
    reverse_kl_exact(zx, logq[None], ones(1)).loss.backward()
    w = (logp - log_beh)[y].exp()
    per_sample = -(w * (logq - logp)[y])[:, None] * (torch.nn.functional.one_hot(y, V) - logp.exp())
    se = per_sample.std(0) / math.sqrt(S)
    assert torch.allclose(per_sample.mean(0), zz.grad, atol=1e-4)                # the per-sample model is right
    assert ((zz.grad - zx.grad[0]).abs() <= 4 * se).all(), (zz.grad, zx.grad, se)
    assert se.max() < 0.05 * zx.grad.abs().max()                                  # and the test has power


def test_stale_samples_without_correction_are_biased():
    z, logq, g = _policy(seed=2)
    log_beh = torch.log_softmax(z + 1.5 * torch.randn(5, generator=g), -1)
    y = torch.multinomial(log_beh.exp(), 20000, replacement=True, generator=g)
    zz = z.clone().requires_grad_(True)
    reverse_kl_sampled(torch.log_softmax(zz, -1)[y], logq[y], ones(20000)).loss.backward()
    zx = z[None].clone().requires_grad_(True)
    reverse_kl_exact(zx, logq[None], ones(1)).loss.backward()
    assert (zz.grad - zx.grad[0]).abs().max() > 0.05


# --- masks, overflow, errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("correction", CORRECTIONS)
def test_masked_tokens_contribute_nothing(correction):
    student, teacher, behav = tokens(seed=3)
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    s2, t2, b2 = student.clone(), teacher.clone(), behav.clone()
    s2[~mask], t2[~mask], b2[~mask] = float("-inf"), float("nan"), 1e4
    out, g = grad_sampled(student, teacher, mask, behav_logp=behav, correction=correction)
    out2, g2 = grad_sampled(s2, t2, mask, behav_logp=b2, correction=correction)
    assert out.loss.item() == pytest.approx(out2.loss.item(), abs=1e-6)
    assert torch.equal(g2[~mask], torch.zeros(3)) and torch.allclose(g, g2)
    assert out.metrics == pytest.approx(out2.metrics, abs=1e-6)


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_far_apart_logprobs_stay_finite(signal, correction):
    student, teacher, _ = tokens(N=6, seed=4)
    delta = torch.tensor([1000.0, -1000.0, 500.0, -500.0, 30.0, 0.0])       # log π_θ − log π_β
    behav = student - delta
    out, g = grad_sampled(student, teacher, ones(6), behav_logp=behav, prox_logp=behav + 700.0
                          if correction == "decoupled" else None, signal=signal, correction=correction)
    assert math.isfinite(out.loss.item()) and torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert out.metrics["guard_frac"] == pytest.approx(5 / 6)                  # |Δ| > 20 on five tokens
    if correction == "is":
        w = -g * 6 / (teacher - (student if signal == "recompute" else behav))
        assert torch.allclose(w, delta.clamp(-LOG_RATIO_GUARD, LOG_RATIO_GUARD).exp(), rtol=1e-5)


def test_invalid_arguments_raise():
    student, teacher, behav = tokens()
    with pytest.raises(ValueError, match=r"correction must be one of \('none', 'is', 'tis', 'clip'"):
        reverse_kl_sampled(student, teacher, ones(8), behav_logp=behav, correction="ppo")
    with pytest.raises(ValueError, match="signal must be one of"):
        reverse_kl_sampled(student, teacher, ones(8), signal="fresh")
    for correction in CORRECTIONS[1:]:
        with pytest.raises(ValueError, match="needs behav_logp"):
            reverse_kl_sampled(student, teacher, ones(8), correction=correction)
    with pytest.raises(ValueError, match="needs behav_logp"):
        reverse_kl_sampled(student, teacher, ones(8), signal="stale")
    ignored = reverse_kl_sampled(student, teacher, ones(8), behav_logp=behav, prox_logp=behav + 5, correction="tis")
    assert ignored.loss.item() == reverse_kl_sampled(student, teacher, ones(8), behav_logp=behav,
                                                     correction="tis").loss.item()


# --- VCPO -----------------------------------------------------------------------------------------------

def test_vcpo_ess_lr_scale_and_baseline_hand_values():
    assert vcpo_ess(torch.full((7,), 0.3)).item() == pytest.approx(7.0)
    assert vcpo_ess(torch.tensor([0.0, 5.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    assert vcpo_ess(torch.tensor([1.0, 3.0])).item() == pytest.approx(16 / 10)
    assert vcpo_lr_scale(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.8)
    assert vcpo_lr_scale(torch.ones(5)).item() == pytest.approx(1.0)
    assert vcpo_baseline(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])).item() == pytest.approx(3.5)
    mask = torch.tensor([True, False, True])
    rho, reward = torch.tensor([1.0, 100.0, 3.0]), torch.tensor([2.0, -50.0, 4.0])
    assert vcpo_baseline(rho, reward, mask).item() == pytest.approx(3.5)
    assert vcpo_ess(rho, mask).item() == pytest.approx(1.6) and vcpo_lr_scale(rho, mask).item() == pytest.approx(0.8)
    assert vcpo_ess(torch.zeros(3)).item() == 0.0 and vcpo_baseline(torch.zeros(2), torch.ones(2)).item() == 0.0
    assert vcpo_lr_scale(torch.ones(2), torch.zeros(2, dtype=torch.bool)).item() == 0.0


@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=30))
def test_vcpo_ess_is_between_one_and_n(rho):
    r = torch.tensor(rho, dtype=torch.float32)               # float64 denormals become 0 here
    ess = vcpo_ess(r).item()
    assert ess == 0.0 if r.max() == 0 else 1 - 1e-4 <= ess <= len(rho) * (1 + 1e-4)
    assert vcpo_ess(r * 1e30).item() == pytest.approx(ess, rel=1e-4)   # scale-invariant, no overflow
