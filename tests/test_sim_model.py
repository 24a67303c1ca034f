"""sim.costs and sim.model: an exact event log, Little's law, closed-form throughput, the staleness bound, validation."""

import numpy as np
import pytest

from asyncopd.scheduler import SchedulerConfig
from asyncopd.trace import KINDS, to_frame
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from sim.model import simulate


def fixed(L, B, P=0):
    return Workload(batch_size=B, prompt_len=P, length=LengthDist(dist="fixed", mean=L, max=L))


def test_exact_event_log_one_replica_eta1():
    # 1 rollout replica (max_batch 4), 1 teacher (one sequence per call), B=2, η=1, L=2, P=2.
    # step_s(n) = 1 + 0.5(n−1); prefill 0.5 s per newcomer; teacher 0.125·(2+2) = 0.5 s; learner 1 s; the new
    # weights reach the replica 0.5 s after a step ends (the learner does not wait: publish_s = 0).
    costs = CostModel(decode_step_s=1.0, decode_step_s_per_seq=0.5, prefill_s_per_token=0.25, max_batch=4,
                      teacher_s_per_token=0.125, learner_s_per_token=0.0, learner_step_s=1.0, weight_sync_s=0.5)
    events, s = simulate(ClusterShape(1, 1), costs, fixed(2, 2, P=2), SchedulerConfig(max_staleness=1), steps=3)
    got = sorted((e.t, e.dur_s, e.kind, e.version, e.uid) for e in events)
    want = sorted([
        # t=0: capacity (0+η+1)·B = 4 admits u0..u3 at v0; prefill 4·0.5 → 2; full batch, 2 iters of 2.5 s → 7
        *[(0.0, 0.0, "admit", 0, u) for u in range(4)],
        *[(0.0, 7.0, "rollout", 0, u) for u in range(4)],
        # one teacher scores them one call each, 0.5 s
        (7.0, 0.5, "teacher", -1, -1), (7.5, 0.5, "teacher", -1, -1),
        (8.0, 0.5, "teacher", -1, -1), (8.5, 0.5, "teacher", -1, -1),
        # batch 0 = {u0,u1} at t=8: train 8→9, v=1 at once; batch 1 = {u2,u3} (staleness 1) when u3 is scored at 9
        (8.0, 1.0, "learner_step", 1, -1), (9.0, 1.0, "learner_step", 2, -1),
        (9.0, 0.5, "weight_sync", 1, -1), (10.0, 0.5, "weight_sync", 2, -1),
        # weights v1 at 9.5 open 2 slots: u4,u5 at v1, prefill → 10.5; weights v2 arrive at 10.5 and open 2 more
        # before the first iteration: u6,u7 at v2, prefill → 11.5; 4 running at 2.5 s: all end at 16.5
        (9.5, 0.0, "admit", 1, 4), (9.5, 0.0, "admit", 1, 5),
        (9.5, 7.0, "rollout", 1, 4), (9.5, 7.0, "rollout", 1, 5),
        (10.5, 0.0, "admit", 2, 6), (10.5, 0.0, "admit", 2, 7),
        (10.5, 6.0, "rollout", 2, 6), (10.5, 6.0, "rollout", 2, 7),
        (16.5, 0.5, "teacher", -1, -1), (17.0, 0.5, "teacher", -1, -1),
        (17.5, 0.5, "teacher", -1, -1), (18.0, 0.5, "teacher", -1, -1),
        # batch 2 = {u4,u5} (staleness 1) at 17.5; the run ends when weights v3 reach the replica at 19, which
        # opens two slots
        (17.5, 1.0, "learner_step", 3, -1), (18.5, 0.5, "weight_sync", 3, -1),
        (19.0, 0.0, "admit", 3, 8), (19.0, 0.0, "admit", 3, 9),
    ])
    assert got == want
    assert s["samples_per_s"] == pytest.approx(6 / 19) and s["duration_s"] == 19.0
    assert s["staleness_mean"] == pytest.approx(2 / 3) and s["staleness_max"] == 1
    assert s["staleness_hist"] == {0: 2, 1: 4}
    # weights never change in flight in the simulator: all staleness is queueing
    assert s["staleness_in_flight_mean"] == 0.0 and s["staleness_in_queue_mean"] == pytest.approx(2 / 3)
    assert s["util_learner"] == pytest.approx(3 / 19) and s["util_teacher"] == pytest.approx(4 / 19)
    # rollout busy: 0→7, 9.5→16.5
    assert s["util_rollout"] == pytest.approx(14 / 19)
    # latency admission→batch taken: u0,u1: 8; u2,u3: 9; u4,u5: 8
    assert s["latency_mean_s"] == pytest.approx((8 + 8 + 9 + 9 + 8 + 8) / 6)
    assert s["n_events"] == len(events) == len(want)
    assert set(to_frame(events).kind) <= set(KINDS)


