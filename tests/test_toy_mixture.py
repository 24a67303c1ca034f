"""StableOPD's rollout mixture in the lockstep toy run: which rollouts the learner gets, what the monitors see."""

import pandas as pd
import pytest
import torch

from asyncopd import trace
from backends.run import RunConfig, run
from backends.lockstep import MIXTURE_UID0
from backends.toy import ToyConfig, build_models
from backends.toy_learner import ToyLearner
from backends.toy_models import response_logits
from test_toy_run import TINY, reproducible, tiny

B, M = TINY["batch_size"], 2                     # mixture_frac 0.25 of a batch of 8: 2 teacher rollouts


@pytest.fixture
def learner_batches(monkeypatch):
    """Every Batch the learner is stepped on, in order."""
    seen, step = [], ToyLearner.step

    def spy(self, batch, scores):
        seen.append(batch)
        return step(self, batch, scores)
    monkeypatch.setattr(ToyLearner, "step", spy)
    return seen


def test_mixture_batch_is_student_rollouts_then_teacher_samples(model_cache, tmp_path, learner_batches):
    cfg = tiny(model_cache, toy={"mixture_frac": 0.25}, steps=4)        # fixed:2 staleness
    df = run(cfg, tmp_path)
    task, teacher, _, _ = build_models(cfg.toy)
    assert len(learner_batches) == 4
    def prompt(uid):                                                       # the session's prompt of a uid
        return task.make_prompts(B, seed=cfg.seed * 1_000_003 + uid // B)[uid % B]
    for v, batch in enumerate(learner_batches):                            # admitted student uids, then the
        uids = [*range(v * (B - M), (v + 1) * (B - M)), *range(MIXTURE_UID0 + v * M, MIXTURE_UID0 + (v + 1) * M)]
        assert [t.uid for t in batch.trajs] == uids                        # teacher's, never admitted
        assert all(torch.equal(t.prompt_ids, prompt(u)) for t, u in zip(batch.trajs, uids, strict=True))
        mixed = batch.trajs[B - M:]
        with torch.no_grad():                                              # the teacher's own T = 1 log-probs
            logp = response_logits(teacher, mixed, task.pad_id).log_softmax(-1)
        ids = torch.cat([t.response_ids for t in mixed])
        torch.testing.assert_close(torch.cat([t.behav_logp for t in mixed]), logp.gather(1, ids[:, None])[:, 0])
        assert {t.behav_version for t in mixed} == {0}                    # the teacher's weights never change

    trained = df[df.step > 0]
    student = [b.trajs[:B - M] for b in learner_batches]
    lengths = lambda ts: sum(t.n_tokens for t in ts) / len(ts)            # noqa: E731
    assert trained.mixture_frac.tolist() == [0.25] * 4
    assert trained.response_len_mean.tolist() == pytest.approx([lengths(s) for s in student])
    assert trained.mixture_len_mean.tolist() == pytest.approx([lengths(b.trajs[B - M:]) for b in learner_batches])
    assert trained.n_tokens.tolist() == [b.n_tokens for b in learner_batches]      # the learner saw all B
    # staleness of the student's rollouts only (teacher samples, version 0, would read 3 at the last step)
    assert trained.staleness_max.tolist() == [0, 1, 2, 2]
    assert trained.mixture_accuracy.tolist() == pytest.approx([
        sum(task.verify(t.prompt_ids, t.response_ids) for t in b.trajs[B - M:]) / M for b in learner_batches])
    events = trace.read(tmp_path / "trace.csv")
    assert (events.kind == "rollout").sum() == (events.kind == "admit").sum() == 4 * (B - M)
    assert events[events.kind == "teacher"].n_seqs.tolist() == [B] * 4


def test_mixture_run_is_reproducible_and_plain_run_records_frac_zero(model_cache, tmp_path):
    a = run(tiny(model_cache, toy={"mixture_frac": 0.25}, steps=3), tmp_path / "a")
    b = run(tiny(model_cache, toy={"mixture_frac": 0.25}, steps=3), tmp_path / "b")
    pd.testing.assert_frame_equal(reproducible(a), reproducible(b), check_exact=True)
    plain = run(tiny(model_cache, steps=3), tmp_path / "plain")
    assert plain[plain.step > 0].mixture_frac.tolist() == [0.0] * 3 and "mixture_len_mean" not in plain


def test_n_mixture_is_the_rounded_share_of_the_batch():
    assert ToyConfig().n_mixture == 0
    assert ToyConfig(mixture_frac=0.25).n_mixture == 16                   # of the default 64
    assert ToyConfig(mixture_frac=0.5, batch_size=8).n_mixture == 4
    assert ToyConfig(mixture_frac=0.3, batch_size=10).n_mixture == 3


@pytest.mark.parametrize("frac, batch_size, match", [
    (-0.1, 64, r"toy.mixture_frac must be in \[0, 1\)"), (1.0, 64, r"toy.mixture_frac must be in \[0, 1\)"),
    (0.05, 8, r"toy.mixture_frac=0.05 gives .* = 0 teacher rollouts"),
    (0.95, 8, r"toy.mixture_frac=0.95 gives .* = 8 teacher rollouts"),
])
def test_mixture_frac_rejected_naming_the_field(frac, batch_size, match):
    with pytest.raises(ValueError, match=match):
        ToyConfig(mixture_frac=frac, batch_size=batch_size)


def test_schedule_replay_rejects_the_mixture():
    with pytest.raises(ValueError, match="mixture_frac > 0 runs with exec=lockstep staleness=fixed"):
        RunConfig(staleness="schedule:any.json", toy=ToyConfig(mixture_frac=0.25))
