"""asyncopd.estimators.stability: StableOPD monitors and the divergence to the reference."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asyncopd.estimators import (LOG_RATIO_GUARD, forward_kl_exact, ngram_repetition, reference_kl_exact,
                                 reference_kl_penalty, reverse_kl_exact, truncation_rate)


def ones(n):
    return torch.ones(n, dtype=torch.bool)


def test_truncation_rate_hand_values():
    assert truncation_rate(["stop", "length", "length", "stop"]) == 0.5
    assert truncation_rate(["length"] * 3) == 1.0
    assert truncation_rate([]) == 0.0
    assert truncation_rate(torch.tensor([True, False, False, False, False])) == 0.2
    assert truncation_rate(torch.zeros(0, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError, match="'stop' or 'length'"):
        truncation_rate(["stop", "eos"])
    with pytest.raises(ValueError, match="must be bool"):
        truncation_rate(torch.tensor([1, 0]))


def test_ngram_repetition_hand_values():
    assert ngram_repetition([1, 2, 3, 4, 5], n=2) == 0.0                   # 4 distinct bigrams
    assert ngram_repetition([1, 1, 1, 1, 1], n=2) == 0.75                  # (1,1) ×4: 3 repeats
    assert ngram_repetition([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(3 / 5)   # 12 21 12 21 12
    assert ngram_repetition(torch.tensor([7, 8, 9, 7, 8, 9, 7]), n=3) == pytest.approx(2 / 5)  # 789 897 978 789 897
    assert ngram_repetition([5, 5, 6], n=1) == pytest.approx(1 / 3)
    assert ngram_repetition([1, 2, 3], n=3) == 0.0                         # exactly one n-gram
    assert ngram_repetition([1, 2], n=3) == 0.0 and ngram_repetition([], n=1) == 0.0   # shorter than n
    with pytest.raises(ValueError, match="n must be >= 1"):
        ngram_repetition([1, 2], n=0)
    with pytest.raises(ValueError, match="1-D"):
        ngram_repetition(torch.zeros(2, 3, dtype=torch.long))


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 5))
def test_ngram_repetition_bounds(ids, n):
    rate = ngram_repetition(ids, n=n)
    total = len(ids) - n + 1
    if total <= 0:
        assert rate == 0.0
    else:
        assert 0.0 <= rate <= (total - 1) / total
        distinct = len({tuple(ids[i:i + n]) for i in range(total)})
        assert rate == pytest.approx((total - distinct) / total)           # repeats = occurrences − distinct


def test_reference_kl_penalty_hand_values():
    student, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    x = student.clone().requires_grad_(True)
    out = reference_kl_penalty(x, ref, ones(2))
    out.loss.backward()
    r = math.log(0.5)                                                       # ref − θ on the first token
    assert out.loss.item() == pytest.approx((math.exp(r) - r - 1) / 2, abs=1e-6)   # second token: r = 0
    assert out.metrics["k1"] == pytest.approx(-r / 2, abs=1e-6)
    assert torch.allclose(x.grad, torch.tensor([(1 - math.exp(r)) / 2, 0.0]), atol=1e-6)  # (1 − e^r)/N
    same = reference_kl_penalty(student, student.clone(), ones(2))
    assert same.loss.item() == 0.0


def test_reference_kl_k3_is_unbiased_and_its_gradient_is_the_forward_kls():
    # exact expectation over the student's own distribution: Σ_y π_θ(y) k3(y) = KL(π_θ‖π_ref), and
    # Σ_y π_θ(y) ∇k3(y) = ∇ KL(π_ref‖π_θ) (the documented direction of the pathwise k3 gradient)
    g = torch.Generator().manual_seed(0)
    z, ref_logits = torch.randn(6, generator=g), torch.randn(6, generator=g)
    p, logr = torch.softmax(z, -1), torch.log_softmax(ref_logits, -1)
    value, grad = 0.0, torch.zeros(6)
    for y in range(6):
        zz = z.clone().requires_grad_(True)
        out = reference_kl_penalty(torch.log_softmax(zz, -1)[y:y + 1], logr[y:y + 1], ones(1))
        out.loss.backward()
        value += p[y].item() * out.loss.item()
        grad += p[y] * zz.grad
    assert value == pytest.approx(reverse_kl_exact(z[None], ref_logits[None], ones(1)).loss.item(), abs=1e-5)
    zx = z[None].clone().requires_grad_(True)
    forward_kl_exact(zx, ref_logits[None], ones(1)).loss.backward()
    assert torch.allclose(grad, zx.grad[0], atol=1e-6)


def test_reference_kl_penalty_masks_and_guards():
    student = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.tensor([-1.5, float("nan"), -3.0 + 1000.0])
    mask = torch.tensor([True, False, True])
    x = student.clone().requires_grad_(True)
    out = reference_kl_penalty(x, ref, mask)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(x.grad).all() and x.grad[1] == 0
    G = LOG_RATIO_GUARD
    assert out.loss.item() == pytest.approx((math.expm1(-0.5) + 0.5 + math.expm1(G) - G) / 2, rel=1e-5)
    assert out.metrics["guard_frac"] == 0.5


@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0)), min_size=1, max_size=20))
def test_reference_kl_penalty_is_non_negative(pairs):
    student, ref = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
    assert reference_kl_penalty(student, ref, ones(len(pairs))).loss.item() >= 0.0


def test_reference_kl_exact_is_reverse_kl_to_reference():
    s, ref = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.75, 0.25]]))
    assert reference_kl_exact(s, ref, ones(1), chunk_size=1).loss.item() == pytest.approx(0.5 * math.log(4 / 3),
                                                                                          abs=1e-6)
