"""ToyLearner: packing is exact, a step lowers the estimator's KL on a fixed batch, VCPO scales the LR."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from asyncopd.objective import ObjectiveConfig
from asyncopd.rollout import Batch
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_models import response_logits
from backends.toy_teacher import ToyTeacher

V = 8


def model(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=V - 1)
    return GPT2LMHeadModel(cfg)


@pytest.fixture
def batch_and_models():
    student, teacher = model(0), model(1)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(20)             # a peaked teacher: a KL worth reducing
    engine = ToyRolloutEngine(student, max_batch=4, max_new_tokens=6, eos_id=V - 1, seed=3, capture_samples=4)
    prompts = [torch.tensor([1, 2, 3][:n]) for n in (1, 2, 3, 2, 1, 3)]
    trajs = engine.generate(prompts, list(range(6)))
    return Batch(trajs, version=0), student, teacher


def test_response_logits_match_per_trajectory_forward(batch_and_models):
    batch, student, _ = batch_and_models
    packed = response_logits(student, batch.trajs, pad_id=0)
    singles = []
    for t in batch.trajs:
        logits = student(torch.cat([t.prompt_ids, t.response_ids])[None]).logits[0]
        singles.append(logits[len(t.prompt_ids) - 1: len(t.prompt_ids) - 1 + t.n_tokens])
    assert torch.allclose(packed, torch.cat(singles), atol=1e-5)


@pytest.mark.parametrize("objective", [
    ObjectiveConfig("forward_kl_topk", topk=4), ObjectiveConfig("reverse_kl_topk", topk=V),
    ObjectiveConfig("reverse_kl_mc", n_samples=4),
])
def test_steps_on_a_fixed_batch_lower_the_kl(batch_and_models, objective):
    batch, student, teacher_model = batch_and_models
    from asyncopd.objective import cache_layout
    topk, M = cache_layout(objective)
    scores = ToyTeacher(teacher_model).score(batch.trajs, topk=topk, n_samples=M)
    learner = ToyLearner(student, objective, lr=1e-2, pad_id=0)
    kls = [learner.step(batch, scores)["kl"] for _ in range(15)]
    assert kls[-1] < 0.7 * kls[0], kls


def test_vcpo_scales_lr_by_ess_fraction(batch_and_models):
    batch, student, teacher_model = batch_and_models
    for t in batch.trajs:                                   # pretend the sampler was far from the student
        t.behav_logp = t.behav_logp - torch.linspace(0, 3, t.n_tokens)
    scores = ToyTeacher(teacher_model).score(batch.trajs, topk=0, n_samples=0)
    objective = ObjectiveConfig("reverse_kl_sampled", signal="stale", correction="is")
    m = ToyLearner(student, objective, lr=1e-3, pad_id=0, vcpo_lr=True).step(batch, scores)
    assert 0 < m["ess_frac"] < 0.95
    assert m["lr"] == pytest.approx(1e-3 * m["ess_frac"])


def test_nonfinite_loss_raises_before_the_weights_move(batch_and_models):
    batch, student, teacher_model = batch_and_models
    scores = ToyTeacher(teacher_model).score(batch.trajs, topk=2, n_samples=0)
    scores[0].topk_logp = scores[0].topk_logp.clone()
    scores[0].topk_logp[0, 0] = float("nan")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    learner = ToyLearner(student, ObjectiveConfig("forward_kl_topk", topk=2), lr=1e-2, pad_id=0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        learner.step(batch, scores)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
