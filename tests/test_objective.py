"""The objective layer: config validation, cache layout, and that opd_loss wires each estimator to the right
cache fields (checked against independent computations on full distributions)."""

import dataclasses

import pytest
import torch

from asyncopd.cache import TeacherScores
from asyncopd.estimators import chunk_rows, forward_kl_exact, logit_grad_sq, reverse_kl_exact, token_logp
from asyncopd.objective import (TRAINABLE, ObjectiveConfig, add_reference_penalty, cache_layout, flat_inputs, opd_loss,
                                sampled_term, vocab_term)

V = 5


def scores_from_full(teacher_logits, ids, k, sample_ids=None, sampler_logp=None):
    """A cache entry built from the full teacher distribution, split into two trajectories (3 + N-3 tokens)."""
    logp = teacher_logits.log_softmax(-1)
    top = logp.topk(k, -1)
    out = []
    for sl in (slice(0, 3), slice(3, None)):
        extra = {}
        if sample_ids is not None:
            extra = dict(sample_ids=sample_ids[sl], sample_logp=logp[sl].gather(1, sample_ids[sl]),
                         sampler_logp=None if sampler_logp is None else sampler_logp[sl])
        out.append(TeacherScores(sampled_logp=logp[sl].gather(1, ids[sl, None]).squeeze(1),
                                 topk_ids=top.indices[sl], topk_logp=top.values[sl], **extra))
    return out


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, V, generator=g, requires_grad=True)
    teacher = torch.randn(7, V, generator=g) * 2
    ids = torch.randint(0, V, (7,), generator=g)
    return student, teacher, ids, torch.ones(7, dtype=torch.bool)


def test_cache_layout_per_estimator():
    assert cache_layout(ObjectiveConfig("forward_kl_topk", topk=16)) == (16, 0)
    assert cache_layout(ObjectiveConfig("reverse_kl_sampled", topk=16)) == (0, 0)
    assert cache_layout(ObjectiveConfig("reverse_kl_mc", n_samples=8)) == (0, 8)


def test_forward_topk_with_full_support_equals_exact(case):
    student, teacher, ids, mask = case
    cache = flat_inputs(scores_from_full(teacher, ids, k=V))
    out = opd_loss(ObjectiveConfig("forward_kl_topk", topk=V, chunk_bytes=2 * 4 * V), student, ids, cache, mask)
    ref = forward_kl_exact(student, teacher, mask)
    g1, = torch.autograd.grad(out.loss, student)
    g2, = torch.autograd.grad(ref.loss, student)
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_reverse_topk_with_full_support_equals_exact(case):
    student, teacher, ids, mask = case
    cache = flat_inputs(scores_from_full(teacher, ids, k=V))
    out = opd_loss(ObjectiveConfig("reverse_kl_topk", topk=V), student, ids, cache, mask)
    assert out.loss.item() == pytest.approx(reverse_kl_exact(student, teacher, mask).loss.item(), abs=1e-6)


def test_sampled_stale_signal_uses_behaviour_logp(case):
    student, teacher, ids, mask = case
    cache = flat_inputs(scores_from_full(teacher, ids, k=2))
    behav = torch.full((7,), -1.0)
    out = opd_loss(ObjectiveConfig("reverse_kl_sampled", signal="stale"), student, ids, cache, mask,
                   behav_logp=behav)
    expected_kl = (behav - cache["teacher_logp"]).mean().item()      # k1 estimate with log π_β
    assert out.metrics["kl"] == pytest.approx(expected_kl, abs=1e-6)
    # gradient: −mean(A_t ∇ log π_θ(y_t)) with A_t = log π_T − log π_β
    theta = student.log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
    g_ref, = torch.autograd.grad(-((cache["teacher_logp"] - behav) * theta).mean(), student)
    g, = torch.autograd.grad(out.loss, student)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_mc_reads_sampler_logp_when_present(case):
    student, teacher, ids, mask = case
    g = torch.Generator().manual_seed(1)
    sample_ids = torch.randint(0, V, (7, 4), generator=g)
    cfg = ObjectiveConfig("reverse_kl_mc", n_samples=4)
    fresh = opd_loss(cfg, student, ids, flat_inputs(scores_from_full(teacher, ids, 2, sample_ids)), mask)
    sampler = student.detach().log_softmax(-1).gather(1, sample_ids)     # stale sampler == student: weights 1
    stale = opd_loss(cfg, student, ids, flat_inputs(scores_from_full(teacher, ids, 2, sample_ids, sampler)), mask)
    assert stale.metrics["rho_mean"] == pytest.approx(1.0, abs=1e-6)
    off = sampler - 3.0 * torch.arange(4.0)                               # a sampler unlike the student
    skewed = opd_loss(cfg, student, ids, flat_inputs(scores_from_full(teacher, ids, 2, sample_ids, off)), mask)
    assert skewed.metrics["ess_frac"] < 0.5 < fresh.metrics["ess_frac"] == pytest.approx(1.0)