def test_teacher_batches_calls_and_publish_blocks_the_learner():
    """A separate teacher takes every waiting trajectory up to teacher_max_batch into one call costing
    teacher_call_s + n·teacher_s_per_seq + tokens·teacher_s_per_token; weights reach the replica weight_sync_s
    after the step, however long the learner spends publishing them."""
    B, L, P = 4, 3, 1
    c = CostModel(decode_step_s=1.0, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=4,
                  teacher_s_per_token=0.25, teacher_s_per_seq=0.5, teacher_call_s=2.0, teacher_max_batch=3,
                  learner_s_per_token=0.0, learner_step_s=1.0, publish_s=0.5, weight_sync_s=2.0)
    events, s = simulate(ClusterShape(1, 1), c, fixed(L, B, P), SchedulerConfig(max_staleness=0), steps=2)
    got = sorted((e.t, e.dur_s, e.kind, e.version, e.n_seqs) for e in events if e.kind != "admit")
    # u0..u3 decode 0→3; the teacher takes u0 alone (the store hands it over before the others arrive? no: all
    # four finish together, so the first call takes 3 of them: 2 + 3·0.5 + 3·4·0.25 = 6.5 s, the next 1:
    # 2 + 0.5 + 1 = 3.5 s); train 13→14, weights at 16 (publish 14→14.5 does not delay them); again from 16.
    want = sorted([
        *[(0.0, 3.0, "rollout", 0, 0)] * 4, (3.0, 6.5, "teacher", -1, 3), (9.5, 3.5, "teacher", -1, 1),
        (13.0, 1.0, "learner_step", 1, 4), (14.0, 2.0, "weight_sync", 1, 0),
        *[(16.0, 3.0, "rollout", 1, 0)] * 4, (19.0, 6.5, "teacher", -1, 3), (25.5, 3.5, "teacher", -1, 1),
        (29.0, 1.0, "learner_step", 2, 4), (30.0, 2.0, "weight_sync", 2, 0),
    ])
    assert got == want
    assert s["duration_s"] == 32.0 and s["samples_per_s"] == pytest.approx(8 / 32)


def test_littles_law():
    costs = CostModel(decode_step_s=0.02, decode_step_s_per_seq=0.001, prefill_s_per_token=1e-4, max_batch=8,
                      teacher_s_per_token=2e-4, learner_s_per_token=1e-3, learner_step_s=0.2, weight_sync_s=0.05)
    w = Workload(batch_size=8, prompt_len=32, length=LengthDist(dist="lognormal", mean=60, sigma=0.6, max=300))
    _, s = simulate(ClusterShape(3, 2), costs, w, SchedulerConfig(max_staleness=2, on_stale="wait"), steps=300, seed=1)
    assert s["n_dropped"] == 0
    assert s["in_flight_mean"] == pytest.approx(s["samples_per_s"] * s["latency_mean_s"], rel=0.03)


def test_synchronous_closed_form():
    B, P, L, steps = 4, 8, 16, 20
    c = CostModel(decode_step_s=0.05, decode_step_s_per_seq=0.01, prefill_s_per_token=0.01, max_batch=8,
                  teacher_s_per_token=0.002, learner_s_per_token=0.001, learner_step_s=0.3, weight_sync_s=0.1)
    per_step = (B * P * c.prefill_s_per_token + L * c.step_s(B) + B * (P + L) * c.teacher_s_per_token
                + c.learner_step_s + c.learner_s_per_token * B * L + c.weight_sync_s)
    assert per_step == pytest.approx(2.256)
    events, s = simulate(ClusterShape(1, 1), c, fixed(L, B, P), SchedulerConfig(max_staleness=0), steps=steps)
    assert s["samples_per_s"] == pytest.approx(B / per_step)
    assert s["tokens_per_s"] == pytest.approx(B * L / per_step)
    assert s["staleness_max"] == 0 and s["n_dropped"] == 0
    assert [e.t for e in events if e.kind == "learner_step"] == pytest.approx(
        [k * per_step + per_step - c.weight_sync_s - c.learner_step_s - c.learner_s_per_token * B * L
         for k in range(steps)])


