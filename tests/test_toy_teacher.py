"""ToyTeacher: batched, padded scoring equals one-by-one forwards; top-k, tail mass and MC samples are exact."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from asyncopd.rollout import Trajectory
from backends.toy_engine import ToyRolloutEngine
from backends.toy_teacher import ToyTeacher

V = 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=17, eos_token_id=19,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def make_trajs(n: int, M: int = 3, seed: int = 0) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for uid in range(n):
        P, L = (int(torch.randint(1, 12, (1,), generator=g)) for _ in range(2))
        trajs.append(Trajectory.from_tokens(
            uid, torch.randint(0, V, (P,), generator=g), torch.randint(0, V, (L,), generator=g),
            -torch.rand(L, generator=g), torch.zeros(L, dtype=torch.long), "stop",
            sample_ids=torch.randint(0, V, (L, M), generator=g), sample_behav_logp=-torch.rand(L, M, generator=g)))
    return trajs


def unbatched_logp(model, t: Trajectory) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.cat([t.prompt_ids, t.response_ids])[None]).logits[0]
    P = len(t.prompt_ids)
    return torch.log_softmax(logits[P - 1:-1], -1)  # [L, V]


def test_batched_scores_equal_one_by_one_forward(model):
    trajs = make_trajs(7)
    scores = ToyTeacher(model, batch_size=3, version=5).score(trajs, topk=4, n_samples=2)  # 3 padded batches
    assert len(scores) == len(trajs)
    for t, s in zip(trajs, scores):
        logp = unbatched_logp(model, t)
        assert s.teacher_version == 5 and s.n_tokens == t.n_tokens
        sampled = logp.gather(1, t.response_ids[:, None]).squeeze(1)
        torch.testing.assert_close(s.sampled_logp, sampled, atol=1e-5, rtol=0)
        top = torch.topk(logp, 4, -1)
        assert torch.equal(s.topk_ids, top.indices)
        torch.testing.assert_close(s.topk_logp, top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.tail_mass + s.topk_logp.exp().sum(-1), torch.ones(t.n_tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(s.tail_mass, 1 - logp.exp().gather(1, top.indices).sum(-1), atol=1e-5, rtol=0)
        assert torch.equal(s.sample_ids, t.sample_ids[:, :2])
        torch.testing.assert_close(s.sample_logp, logp.gather(1, t.sample_ids[:, :2]), atol=1e-5, rtol=0)
        assert torch.equal(s.sampler_logp, t.sample_behav_logp[:, :2])


def test_teacher_equal_to_the_sampler_reproduces_behaviour_logp(model):
    """Scoring the engine's own rollouts with the same weights at T = 1: teacher log-probs == behaviour log-probs."""
    engine = ToyRolloutEngine(model, max_batch=3, max_new_tokens=6, eos_id=19, capture_topk=3, capture_samples=2)
    trajs = engine.generate([torch.tensor([17, 1, 2, 18]), torch.tensor([5]), torch.tensor([3, 3, 9, 1, 0, 2])], [0, 1, 2])
    for t, s in zip(trajs, ToyTeacher(model, batch_size=2).score(trajs, topk=3, n_samples=2)):
        torch.testing.assert_close(s.sampled_logp, t.behav_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.sample_logp, s.sampler_logp, atol=1e-5, rtol=0)
        assert torch.equal(s.topk_ids, t.student_topk_ids)


def test_full_topk_has_zero_tail_and_optional_fields_are_none(model):
    trajs = make_trajs(3, seed=1)
    full = ToyTeacher(model).score(trajs, topk=V, n_samples=0)
    for s in full:
        assert s.sample_ids is None and s.sampler_logp is None
        torch.testing.assert_close(s.tail_mass, torch.zeros(s.n_tokens), atol=1e-5, rtol=0)
    bare = ToyTeacher(model).score(trajs, topk=0, n_samples=0)
    assert all(s.topk_ids is None and s.tail_mass is None for s in bare)
    torch.testing.assert_close(bare[0].sampled_logp, full[0].sampled_logp)


def test_missing_samples_and_bad_arguments_error_clearly(model):
    teacher = ToyTeacher(model)
    no_samples = [Trajectory.from_tokens(0, torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([-1.0]),
                                         torch.tensor([0]), "stop")]
    with pytest.raises(ValueError, match="capture_samples"):
        teacher.score(no_samples, topk=2, n_samples=1)
    with pytest.raises(ValueError, match="capture_samples"):
        teacher.score(make_trajs(1, M=2), topk=2, n_samples=3)
    with pytest.raises(ValueError, match="topk"):
        teacher.score(no_samples, topk=V + 1, n_samples=0)
    with pytest.raises(ValueError, match="Trajectory.fake"):
        teacher.score([Trajectory.fake(0, 3, 0)], topk=1, n_samples=0)
