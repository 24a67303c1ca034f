"""Trajectory and Batch: derived versions, staleness, and validation."""

import pytest
import torch

from asyncopd.rollout import Batch, Trajectory


def make(uid, versions, finish="stop"):
    n = len(versions)
    return Trajectory.from_tokens(uid, torch.tensor([1, 2]), torch.arange(n), torch.zeros(n),
                                  torch.tensor(versions, dtype=torch.int64), finish)


def test_in_flight_update_uses_oldest_version():
    traj = make(7, [3, 3, 4, 5])
    assert (traj.behav_version, traj.newest_version, traj.n_tokens) == (3, 5, 4)


def test_batch_staleness_per_trajectory():
    batch = Batch([make(0, [2, 2]), make(1, [0, 1, 2]), Trajectory.fake(2, 5, behav_version=4)], version=4)
    assert batch.staleness == [2, 4, 0]
    assert batch.n_tokens == 10 and len(batch) == 3


def test_batch_rejects_future_trajectory():
    with pytest.raises(ValueError, match="future version"):
        Batch([Trajectory.fake(0, 3, behav_version=5)], version=4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(uid=0, behav_version=-1, n_tokens=3), "behav_version"),
    (dict(uid=0, behav_version=0, n_tokens=-2), "n_tokens"),
    (dict(uid=0, behav_version=0, n_tokens=2, finish_reason="eos"), "finish_reason"),
    (dict(uid=0, behav_version=0, n_tokens=2, response_ids=torch.arange(3)), "response_ids"),
    (dict(uid=0, behav_version=2, n_tokens=2, token_versions=torch.tensor([2, 1])), "behav_version"),
])
def test_trajectory_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Trajectory(**kwargs)
