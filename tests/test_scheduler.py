"""The staleness scheduler: hand-traced schedules, straggler outcomes, properties over any interleaving, validation.

Rollouts are numbered by admission index (uid = n_admitted before the admit), as a replaying driver would.
"""

import copy
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asyncopd.rollout import Trajectory
from asyncopd.scheduler import Scheduler, SchedulerConfig


def traj(uid, w, newest=None):
    """A finished rollout admitted at version w; newest > w means its weights were updated in flight."""
    versions = torch.tensor([w, w if newest is None else newest])
    return Trajectory(uid=uid, behav_version=w, n_tokens=2, token_versions=versions)


def admit(sched, flying, n=1):
    out = []
    for _ in range(n):
        w = sched.try_admit()
        if w is not None:
            flying[sched.n_admitted - 1] = w
        out.append(w)
    return out


def done(sched, flying, *uids):
    for u in uids:
        sched.on_rollout_done(traj(u, flying.pop(u)))


def uids(batch):
    return [t.uid for t in batch.trajs]


def check_invariants(sched, flying):
    c = sched.counts()
    assert min(c.values()) >= 0, c
    assert c["n_admitted"] == c["in_flight"] + c["n_ready"] + c["n_trained"] + c["n_dropped"], c
    assert c["in_flight"] == len(flying)
    assert c["in_flight"] + c["n_ready"] <= (sched.cfg.depth + 1) * sched.cfg.batch_size, c
    if sched.cfg.on_stale in ("wait", "deadline") and not sched.fixed:   # never starved: nothing past its deadline
        untrained = [*flying.values(), *(w for w, _, _ in sched._ready)]
        assert all(w + sched.cfg.eta >= sched.version for w in untrained), (untrained, sched.version)
    probe, n_ok = copy.deepcopy(sched), 0            # headroom() == how many try_admit calls succeed now
    while probe.try_admit() is not None:
        n_ok += 1
    assert sched.headroom() == n_ok, (sched.headroom(), n_ok)


def drive(sched, ops, bump=True):
    """Play (op, x) pairs: admit | done (the x-th newest in-flight rollout, maybe updated in flight) |
    step (take a batch if there is one, then step). Checks the counters after every op; returns the batches trained and the rollouts still in flight."""
    flying, batches = {}, []
    for op, x in ops:
        if op == "admit":
            admit(sched, flying)
        elif op == "done" and flying:
            uid = sorted(flying)[-1 - x % len(flying)]         # x = 0, Hypothesis' favourite, leaves stragglers
            w = flying.pop(uid)
            sched.on_rollout_done(traj(uid, w, min(w + x % 3, sched.version) if bump else w))
        elif op == "step":
            batch = sched.next_batch()
            if batch is not None:
                batches.append(batch)
                sched.on_learner_step()
        check_invariants(sched, flying)
    return batches, flying


def drain(sched, flying, steps):
    """Liveness: finishing everything in flight and admitting to capacity always yields the next batch."""
    batches = []
    for _ in range(steps):
        done(sched, flying, *sorted(flying))
        while admit(sched, flying) != [None]:
            pass
        assert sched.in_flight + sched.n_ready == (sched.cfg.depth + 1) * sched.cfg.batch_size  # capacity is exact
        done(sched, flying, *sorted(flying))
        batch = sched.next_batch()
        assert batch is not None, sched.counts()
        batches.append(batch)
        sched.on_learner_step()
        check_invariants(sched, flying)
    return batches


# --- exact hand-traced schedules ---

def test_drop_eta1_trace():
    sched, f = Scheduler(SchedulerConfig(batch_size=2, max_staleness=1, on_stale="drop")), {}
    assert admit(sched, f, 5) == [0, 0, 0, 0, None]              # capacity (0+1+1)·2 = 4
    done(sched, f, 0, 1)
    b = sched.next_batch()
    assert (uids(b), b.version, b.staleness, b.n_dropped) == ([0, 1], 0, [0, 0], 0)
    assert admit(sched, f) == [None]                             # still 4 live admissions at v=0
    assert sched.on_learner_step() == 1
    assert admit(sched, f, 3) == [1, 1, None]                    # uids 4, 5
    done(sched, f, 4, 5)
    b = sched.next_batch()
    assert (uids(b), b.staleness) == ([4, 5], [0, 0])            # fresher data trained past stragglers 2, 3
    assert sched.on_learner_step() == 2
    assert admit(sched, f, 3) == [2, 2, None]                    # uids 6, 7
    done(sched, f, 2)                                            # 2 − 0 > η: dropped on arrival, slot freed
    assert sched.n_dropped == 1 and admit(sched, f) == [2]       # uid 8
    done(sched, f, 3)
    assert sched.n_dropped == 2 and admit(sched, f, 2) == [2, None]  # uid 9
    assert [t.uid for t in sched.pop_dropped()] == [2, 3] and sched.pop_dropped() == []
    done(sched, f, 7, 6)
    b = sched.next_batch()
    assert (uids(b), b.version, b.staleness, b.n_dropped) == ([7, 6], 2, [0, 0], 2)
    assert sched.counts() == dict(version=2, n_admitted=10, in_flight=2, n_ready=0, n_trained=6, n_dropped=2)


