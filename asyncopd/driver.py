"""The scheduler's calls as every driver makes them, each writing its trace event: the contract by construction.

The one idea: the simulator and every backend loop talk to `asyncopd.scheduler.Scheduler` only through a
`Driver`, so what a run writes about admission, drops and learner steps cannot drift between them. Clock-free:
time comes in through the `trace.Recorder` (`env.now` in SimPy, `time.monotonic()` in a real run).

    admit(worker)        try_admit; on success the uid is the admission index (0, 1, 2, ... over the whole
                         run, resumes included) and an `admit` event (uid, version = the admitted version) is
                         written. Returns (uid, version) or None when capacity is full.
    done(traj)           on_rollout_done; every trajectory the scheduler dropped in that call gets a `drop`
                         event (uid, version = behav_version, staleness = learner version − behav_version).
                         Returns the dropped uids, so the caller frees whatever it holds for them.
    next_batch()         the scheduler's batch, or None.
    stepped(batch, t0)   on_learner_step after the learner trained `batch`; writes the `learner_step` span from
                         t0 (new version, n_seqs, tokens, mean staleness), adds the batch to the staleness
                         histogram, then writes the drops the new version caused. Returns (version, dropped uids).

Staleness split (prime-rl's): a trajectory trained at version v with behaviour version β (its oldest token)
and newest token version ν has staleness v − β = (ν − β) + (v − ν):

    staleness_in_flight = ν − β    versions the weights moved *while* it was generated (in-flight updates)
    staleness_in_queue  = v − ν    versions the learner moved after its last token, before it was trained

`split(batch)` gives both as batch means; `stepped` accumulates them over the run (`summary()`).

What the policy does to the data (asyncopd.data_skew.LengthSkew: lengths generated vs trained, drop rate, wasted
tokens, staleness by length) is counted here too, from every drop and trained batch, and joins `summary()`;
`state()` keeps it across a resume.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from asyncopd.data_skew import LengthSkew
from asyncopd.rollout import Batch, Trajectory
from asyncopd.scheduler import Scheduler
from asyncopd.trace import Event, Recorder


def split(batch: Batch) -> dict[str, float]:
    """Mean staleness of `batch` and its two parts: in flight (ν − β) and in queue (v − ν), per trajectory."""
    n = max(len(batch), 1)
    in_flight = sum(t.newest_version - t.behav_version for t in batch.trajs) / n
    in_queue = sum(batch.version - t.newest_version for t in batch.trajs) / n
    return {"staleness_mean": sum(batch.staleness) / n, "staleness_in_flight": in_flight,
            "staleness_in_queue": in_queue}


@dataclass
class Driver:
    sched: Scheduler
    rec: Recorder
    next_uid: int = 0                                     # uid of the next admission (admission index)
    hist: Counter = field(default_factory=Counter)        # staleness -> trained trajectories
    sums: dict = field(default_factory=lambda: {"in_flight": 0.0, "in_queue": 0.0})   # Σ over trained trajectories
    base: dict = field(default_factory=lambda: {"n_trained": 0, "n_dropped": 0, "n_lost": 0})  # before a resume
    skew: LengthSkew = field(default_factory=LengthSkew)  # lengths generated / trained / dropped

    def admit(self, worker: int = 0) -> tuple[int, int] | None:
        """Admit one rollout: (uid, weight version to start with), or None when the scheduler refuses."""
        w = self.sched.try_admit()
        if w is None:
            return None
        uid = self.next_uid
        self.next_uid += 1
        self.rec.instant("admit", worker=worker, uid=uid, version=w)
        return uid, w

    def done(self, traj: Trajectory) -> list[int]:
        """Hand back a finished rollout; returns the uids the scheduler dropped in this call."""
        self.sched.on_rollout_done(traj)
        return self._drops()

    def next_batch(self) -> Batch | None:
        return self.sched.next_batch()

    def stepped(self, batch: Batch, t0: float, dur_s: float | None = None, worker: int = 0) -> tuple[int, list[int]]:
        """The learner trained `batch` from time t0 (to now, or for dur_s when it ran elsewhere): bump the
        version, write the learner_step event, count the batch's staleness. Returns (version, dropped uids)."""
        version = self.sched.on_learner_step()
        parts = split(batch)
        cols = dict(worker=worker, version=version, n_seqs=len(batch), tokens=batch.n_tokens,
                    staleness=parts["staleness_mean"])
        if dur_s is None:
            self.rec.span("learner_step", t0, **cols)
        else:
            self.rec.append(Event(t=t0, dur_s=dur_s, kind="learner_step", **cols))
        self.hist.update(batch.staleness)
        for traj, staleness in zip(batch.trajs, batch.staleness):
            self.skew.on_trained(traj.n_tokens, staleness)
        self.sums["in_flight"] += parts["staleness_in_flight"] * len(batch)
        self.sums["in_queue"] += parts["staleness_in_queue"] * len(batch)
        return version, self._drops()

    def summary(self) -> dict:
        """Run totals: trained trajectories' staleness histogram, the mean of each part of the split, and the
        data-skew measures (LengthSkew.summary)."""
        n = max(sum(self.hist.values()), 1)                # trained trajectories
        return {"staleness_hist": {int(k): int(self.hist[k]) for k in sorted(self.hist)},
                "staleness_in_flight_mean": self.sums["in_flight"] / n,
                "staleness_in_queue_mean": self.sums["in_queue"] / n, **self.skew.summary()}

    def counts(self) -> dict[str, int]:
        """The scheduler's counters over the whole run, resumes included: n_admitted == in_flight + n_ready +
        n_trained + n_dropped + n_lost, where n_lost counts rollouts in flight or ready at the checkpoint a run
        resumed from and never trained (a resumed scheduler starts empty; a replay rebuilds them: none lost)."""
        c = self.sched.counts()
        return {"version": c["version"], "n_admitted": self.next_uid, "in_flight": c["in_flight"],
                "n_ready": c["n_ready"], "n_trained": self.base["n_trained"] + c["n_trained"],
                "n_dropped": self.base["n_dropped"] + c["n_dropped"], "n_lost": self.base["n_lost"]}

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed driver continues the uids, counters and histogram (JSON-able)."""
        c = self.counts()
        return {"next_uid": self.next_uid, "staleness_hist": {str(k): n for k, n in self.hist.items()},
                "staleness_sums": dict(self.sums), "n_trained": c["n_trained"], "n_dropped": c["n_dropped"],
                "skew": self.skew.state()}

    def restore(self, state: dict) -> None:
        """Continue a checkpoint's driver over this driver's scheduler (a fresh one at the checkpoint's version,
        or one rebuilt by replaying the operations that led there)."""
        self.next_uid = int(state["next_uid"])
        self.hist = Counter({int(k): int(n) for k, n in state["staleness_hist"].items()})
        self.sums = dict(state["staleness_sums"])
        self.skew = LengthSkew.from_state(state.get("skew", {}))   # a checkpoint from before it: counts restart
        c = self.sched.counts()
        self.base = {"n_trained": state["n_trained"] - c["n_trained"], "n_dropped": state["n_dropped"] - c["n_dropped"]}
        self.base["n_lost"] = (self.next_uid - state["n_trained"] - state["n_dropped"] - c["in_flight"]
                               - c["n_ready"])

    def _drops(self) -> list[int]:
        dropped = self.sched.pop_dropped()
        if not dropped:                  # the common case: no event, no list to build (the simulator's hot path)
            return []
        v = self.sched.version
        for t in dropped:
            self.skew.on_dropped(t.n_tokens)
            self.rec.instant("drop", uid=t.uid, version=t.behav_version, staleness=float(v - t.behav_version))
        return [t.uid for t in dropped]