def test_pipelined_learner_bound():
    B, L, steps = 4, 20, 100
    c = CostModel(decode_step_s=0.01, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=4,
                  teacher_s_per_token=0.001, learner_s_per_token=0.01, learner_step_s=1.0, publish_s=0.2,
                  weight_sync_s=0.5)
    _, s = simulate(ClusterShape(4, 4), c, fixed(L, B, 8), SchedulerConfig(max_staleness=3), steps=steps)
    per_step = c.learner_step_s + c.learner_s_per_token * B * L + c.publish_s   # weight_sync_s overlaps training
    assert s["samples_per_s"] == pytest.approx(B / per_step, rel=0.01)
    assert s["util_learner"] == pytest.approx((per_step - c.publish_s) / per_step, rel=0.01)
    assert s["util_rollout"] < 0.1


@pytest.mark.parametrize("seed", range(9))
def test_staleness_bound_holds_in_every_trace(seed):
    r = np.random.default_rng(seed)
    eta, on_stale = int(r.integers(0, 4)), ["drop", "wait", "deadline"][seed % 3]
    depth = int(r.integers(0, eta + 1)) if on_stale == "deadline" else None    # pacing: admission D <= η ahead
    c = CostModel(decode_step_s=float(r.uniform(0.005, 0.05)), decode_step_s_per_seq=float(r.uniform(0, 0.002)),
                  prefill_s_per_token=1e-4, max_batch=int(r.integers(1, 9)),
                  teacher_s_per_token=float(r.uniform(0, 1e-3)), learner_s_per_token=1e-3,
                  learner_step_s=float(r.uniform(0.05, 0.5)), weight_sync_s=float(r.uniform(0, 0.2)))
    w = Workload(batch_size=int(r.integers(1, 9)), prompt_len=16,
                 length=LengthDist(dist="lognormal", mean=50, sigma=1.0, max=400))
    cluster = ClusterShape(int(r.integers(1, 5)), int(r.integers(1, 3)))
    events, s = simulate(cluster, c, w, SchedulerConfig(max_staleness=eta, on_stale=on_stale, pipeline_depth=depth),
                         steps=40, seed=seed)
    df = to_frame(events)
    steps = df[df.kind == "learner_step"]
    assert steps.version.tolist() == list(range(1, 41))
    assert (steps.staleness <= eta).all() and s["staleness_max"] <= eta
    assert sum(s["staleness_hist"].values()) == 40 * w.batch_size and max(s["staleness_hist"]) == s["staleness_max"]
    assert s["staleness_in_flight_mean"] == 0.0
    assert s["staleness_in_queue_mean"] == pytest.approx(s["staleness_mean"], abs=1e-12)
    drops = df[df.kind == "drop"]
    assert (drops.staleness > eta).all()
    assert (drops.version.values == df[df.kind == "rollout"].set_index("uid").version[drops.uid].values).all()
    assert s["n_dropped"] == (df.kind == "drop").sum()
    if on_stale != "drop":                       # no drops: admission i happens at a version v with
        assert s["n_dropped"] == 0               # i < (v + D + 1)·B (the capacity rule at depth D)
        adm_order = df[df.kind == "admit"].sort_values("t", kind="stable").version.to_numpy()
        D = eta if depth is None else depth
        assert (np.arange(len(adm_order)) < (adm_order + D + 1) * w.batch_size).all()
    # the replica generates with the version it was admitted at, never newer than the learner's
    adm = df[df.kind == "admit"].set_index("uid").version
    ro = df[df.kind == "rollout"].set_index("uid").version
    assert (ro == adm[ro.index]).all()


def test_length_dist_truncates_and_samples():
    rng = np.random.default_rng(0)
    ln = LengthDist(dist="lognormal", mean=100, sigma=1.5, max=200)
    xs = [ln.sample(rng) for _ in range(2000)]
    assert max(xs) == 200 and min(xs) >= 1
    assert LengthDist(dist="fixed", mean=300, max=128).sample(rng) == 128
    emp = LengthDist(dist="empirical", values=[3, 7], max=5)
    assert {emp.sample(rng) for _ in range(100)} == {3, 5}