@pytest.mark.parametrize("on_stale", ["drop", "wait", "deadline"])
def test_eta0_is_synchronous(on_stale):
    sched, f = Scheduler(SchedulerConfig(batch_size=2, max_staleness=0, on_stale=on_stale)), {}
    for v in range(3):
        assert admit(sched, f, 3) == [v, v, None]
        done(sched, f, 2 * v + 1)
        assert sched.next_batch() is None
        done(sched, f, 2 * v)
        b = sched.next_batch()
        assert (uids(b), b.version, b.staleness) == ([2 * v + 1, 2 * v], v, [0, 0])
        assert sched.on_learner_step() == v + 1
    assert sched.n_dropped == 0


def test_straggler_drop_vs_wait():
    outcomes = {}
    for on_stale in ("drop", "wait"):
        sched, f = Scheduler(SchedulerConfig(batch_size=2, max_staleness=1, on_stale=on_stale)), {}
        assert admit(sched, f, 4) == [0, 0, 0, 0]                # uid 0 is the straggler
        done(sched, f, 1, 2)
        assert uids(sched.next_batch()) == [1, 2]
        sched.on_learner_step()
        assert admit(sched, f, 3) == [1, 1, None]                # uids 4, 5
        done(sched, f, 3, 4, 5)
        trained = []
        if on_stale == "drop":
            b = sched.next_batch()
            trained.append((uids(b), b.staleness, b.n_dropped))
            sched.on_learner_step()
            assert admit(sched, f, 3) == [2, 2, None]            # uids 6, 7
            done(sched, f, 0)                                    # arrives 2 versions old: dropped
            assert admit(sched, f) == [2]
            done(sched, f, 6)
            b = sched.next_batch()
            trained.append((uids(b), b.staleness, b.n_dropped))
        else:
            assert sched.next_batch() is None                    # uid 0 would go stale after this step
            done(sched, f, 0)
            b = sched.next_batch()
            trained.append((uids(b), b.staleness, b.n_dropped))
            sched.on_learner_step()
            assert admit(sched, f, 3) == [2, 2, None]
            b = sched.next_batch()
            trained.append((uids(b), b.staleness, b.n_dropped))
        outcomes[on_stale] = (trained, sched.n_dropped)
    assert outcomes["drop"] == ([([3, 4], [1, 0], 0), ([5, 6], [1, 0], 1)], 1)
    assert outcomes["wait"] == ([([3, 0], [1, 1], 0), ([4, 5], [1, 1], 0)], 0)


def test_wait_trains_oldest_first_when_eta_ge_2():
    # the case where "B ready and everything at v − η included" is not enough: wait must not train d early
    sched, f = Scheduler(SchedulerConfig(batch_size=1, max_staleness=2, on_stale="wait")), {}
    assert admit(sched, f, 4) == [0, 0, 0, None]                 # a, b, c = uids 0, 1, 2
    done(sched, f, 0)
    assert uids(sched.next_batch()) == [0]
    sched.on_learner_step()
    assert admit(sched, f, 2) == [1, None]                       # d = uid 3
    done(sched, f, 3)
    assert sched.next_batch() is None                            # b, c still in flight
    done(sched, f, 1)
    assert (uids(b := sched.next_batch()), b.staleness) == ([1], [1])
    sched.on_learner_step()
    assert admit(sched, f) == [2]                                # uid 4
    done(sched, f, 2)
    assert (uids(b := sched.next_batch()), b.staleness) == ([2], [2])
    sched.on_learner_step()
    assert (uids(b := sched.next_batch()), b.staleness) == ([3], [2])
    assert sched.n_dropped == 0


