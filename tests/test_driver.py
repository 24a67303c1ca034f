"""asyncopd.driver: each scheduler call writes exactly its trace event, on hand-built trajectories and a fake clock."""

import json

import torch

from asyncopd.driver import Driver, split
from asyncopd.rollout import Batch, Trajectory
from asyncopd.scheduler import Scheduler, SchedulerConfig
from asyncopd.trace import Recorder


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(B=1, eta=1, on_stale="drop") -> Driver:
    """A driver over a fresh scheduler, recording on a fake clock (d.rec.clock.t = ... moves time)."""
    return Driver(Scheduler(SchedulerConfig(batch_size=B, max_staleness=eta, on_stale=on_stale)), Recorder(Clock()))


def rows(d: Driver, *kinds):
    return [(e.t, e.dur_s, e.kind, e.worker, e.version, e.uid, e.n_seqs, e.tokens, e.staleness)
            for e in d.rec.events if not kinds or e.kind in kinds]


def in_flight_updated(uid: int, token_versions: list[int]) -> Trajectory:
    n = len(token_versions)
    return Trajectory.from_tokens(uid, torch.zeros(2, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                                  torch.zeros(n), torch.tensor(token_versions), "stop")


def train(d: Driver, dt: float = 1.0):
    """Take the batch and train it for dt seconds on the driver's clock: (batch, new version, dropped uids)."""
    batch, clock = d.next_batch(), d.rec.clock
    t0 = clock.t
    clock.t += dt
    return batch, *d.stepped(batch, t0)


def test_admit_numbers_uids_and_writes_admit_events():
    d = make(B=2, eta=1)                                  # capacity (η+1)·B = 4 at version 0
    got = []
    for w in (3, 1, 0, 2):
        d.rec.clock.t += 0.5
        got.append(d.admit(worker=w))
    assert got == [(0, 0), (1, 0), (2, 0), (3, 0)] and d.next_uid == 4
    assert rows(d) == [(0.5 * (i + 1), 0.0, "admit", w, 0, i, 0, 0, 0.0) for i, w in enumerate((3, 1, 0, 2))]
    assert all(e.role == "scheduler" for e in d.rec.events)


def test_refused_admission_writes_nothing():
    d = make(B=2, eta=0)                                      # capacity B = 2
    assert d.admit() == (0, 0) and d.admit() == (1, 0)
    before = list(d.rec.events)
    assert d.admit() is None and d.admit(worker=5) is None
    assert d.rec.events == before and d.next_uid == 2 and d.sched.n_admitted == 2


def test_drops_on_arrival_and_after_a_step_are_traced_and_returned():
    # after a step: B=1, η=2; u0,u1,u2 admitted at v0; u0 trained (v→1); u3 at v1 trained (v→2); u1,u2 arrive
    # at v2 (staleness 2 = η, kept); u1 is trained, and the step to v3 makes u2 too stale
    d = make(B=1, eta=2)
    assert [d.admit() for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert d.done(Trajectory.fake(0, 5, 0)) == []
    batch, v, dropped = train(d)
    assert [t.uid for t in batch.trajs] == [0] and (v, dropped) == (1, [])
    assert d.admit() == (3, 1) and d.done(Trajectory.fake(3, 7, 1)) == []
    assert train(d)[1:] == (2, [])
    assert d.admit() == (4, 2)
    assert d.done(Trajectory.fake(1, 4, 0)) == [] and d.done(Trajectory.fake(2, 6, 0)) == []
    n = len(d.rec.events)
    d.rec.clock.t = 10.0
    batch, v, dropped = train(d, dt=2.0)
    assert [t.uid for t in batch.trajs] == [1] and (v, dropped) == (3, [2])
    # the learner_step span first, then the drop its new version caused
    assert rows(d)[n:] == [(10.0, 2.0, "learner_step", 0, 3, -1, 1, 4, 2.0),
                           (12.0, 0.0, "drop", 0, 0, 2, 0, 0, 3.0)]
    assert d.sched.n_dropped == 1 and d.summary()["staleness_hist"] == {0: 2, 2: 1}

    # drop on arrival: B=1, η=1; u1 (v0) comes back after two steps
    d = make(B=1, eta=1)
    assert [d.admit() for _ in range(2)] == [(0, 0), (1, 0)]
    d.done(Trajectory.fake(0, 3, 0))
    assert train(d)[1:] == (1, [])
    assert d.admit() == (2, 1)
    d.done(Trajectory.fake(2, 3, 1))
    assert train(d)[1:] == (2, [])
    d.rec.clock.t = 7.5
    n = len(d.rec.events)
    assert d.done(Trajectory.fake(1, 3, 0)) == [1]
    assert rows(d)[n:] == [(7.5, 0.0, "drop", 0, 0, 1, 0, 0, 2.0)]


def test_wait_mode_never_drops():
    d = make(B=1, eta=1, on_stale="wait")
    assert [d.admit() for _ in range(2)] == [(0, 0), (1, 0)]
    assert d.done(Trajectory.fake(1, 3, 0)) == []
    assert train(d)[1:] == (1, [])
    assert d.next_batch() is None                                # u0 is older and still in flight: wait
    assert d.done(Trajectory.fake(0, 3, 0)) == []
    assert not rows(d, "drop")


def test_stepped_writes_one_learner_step_event():
    d = make(B=3, eta=1)
    for _ in range(6):
        d.admit()
    for uid, n in ((0, 4), (1, 6), (2, 5)):
        d.done(Trajectory.fake(uid, n, 0))
    batch, v, _ = train(d, dt=1.5)
    for uid, n in ((3, 2), (4, 8), (5, 1)):
        d.done(Trajectory.fake(uid, n, 0))
    d.rec.clock.t = 4.0
    batch = d.next_batch()
    assert d.stepped(batch, 3.0, dur_s=0.25, worker=2) == (2, [])   # ran elsewhere: the span is given
    assert rows(d, "learner_step") == [(0.0, 1.5, "learner_step", 0, 1, -1, 3, 15, 0.0),
                                       (3.0, 0.25, "learner_step", 2, 2, -1, 3, 11, 1.0)]
    assert d.rec.events[-1].role == "learner"
    s = d.summary()
    assert {k: s[k] for k in ("staleness_hist", "staleness_in_flight_mean", "staleness_in_queue_mean")} == {
        "staleness_hist": {0: 3, 1: 3}, "staleness_in_flight_mean": 0.0, "staleness_in_queue_mean": 0.5}
    # lengths 4 6 5 trained at staleness 0, then 2 8 1 at staleness 1; nothing dropped: no skew
    assert s["len_generated_mean"] == s["len_trained_mean"] == 26 / 6
    assert (s["len_trained_p50"], s["len_trained_p90"]) == (4, 8)            # nearest rank of 1 2 4 5 6 8
    assert s["length_w1"] == s["length_ks"] == s["length_bias"] == s["drop_rate"] == s["wasted_token_frac"] == 0
    assert s["staleness_by_length"] == {"[1, 2)": 1.0, "[2, 4)": 1.0, "[4, 8)": 0.0, "[8, 16)": 1.0}


def test_staleness_split_with_in_flight_updates():
    traj = in_flight_updated(7, [0, 0, 1, 2])
    assert (traj.behav_version, traj.newest_version) == (0, 2)
    assert split(Batch([traj], version=3)) == {"staleness_mean": 3.0, "staleness_in_flight": 2.0,
                                               "staleness_in_queue": 1.0}
    # through the driver: B=1, η=3; u0,u2,u3 (v0, no in-flight update) are trained at v0,1,2, then u1, whose
    # weights moved to 1 and 2 while it was generated, at v3
    d = make(B=1, eta=3)
    assert [d.admit() for _ in range(4)] == [(i, 0) for i in range(4)]
    for uid in (0, 2, 3):
        d.done(Trajectory.fake(uid, 4, 0))
        train(d)
    d.done(in_flight_updated(1, [0, 0, 1, 2]))
    batch, v, dropped = train(d)
    assert batch.version == 3 and (v, dropped) == (4, [])
    assert rows(d, "learner_step")[-1][-1] == 3.0
    s = d.summary()
    assert {k: s[k] for k in ("staleness_hist", "staleness_in_flight_mean", "staleness_in_queue_mean")} == {
        "staleness_hist": {0: 1, 1: 1, 2: 1, 3: 1},
        "staleness_in_flight_mean": 2 / 4,                                       # only u1: 2
        "staleness_in_queue_mean": (0 + 1 + 2 + 1) / 4}


def test_state_restore_round_trips_through_json():
    d = make(B=2, eta=1)
    for _ in range(4):
        d.admit()
    d.done(Trajectory.fake(0, 3, 0))
    d.done(Trajectory.fake(1, 3, 0))
    train(d)
    d.done(Trajectory.fake(2, 3, 0))
    d.done(Trajectory.fake(3, 3, 0))
    train(d)
    state = json.loads(json.dumps(d.state()))
    assert state == d.state() and state["staleness_hist"] == {"0": 2, "1": 2} and state["next_uid"] == 4
    resumed = Driver(Scheduler(d.sched.cfg, version=d.sched.version), Recorder(Clock()))
    resumed.restore(state)
    assert resumed.state() == d.state()
    assert resumed.summary() == d.summary()
    assert {k: d.summary()[k] for k in ("staleness_hist", "staleness_in_flight_mean", "staleness_in_queue_mean",
                                        "len_trained_mean")} == {"staleness_hist": {0: 2, 1: 2},
                                                                 "staleness_in_flight_mean": 0.0,
                                                                 "staleness_in_queue_mean": 0.5, "len_trained_mean": 3}
    assert resumed.admit() == (4, 2) and [e.uid for e in resumed.rec.events] == [4]    # uids continue
    assert d.admit() == (4, 2)
    for x in (d, resumed):                                      # and both go on identically
        assert x.admit() == (5, 2)
        x.done(Trajectory.fake(4, 2, 2))
        x.done(in_flight_updated(5, [2, 2, 2]))
        assert train(x)[1:] == (3, [])
    assert resumed.summary() == d.summary() and resumed.state() == d.state()
    assert d.summary()["staleness_hist"] == {0: 4, 1: 2}