@pytest.mark.parametrize("make, field", [
    (lambda: ClusterShape(rollout_replicas=0), "rollout_replicas"),
    (lambda: ClusterShape(teacher_replicas=0), "teacher_replicas"),
    (lambda: CostModel(decode_step_s=0), "decode_step_s"),
    (lambda: CostModel(weight_sync_s=-1), "weight_sync_s"),
    (lambda: CostModel(teacher_s_per_token=float("nan")), "teacher_s_per_token"),
    (lambda: CostModel(max_batch=0), "max_batch"),
    (lambda: CostModel(learner_step_s=-0.1), "learner_step_s"),
    (lambda: Workload(batch_size=0), "batch_size"),
    (lambda: Workload(prompt_len=-1), "prompt_len"),
    (lambda: LengthDist(dist="uniform"), "dist"),
    (lambda: LengthDist(max=0), "max"),
    (lambda: LengthDist(mean=0.5), "mean"),
    (lambda: LengthDist(dist="empirical"), "values"),
    (lambda: simulate(ClusterShape(), CostModel(), Workload(), SchedulerConfig(), steps=0), "steps"),
])
def test_invalid_config_raises_naming_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make()


def test_fixed_k_mode_gives_exact_staleness():
    c = CostModel(decode_step_s=0.01, max_batch=4, learner_step_s=0.3, weight_sync_s=0.05)
    w = Workload(batch_size=3, prompt_len=8, length=LengthDist(dist="lognormal", mean=30, sigma=0.5, max=100))
    events, s = simulate(ClusterShape(2, 1), c, w, SchedulerConfig(fixed_staleness=2), steps=10, seed=3)
    steps = [e for e in events if e.kind == "learner_step"]
    assert [e.staleness for e in steps] == [min(e.version - 1, 2) for e in steps]
    assert s["n_dropped"] == 0


@pytest.mark.parametrize("placement, period", [
    ("separate", 5.0),               # max(generate 4, score 3, train + publish 5)
    ("teacher_with_rollout", 7.0),   # the replica generates (4) and scores (3) the batch: 7 per batch
    ("teacher_with_learner", 8.0),   # the learner's devices score (3) and train + publish (5): 8 per batch
])
def test_colocated_roles_share_their_device(placement, period):
    """One replica holding exactly one batch, fixed lengths: the shared device is the slowest stage. η = 3 so
    that the admission window does not bind: a batch's chain generate → score → train → weights at the replica
    takes 12 s, and (η+1) batches in flight allow one batch per 12/(η+1) = 3 s < the slowest stage (with η = 1
    it would be 6 s). The weight transfer itself (weight_sync_s) occupies no device."""
    B, L, P, steps = 4, 10, 6, 60
    c = CostModel(decode_step_s=0.4, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=B,
                  teacher_s_per_token=3.0 / (B * (P + L)), learner_s_per_token=0.0, learner_step_s=4.0,
                  publish_s=1.0, weight_sync_s=1.0)
    cluster = ClusterShape(1, 1 if placement == "separate" else 0, placement=placement, score_group=B)
    events, s = simulate(cluster, c, fixed(L, B, P), SchedulerConfig(max_staleness=3), steps=steps)
    starts = [e.t for e in events if e.kind == "learner_step"]
    assert np.diff(starts)[10:] == pytest.approx(np.full(steps - 11, period))    # steady state, exactly
    assert s["samples_per_s"] == pytest.approx(B / period, rel=0.05)             # ... up to the start-up
    assert s["staleness_max"] <= 3 and s["n_dropped"] == 0
    busy = {"separate": "learner", "teacher_with_rollout": "rollout", "teacher_with_learner": "learner"}[placement]
    if placement != "separate":           # the shared device never idles in steady state
        shared = s[f"util_{busy}"] + s["util_teacher"] + (1.0 / period if busy == "learner" else 0.0)
        assert shared == pytest.approx(1.0, abs=0.03)
    teacher = [e for e in events if e.kind == "teacher"]
    per_call = B if placement == "teacher_with_rollout" else 1      # a score group, or one sequence per call
    assert len(teacher) >= B // per_call * (steps - 1)
    assert all(e.n_seqs == per_call and e.dur_s == pytest.approx(3.0 * per_call / B) for e in teacher)