def test_deadline_trains_fresh_rollouts_while_an_old_one_still_has_time():
    # B=1, η=3: b (version 0) stays in flight; wait refuses c and d, deadline trains them and takes b at its deadline
    outcomes = {}
    for on_stale in ("wait", "deadline"):
        sched, f = Scheduler(SchedulerConfig(batch_size=1, max_staleness=3, on_stale=on_stale)), {}
        assert admit(sched, f, 2) == [0, 0]                      # a, b = uids 0, 1
        done(sched, f, 0)
        assert uids(sched.next_batch()) == [0]
        sched.on_learner_step()                                  # v = 1
        assert admit(sched, f) == [1]                            # c = uid 2
        done(sched, f, 2)
        trained = []
        while (b := sched.next_batch()) is not None:             # fresh rollouts trained while b is in flight
            trained.append((uids(b), b.staleness))
            sched.on_learner_step()
            admit(sched, f)
            done(sched, f, max(f))
        outcomes[on_stale] = (trained, sched.version)
    assert outcomes["wait"] == ([], 1)
    assert outcomes["deadline"] == ([([2], [0]), ([3], [0])], 3)  # c at v=1, d at v=2; at v=3 b is due
    done(sched, f, 1)
    assert (uids(b := sched.next_batch()), b.staleness) == ([1], [3]) and sched.n_dropped == 0


def test_deadline_refuses_the_batch_the_naive_rule_would_deadlock_on():
    # the case of the docstring: B=1, η=2, a, b, c admitted at 0, a trained, fresh d ready while b, c fly
    sched, f = Scheduler(SchedulerConfig(batch_size=1, max_staleness=2, on_stale="deadline")), {}
    assert admit(sched, f, 3) == [0, 0, 0]
    done(sched, f, 0)
    sched.next_batch(), sched.on_learner_step()
    assert admit(sched, f) == [1]                                # d = uid 3
    done(sched, f, 3)
    assert sched.next_batch() is None                            # training d now would leave b and c both due at 2
    done(sched, f, 1)
    assert (uids(b := sched.next_batch()), b.staleness) == ([1], [1])


def test_pacing_admits_depth_ahead_and_waits_only_for_the_due_straggler():
    # B=1, η=3, D=1: two admissions at a time (D+1)·B; a (uid 0) straggles; fresh rollouts train at staleness 0-1
    sched, f = Scheduler(SchedulerConfig(batch_size=1, max_staleness=3, on_stale="deadline", pipeline_depth=1)), {}
    assert admit(sched, f, 3) == [0, 0, None] and sched.headroom() == 0
    log = []
    done(sched, f, 1)
    for v in range(3):                                           # a in flight: versions 0, 1, 2 train the fresh ones
        b = sched.next_batch()
        log.append((uids(b), b.staleness))
        sched.on_learner_step()
        assert admit(sched, f, 2) == [v + 1, None]               # one slot frees per step: the pipeline stays 2 deep
        done(sched, f, max(f))
    assert log == [([1], [0]), ([2], [0]), ([3], [0])]
    assert sched.version == 3 and sched.next_batch() is None     # a (deadline 0 + 3) is due: the learner waits
    done(sched, f, 0)
    assert [(uids(b := sched.next_batch()), b.staleness)] == [([0], [3])]
    sched.on_learner_step()
    assert (uids(b := sched.next_batch()), b.staleness, sched.n_dropped) == ([4], [1], 0)


def test_drop_same_schedule_eta2_drops_the_laggard():
    sched, f = Scheduler(SchedulerConfig(batch_size=1, max_staleness=2, on_stale="drop")), {}
    admit(sched, f, 3)
    done(sched, f, 0)
    sched.next_batch(), sched.on_learner_step()
    assert admit(sched, f) == [1]
    done(sched, f, 3)
    assert uids(sched.next_batch()) == [3]                       # fresher d trained first
    sched.on_learner_step()
    assert admit(sched, f, 2) == [2, None]
    done(sched, f, 1, 2)
    assert (uids(b := sched.next_batch()), b.staleness) == ([1], [2])
    assert sched.on_learner_step() == 3 and sched.n_dropped == 1  # uid 2 (version 0) can never train now