def test_reference_penalty_adds_coef_times_k3(case):
    student, teacher, ids, mask = case
    cache = flat_inputs(scores_from_full(teacher, ids, k=2))
    ref_logp = torch.full((7,), -1.5)
    base = opd_loss(ObjectiveConfig("forward_kl_topk", topk=2), student, ids, cache, mask)
    pen = opd_loss(ObjectiveConfig("forward_kl_topk", topk=2, ref_kl_coef=0.5), student, ids, cache, mask,
                   ref_logp=ref_logp)
    theta = student.detach().log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
    r = ref_logp - theta
    k3 = (r.exp() - r - 1).mean().item()
    assert pen.metrics["ref_kl"] == pytest.approx(k3, rel=1e-5)
    assert pen.loss.item() == pytest.approx(base.loss.item() + 0.5 * k3, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        opd_loss(ObjectiveConfig("forward_kl_topk", topk=2, ref_kl_coef=0.5), student, ids, cache, mask)


COMPOSED = {   # every TRAINABLE estimator, the sampled one with a correction and with VCPO's baseline
    "forward_kl_topk": ObjectiveConfig("forward_kl_topk", topk=2, tail="renorm", chunk_bytes=3 * 4 * V),
    "reverse_kl_topk": ObjectiveConfig("reverse_kl_topk", topk=3, chunk_bytes=2 * 4 * V),
    "reverse_kl_sampled": ObjectiveConfig("reverse_kl_sampled", signal="stale", correction="m2po", m2po_tau=0.01),
    "reverse_kl_sampled_vcpo": ObjectiveConfig("reverse_kl_sampled", correction="tis", baseline="vcpo",
                                               chunk_bytes=2 * 4 * V),
    "reverse_kl_mc": ObjectiveConfig("reverse_kl_mc", n_samples=4, chunk_bytes=4 * 4 * V),
}
assert {c.estimator for c in COMPOSED.values()} == set(TRAINABLE)


@pytest.mark.parametrize("ref_kl_coef", [0.0, 0.5])
@pytest.mark.parametrize("name", list(COMPOSED))
def test_opd_loss_is_the_composition_of_its_three_pieces(case, name, ref_kl_coef):
    """opd_loss is sampled_term or vocab_term, then add_reference_penalty, bit for bit: the chunked FSDP head
    composes the same pieces, so the two learners cannot drift apart."""
    student, teacher, ids, mask = case
    mask = mask.clone()
    mask[4] = False
    cfg = dataclasses.replace(COMPOSED[name], ref_kl_coef=ref_kl_coef)
    g = torch.Generator().manual_seed(2)
    sample_ids = torch.randint(0, V, (7, 4), generator=g)
    sampler = torch.randn(7, V, generator=g).log_softmax(-1).gather(1, sample_ids)
    cache = flat_inputs(scores_from_full(teacher, ids, min(cfg.topk, V), sample_ids, sampler))
    theta0 = student.detach().log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
    behav = (theta0 + 0.3 * torch.randn(7, generator=g)).clamp_max(0)
    ref_logp = (theta0 + 0.3 * torch.randn(7, generator=g)).clamp_max(0)
    got = opd_loss(cfg, student, ids, cache, mask, behav_logp=behav, ref_logp=ref_logp)
    got_grad, = torch.autograd.grad(got.loss, student)

    c = chunk_rows(V, cfg.chunk_bytes)
    theta = token_logp(student, ids, mask, chunk_size=c)
    if cfg.estimator == "reverse_kl_sampled":
        grad_sq = logit_grad_sq(student, ids, mask, chunk_size=c) if cfg.baseline == "vcpo" else None
        want = sampled_term(cfg, theta, cache["teacher_logp"], mask, behav_logp=behav, grad_sq=grad_sq)
    else:
        want = vocab_term(cfg, student, cache, mask)
    want = add_reference_penalty(cfg, want, theta, ref_logp, mask)
    want_grad, = torch.autograd.grad(want.loss, student)
    assert torch.equal(got.loss, want.loss) and torch.equal(got_grad, want_grad)
    assert got.metrics == want.metrics and ("ref_kl" in got.metrics) == (ref_kl_coef > 0)


def test_vocab_term_refuses_the_sampled_estimator(case):
    student, teacher, ids, mask = case
    with pytest.raises(ValueError, match="sampled_term"):
        vocab_term(ObjectiveConfig("reverse_kl_sampled"), student, flat_inputs(scores_from_full(teacher, ids, 2)),
                   mask)


def test_token_logp_chunked_matches_log_softmax(case):
    student, _, ids, mask = case
    mask = mask.clone()
    mask[2] = False
    got = token_logp(student, ids, mask, chunk_size=3)
    want = torch.where(mask, student.log_softmax(-1).gather(1, ids[:, None]).squeeze(1), 0.0)
    assert torch.allclose(got, want, atol=1e-6)
    g1, = torch.autograd.grad(got.sum(), student)
    g2, = torch.autograd.grad(want.sum(), student)
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(estimator="forward_kl_exact"), "estimator"), (dict(tail="top"), "tail"), (dict(signal="old"), "signal"),
    (dict(correction="vtrace"), "correction"), (dict(topk=0), "topk"), (dict(is_cap=1.0), "is_cap"),
    (dict(clip_eps=1.5), "clip_eps"), (dict(n_samples=0), "n_samples"), (dict(ref_kl_coef=-1.0), "ref_kl_coef"),
    (dict(estimator="reverse_kl_mc", n_samples=1), "n_samples"), (dict(chunk_bytes=0), "chunk_bytes"),
])
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ObjectiveConfig(**kwargs)
