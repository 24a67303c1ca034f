"""SimPy model of asynchronous OPD: rollout replicas, teacher replicas, learner and weight sync.

The one idea: the processes own time; the staleness policy is `asyncopd.scheduler.Scheduler`, reached only through
`asyncopd.driver.Driver` exactly as a backend reaches it (admit, done, next_batch, stepped: the admit, drop and
learner_step events are the driver's), and every process writes `asyncopd.trace.Event`s through
`trace.Recorder(lambda: env.now)`. Staleness comes only from the scheduler; the simulator acts on the uids the
driver returns (admission times, live count, freed capacity).

Semantics (the choices a calibration must match):
- Rollout replica: continuous batching up to `max_batch`. At each change of its batch it admits (`Driver.admit`)
  until full or refused, but only once the replicas hold the scheduler's current version (a request of version v
  starts on weights v); the returned version is the behaviour version (weights are never swapped in flight, so
  behav_version == admit_version). Newcomers are prefilled one after another (prefill_s_per_token·prompt_len
  each) while the running sequences stall. With n running, one iteration takes `CostModel.step_s(n)`, so the
  replica sleeps (min remaining tokens)·step_s(n) in one timeout, not one event per token. A replica with room
  registers as waiting for admission capacity; when capacity frees up (new weights arrive, or a drop),
  `Scheduler.headroom()` slots are handed out least-loaded replica first, waking only the replicas whose room
  covers them. A woken replica finishes the current iteration, subtracts the whole iterations done and admits.
  No `decode_iter` events are written (the real engines write them for calibration).
- Teacher: a Store of generated trajectories served by `teacher_replicas` processes; a call takes whatever is
  waiting, up to teacher_max_batch, and costs CostModel.score_s(n, Σ(prompt_len + n_tokens)). Only then are the
  trajectories handed to the scheduler (`Driver.done`).
- Shared hardware (ClusterShape.placement). teacher_with_rollout: a replica scores its own finished
  trajectories, `score_group` at a time (or all it has when its batch is empty), and neither decodes nor
  admits meanwhile; utilisation counts scoring as teacher time of the replica's device. teacher_with_learner:
  one teacher process and the learner share a PriorityResource of capacity 1; the learner goes first, a
  scoring in progress is finished (no preemption).
- Learner: waits for `next_batch()`, trains learner_step_s + learner_s_per_token·(response tokens), calls
  `Driver.stepped` at once (as the concurrent backend does: trajectories delivered from then on count
  against the new version), then spends publish_s handing the weights out. The weights reach the rollout
  replicas weight_sync_s after the step's end (a `weight_sync` span); the learner does not wait for them.
- Summary: T = time the replicas receive the last weights. A trajectory is "trained" when `next_batch` returns
  it; latency is admission → that moment, in_flight counts admitted, not yet trained and not dropped (Little's
  law holds exactly up to the end effect when nothing is dropped). util_learner counts training, not publishing.
  staleness_hist and the split come from `Driver.summary()`; weights never change in flight here, so
  staleness_in_flight_mean is 0 and staleness_in_queue_mean equals staleness_mean. The data-skew measures
  (asyncopd.data_skew: len_generated/trained mean, p50, p90, length_w1, length_ks, length_bias, drop_rate,
  wasted_token_frac, staleness_by_length) come from the same Driver, as in every backend.

Run: `events, summary = simulate(ClusterShape(), CostModel(), Workload(), SchedulerConfig(max_staleness=1), 100)`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np
import simpy

from asyncopd.data_skew import SCALARS as SKEW_SCALARS
from asyncopd.driver import Driver
from asyncopd.rollout import Trajectory
from asyncopd.scheduler import Scheduler, SchedulerConfig
from asyncopd.trace import Event, Recorder
from sim.costs import ClusterShape, CostModel, Workload


class _Sim:
    """Shared state of one run: scheduler, recorder, wake-up events and the accounting the summary needs."""

    def __init__(self, env, cluster, costs, workload, sched_cfg, seed):
        self.env, self.cluster, self.costs, self.workload = env, cluster, costs, workload
        self.sched = Scheduler(sched_cfg)
        self.rec = Recorder(lambda: env.now)
        self.driver = Driver(self.sched, self.rec)
        self.rng = np.random.default_rng(seed)
        self.teacher_queue = simpy.Store(env)
        shared = cluster.placement == "teacher_with_learner"
        self.learner_device = simpy.PriorityResource(env, capacity=1) if shared else None
        self.waiting: list = []              # heap (n_running, seq, rid, event): replicas with room, for capacity
        self.wait_ev: dict[int, object] = {}     # rid -> its live registration; heap entries not here are stale
        self.seq = 0
        self.ready = env.event()             # fires when a trajectory reaches the ready pool
        self.held = 0                        # newest weight version the rollout replicas hold
        self.admit_t: dict[int, float] = {}  # uid -> admission time, until trained or dropped
        n_teacher = {"separate": cluster.teacher_replicas, "teacher_with_rollout": cluster.rollout_replicas,
                     "teacher_with_learner": 1}[cluster.placement]     # devices the teacher runs on
        self.busy = {"rollout": [0.0] * cluster.rollout_replicas, "teacher": [0.0] * n_teacher, "learner": [0.0]}
        self.busy_from = {k: [None] * len(v) for k, v in self.busy.items()}
        self.n_live, self.live_area, self.live_t = 0, 0.0, 0.0
        self.latencies: list[float] = []
        self.trained_tokens = 0

    def wake(self, name: str) -> None:
        ev = getattr(self, name)
        setattr(self, name, self.env.event())
        ev.succeed()

    def set_busy(self, role: str, i: int, on: bool) -> None:
        t0 = self.busy_from[role][i]
        if on and t0 is None:
            self.busy_from[role][i] = self.env.now
        elif not on and t0 is not None:
            self.busy[role][i] += self.env.now - t0
            self.busy_from[role][i] = None

    def add_live(self, d: int) -> None:
        now = self.env.now
        self.live_area += self.n_live * (now - self.live_t)
        self.n_live, self.live_t = self.n_live + d, now

    def dropped(self, uids: list[int]) -> None:
        """The driver dropped (and traced) these trajectories: forget them; their slots are free again."""
        if not uids:
            return
        for uid in uids:
            self.admit_t.pop(uid)
        self.add_live(-len(uids))
        self.capacity_freed()

    def wait_for_capacity(self, rid: int, n_running: int, timeout: float | None = None):
        """Register a replica with room; the event fires when admission slots are handed to it, or after `timeout`
        seconds (its segment's end), whichever comes first. One event with a timer callback, not `timeout | ev`:
        a SimPy condition costs more than the rest of a segment."""
        ev = self.env.event()
        self.wait_ev[rid] = ev
        heapq.heappush(self.waiting, (n_running, self.seq, rid, ev))
        self.seq += 1
        if timeout is not None:
            self.env.timeout(timeout).callbacks.append(lambda _: ev.triggered or ev.succeed())
        if self.headroom() > 0:                          # freed while this replica was prefilling or scoring
            self.capacity_freed()
        return ev

    def weights_current(self) -> bool:
        """Do the replicas hold the scheduler's version? A request of version v starts on weights v, so no
        admission happens while they are still in transit."""
        return self.held >= self.sched.version

    def headroom(self) -> int:
        """Admission slots a replica can use now."""
        return self.sched.headroom() if self.weights_current() else 0

    def capacity_freed(self) -> None:
        """Hand the scheduler's free admission slots to waiting replicas, least loaded first; wake no more replicas
        than the slots can fill (each takes up to max_batch − n_running)."""
        free = self.headroom()
        while free > 0 and self.waiting:
            n_running, _, rid, ev = heapq.heappop(self.waiting)
            if self.wait_ev.get(rid) is not ev:
                continue                                 # stale: that replica's segment ended on its own
            del self.wait_ev[rid]
            if not ev.triggered:                         # else its segment ended at this instant: it admits anyway
                ev.succeed()
            free -= self.costs.max_batch - n_running


def _whole_iters(elapsed: float, step: float) -> int:
    """Iterations started by `elapsed` seconds: a partly done iteration counts (it is finished before admitting)."""
    q = elapsed / step
    return round(q) if abs(q - round(q)) < 1e-9 else math.ceil(q)


def rollout_replica(env, sim: _Sim, rid: int):
    c, P = sim.costs, sim.workload.prompt_len
    running: list = []            # heap of (iteration it ends at, uid, n_tokens, version, t_admit); uid breaks ties
    it = 0                        # iterations this replica has decoded: a segment costs O(log n), not O(n)
    scores_here = sim.cluster.placement == "teacher_with_rollout"
    finished: list[Trajectory] = []                          # teacher_with_rollout: waiting to be scored here
    while True:
        if finished and (len(finished) >= sim.cluster.score_group or not running):
            sim.set_busy("rollout", rid, False)
            sim.set_busy("teacher", rid, True)
            yield from score(env, sim, finished, worker=rid)
            sim.set_busy("teacher", rid, False)
            finished = []
        new = []
        while len(running) + len(new) < c.max_batch and sim.weights_current():
            admitted = sim.driver.admit(rid)
            if admitted is None:
                break
            (uid, w), n = admitted, sim.workload.length.sample(sim.rng)
            sim.admit_t[uid] = env.now
            sim.add_live(+1)
            new.append((n, uid, w, env.now))
        if new and P * c.prefill_s_per_token > 0:
            sim.set_busy("rollout", rid, True)
            yield env.timeout(len(new) * P * c.prefill_s_per_token)
        for n, uid, w, t_admit in new:
            heapq.heappush(running, (it + n, uid, n, w, t_admit))
        if not running:
            sim.set_busy("rollout", rid, False)
            yield sim.wait_for_capacity(rid, 0)
            continue
        sim.set_busy("rollout", rid, True)
        step, k, t0 = c.step_s(len(running)), running[0][0] - it, env.now
        if len(running) < c.max_batch:       # room: a freed admission slot may interrupt the segment
            yield sim.wait_for_capacity(rid, len(running), timeout=k * step)
            sim.wait_ev.pop(rid, None)
            j = min(k, _whole_iters(env.now - t0, step))
            if env.now < t0 + j * step:
                yield env.timeout(t0 + j * step - env.now)
        else:
            yield env.timeout(k * step)
            j = k
        it += j
        while running and running[0][0] == it:
            _, uid, n, w, t_admit = heapq.heappop(running)
            sim.rec.span("rollout", t_admit, worker=rid, uid=uid, version=w, tokens=n)
            traj = Trajectory.fake(uid, n, w)
            finished.append(traj) if scores_here else sim.teacher_queue.put(traj)


def score(env, sim: _Sim, trajs: list[Trajectory], worker: int):
    """Score trajectories in one teacher call, then hand each to the scheduler (a SimPy sub-process)."""
    t0, tokens = env.now, sum(sim.workload.prompt_len + t.n_tokens for t in trajs)
    yield env.timeout(sim.costs.score_s(len(trajs), tokens))
    sim.rec.span("teacher", t0, worker=worker, n_seqs=len(trajs), tokens=tokens)
    for traj in trajs:
        sim.dropped(sim.driver.done(traj))
    sim.wake("ready")


def teacher_replica(env, sim: _Sim, tid: int):
    device = sim.learner_device                   # teacher_with_learner: shared with the learner, else None
    queue = sim.teacher_queue
    while True:
        trajs = [(yield queue.get())]
        req = device.request(priority=1) if device is not None else None
        if req is not None:
            yield req
        while queue.items and len(trajs) < sim.costs.teacher_max_batch:    # batch whatever else is waiting
            trajs.append((yield queue.get()))
        sim.set_busy("teacher", tid, True)
        yield from score(env, sim, trajs, worker=tid)
        sim.set_busy("teacher", tid, False)
        if req is not None:
            device.release(req)


def learner(env, sim: _Sim, steps: int):
    c, driver, device = sim.costs, sim.driver, sim.learner_device
    for _ in range(steps):
        while (batch := driver.next_batch()) is None:
            yield sim.ready
        for traj in batch.trajs:
            sim.latencies.append(env.now - sim.admit_t.pop(traj.uid))
        sim.add_live(-len(batch))
        sim.trained_tokens += batch.n_tokens
        req = device.request(priority=0) if device is not None else None
        if req is not None:
            yield req
        t0 = env.now
        sim.set_busy("learner", 0, True)
        yield env.timeout(c.learner_step_s + c.learner_s_per_token * batch.n_tokens)
        sim.set_busy("learner", 0, False)
        v, dropped = driver.stepped(batch, t0)          # the learner_step span, then the drops it caused
        sim.dropped(dropped)
        sync = env.process(weight_sync(env, sim, v))
        if c.publish_s > 0:
            yield env.timeout(c.publish_s)
        if req is not None:
            device.release(req)
    yield sync                                    # the run ends when the replicas hold the last weights


def weight_sync(env, sim: _Sim, v: int):
    """Weights v reach every rollout replica weight_sync_s after the learner step that made them; only then may
    requests of version v start."""
    t0 = env.now
    yield env.timeout(sim.costs.weight_sync_s)
    sim.held = max(sim.held, v)
    sim.rec.span("weight_sync", t0, version=v)
    sim.capacity_freed()


def simulate(cluster: ClusterShape, costs: CostModel, workload: Workload, sched_cfg: SchedulerConfig,
             steps: int, seed: int = 0, ops_out: list | None = None) -> tuple[list[Event], dict]:
    """Run until the learner has taken `steps` steps. workload.batch_size overrides sched_cfg.batch_size.
    With a list as `ops_out`, the scheduler's operation log is appended to it (a schedule to replay)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    sched_cfg = dataclasses.replace(sched_cfg, batch_size=workload.batch_size)
    env = simpy.Environment()
    sim = _Sim(env, cluster, costs, workload, sched_cfg, seed)
    sim.sched.record_ops = ops_out is not None
    for i in range(cluster.rollout_replicas):
        env.process(rollout_replica(env, sim, i))
    for i in range(1 if cluster.placement == "teacher_with_learner" else cluster.teacher_replicas):
        env.process(teacher_replica(env, sim, i))
    env.run(until=env.process(learner(env, sim, steps)))
    if ops_out is not None:
        ops_out.extend(sim.sched.ops)
    T = env.now
    sim.add_live(0)
    for role, flags in sim.busy_from.items():
        for i in range(len(flags)):
            sim.set_busy(role, i, False)
    d = sim.driver.summary()
    hist = d["staleness_hist"]
    n = sum(hist.values())
    summary = dict(
        samples_per_s=n / T, tokens_per_s=sim.trained_tokens / T,
        staleness_mean=sum(k * c for k, c in hist.items()) / n, staleness_max=max(hist),
        staleness_in_flight_mean=d["staleness_in_flight_mean"], staleness_in_queue_mean=d["staleness_in_queue_mean"],
        util_rollout=sum(sim.busy["rollout"]) / (T * cluster.rollout_replicas),
        util_teacher=sum(sim.busy["teacher"]) / (T * len(sim.busy["teacher"])),
        util_learner=sim.busy["learner"][0] / T,
        in_flight_mean=sim.live_area / T, latency_mean_s=float(np.mean(sim.latencies)),
        n_events=len(sim.rec.events), duration_s=T, n_dropped=sim.sched.n_dropped, staleness_hist=hist,
        **{k: d[k] for k in (*SKEW_SCALARS, "staleness_by_length")})
    return sim.rec.events, summary