@pytest.mark.parametrize("k, B, expected", [
    # (behaviour versions returned by try_admit at each version before its batch, batch staleness)
    (0, 2, [([0, 0, None], [0, 0]), ([1, 1, None], [0, 0]), ([2, 2, None], [0, 0])]),
    (1, 2, [([0, 0, 0, 0, None], [0, 0]), ([1, 1, None], [1, 1]), ([2, 2, None], [1, 1])]),
    (2, 1, [([0, 0, 0, None], [0]), ([1, None], [1]), ([2, None], [2]), ([3, None], [2]), ([4, None], [2])]),
])
def test_fixed_k_trace(k, B, expected):
    sched, f = Scheduler(SchedulerConfig(batch_size=B, fixed_staleness=k)), {}
    for v, (admits, staleness) in enumerate(expected):
        assert admit(sched, f, len(admits)) == admits
        done(sched, f, *sorted(f))
        b = sched.next_batch()
        assert (b.version, b.staleness, uids(b)) == (v, staleness, list(range(v * B, (v + 1) * B)))
        sched.on_learner_step()


def test_fixed_lazy_driver_is_told_old_weights():
    sched, f = Scheduler(SchedulerConfig(batch_size=1, fixed_staleness=1)), {}
    assert admit(sched, f) == [0]
    done(sched, f, 0)
    sched.next_batch(), sched.on_learner_step()
    assert admit(sched, f, 3) == [0, 1, None]                    # uid 1 must use version 0, one step old
    done(sched, f, 2)
    assert sched.next_batch() is None                            # batch 1 is uid 1's, still in flight
    done(sched, f, 1)
    assert (uids(b := sched.next_batch()), b.staleness) == ([1], [1])


def test_resume_shifts_versions():
    sched, f = Scheduler(SchedulerConfig(batch_size=2, max_staleness=1), version=5), {}
    assert admit(sched, f, 5) == [5, 5, 5, 5, None]
    fixed = Scheduler(SchedulerConfig(batch_size=1, fixed_staleness=1), version=5)
    assert admit(fixed, {}, 3) == [4, 5, None]                 # fixed:k is absolute: batch 5 uses version 4


def test_fixed_resume_continues_exactly():
    """A lockstep driver resumed at version 3 is given the same versions as one that never stopped."""
    def lockstep(sched, steps):
        seen = []
        for _ in range(steps):
            ws = [sched.try_admit() for _ in range(2)]
            for i, w in enumerate(ws):
                sched.on_rollout_done(Trajectory.fake(len(seen) * 2 + i, 3, behav_version=w))
            seen.append((sched.version, ws, sched.next_batch().staleness))
            sched.on_learner_step()
        return seen
    cfg = SchedulerConfig(batch_size=2, fixed_staleness=2)
    whole = lockstep(Scheduler(cfg), 6)
    assert whole[:3] + lockstep(Scheduler(cfg, version=3), 3) == whole
    assert [s for _, _, s in whole] == [[0, 0], [1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]


def test_op_log():
    sched, f = Scheduler(SchedulerConfig(batch_size=1, max_staleness=0), record_ops=True), {}
    admit(sched, f, 2)                                           # the refused second admit is not logged
    assert sched.next_batch() is None
    done(sched, f, 0)
    sched.next_batch(), sched.on_learner_step()
    assert sched.ops == [("admit", 0), ("done", 0), ("batch", 1), ("step", 1)]
    assert Scheduler(SchedulerConfig()).ops == []


# --- properties over any interleaving ---

OPS = st.lists(st.tuples(st.sampled_from(["admit", "admit", "done", "step"]), st.integers(0, 30)),
               min_size=30, max_size=150)                      # long enough for stragglers to matter


@pytest.mark.parametrize("on_stale", ["drop", "wait", "deadline"])
@pytest.mark.parametrize("eta", [0, 1, 2, 3])
@given(ops=OPS, B=st.integers(1, 3), depth=st.integers(0, 3))
def test_bounded_async_properties(eta, on_stale, ops, B, depth):
    """Staleness ≤ η, no drop in wait and deadline mode, nothing untrained past its deadline (check_invariants),
    no deadlock (drain), for any pipeline depth D ≤ η (D = η is the default)."""
    sched = Scheduler(SchedulerConfig(batch_size=B, max_staleness=eta, on_stale=on_stale,
                                      pipeline_depth=min(depth, eta)))
    batches, flying = drive(sched, ops)
    batches += drain(sched, flying, eta + 2)
    for v, b in enumerate(batches):
        assert b.version == v and len(b) == B
        assert all(0 <= s <= eta for s in b.staleness)
        if eta == 0:
            assert all(t.behav_version == v for t in b.trajs)    # sync: batch v = the rollouts admitted at v
    if on_stale in ("wait", "deadline") or eta == 0:
        assert sched.n_dropped == 0
    assert sum(b.n_dropped for b in batches) <= sched.n_dropped


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@given(ops=OPS, B=st.integers(1, 3))
def test_fixed_k_properties(k, ops, B):
    sched = Scheduler(SchedulerConfig(batch_size=B, fixed_staleness=k))
    batches, flying = drive(sched, ops, bump=False)
    batches += drain(sched, flying, k + 2)
    for v, b in enumerate(batches):
        assert b.version == v and b.staleness == [min(v, k)] * B
    assert sched.n_dropped == 0


# --- validation and misuse ---

@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", 2.0), ("max_staleness", -1), ("max_staleness", True),
    ("on_stale", "skip"), ("fixed_staleness", -1), ("fixed_staleness", "3"), ("pipeline_depth", -1),
    ("pipeline_depth", 2), ("pipeline_depth", 0.5),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})


def test_pipeline_depth_rules():
    with pytest.raises(ValueError, match="pipeline_depth must be None in fixed:k"):
        SchedulerConfig(fixed_staleness=2, pipeline_depth=1)
    assert (SchedulerConfig(max_staleness=3).depth, SchedulerConfig(max_staleness=3, pipeline_depth=1).depth) == (3, 1)
    assert SchedulerConfig.parse("4", pipeline_depth=2).depth == 2


def test_parse():
    cfg = SchedulerConfig.parse("fixed:3", batch_size=8)
    assert (cfg.fixed_staleness, cfg.batch_size, cfg.eta) == (3, 8, 3)
    assert SchedulerConfig.parse("2", on_stale="wait") == SchedulerConfig(max_staleness=2, on_stale="wait")
    with pytest.raises(ValueError, match="fixed_staleness"):
        SchedulerConfig.parse("fixed:-1")
    for bad in ("fixed:x", "fixed", "async", ""):
        with pytest.raises(ValueError, match="staleness spec"):
            SchedulerConfig.parse(bad)
    with pytest.raises(ValueError, match="version"):
        Scheduler(SchedulerConfig(), version=-1)


def test_misuse_raises():
    sched, f = Scheduler(SchedulerConfig(batch_size=1, max_staleness=1)), {}
    with pytest.raises(RuntimeError, match="on_learner_step"):
        sched.on_learner_step()                                  # step without a batch
    with pytest.raises(ValueError, match="no rollout admitted"):
        sched.on_rollout_done(traj(0, 0))                        # never admitted
    admit(sched, f)
    with pytest.raises(ValueError, match="no rollout admitted"):
        sched.on_rollout_done(traj(0, 1))                        # wrong behaviour version
    with pytest.raises(ValueError, match="newer than the learner"):
        sched.on_rollout_done(traj(0, 0, newest=1))              # token from weights that do not exist yet
    done(sched, f, 0)
    sched.next_batch()
    with pytest.raises(RuntimeError, match="twice"):
        sched.next_batch()
    assert sched.counts() == dict(version=0, n_admitted=1, in_flight=0, n_ready=0, n_trained=1, n_dropped=0)


def test_fixed_rejects_wrong_version():
    sched = Scheduler(SchedulerConfig(batch_size=1, fixed_staleness=1))
    assert [sched.try_admit(), sched.try_admit()] == [0, 0]
    with pytest.raises(ValueError, match="behav_version=1"):
        sched.on_rollout_done(traj(0, 1))


def test_admit_version_matches_admission_when_started_on_newer_weights():
    # η=1, B=1: a rollout admitted at v=0 is started by a worker that already holds version 1
    sched = Scheduler(SchedulerConfig(batch_size=1, max_staleness=1))
    assert [sched.try_admit(), sched.try_admit()] == [0, 0]
    sched.on_rollout_done(traj(0, 0))
    sched.next_batch()
    sched.on_learner_step()                                   # v = 1
    late = Trajectory(uid=1, behav_version=1, n_tokens=2, token_versions=torch.tensor([1, 1]), admit_version=0)
    with pytest.raises(ValueError, match="admit_version=1"):
        sched.on_rollout_done(replace(late, admit_version=1))  # nothing admitted at 1 is in flight
    sched.on_rollout_done(late)                               # matched by admit_version, staleness from behav
    assert sched.next_batch().staleness == [0]
    assert sched.counts() == dict(version=1, n_admitted=2, in_flight=0, n_ready=0, n_trained=2, n_dropped=0)
    with pytest.raises(ValueError, match="admit_version"):
        Trajectory(uid=2, behav_version=0, n_tokens=0, admit_version=1)   # started on weights older than admitted
