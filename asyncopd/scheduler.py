"""The staleness policy as a clock-free state machine: admission, batch assembly, drop/wait, version bumps.

The scheduler knows weight versions and counts, never time. The SimPy simulator and every backend drive it
with the same four calls: `try_admit` (may a new rollout start, and with which weights?), `on_rollout_done`,
`next_batch` (may the learner train now, and on what?) and `on_learner_step`.

Notation: B = batch_size, v = learner weight version (= learner steps taken), η = max_staleness. A trajectory
trained at version v has staleness v − β, with β = traj.behav_version, the oldest weight version among its
tokens (rollout.py). The learner trains exactly one batch of B per version.

Driver contract. `try_admit` returns the behaviour version w the rollout must *start* with (or newer), and the
trajectory must come back with admit_version == w (Trajectory.admit_version defaults to behav_version, so a
driver that starts exactly at w sets nothing). Weights may be updated in flight (later tokens newer,
newest_version ≤ v), which leaves the oldest version, hence behav_version, at w. A concurrent worker that
already holds newer weights when it starts the rollout returns behav_version > admit_version = w: the admission
is matched by admit_version, while staleness, ordering and drops use behav_version (never older than w, so every
bound below still holds). The scheduler counts outstanding admissions per version and rejects a trajectory whose
admit_version has none outstanding. Trajectories of the same admission version are interchangeable: no uids are
tracked.

**Bounded-async mode** (fixed_staleness=None). try_admit returns w = v (the newest weights) iff

    n_admitted − n_dropped < (v + D + 1)·B                                          (capacity rule)

with D = pipeline_depth, how far rollout may run ahead of the learner (default D = η; 0 ≤ D ≤ η). Live admissions
are in_flight + n_ready + n_trained with n_trained = v·B (+B once batch v is taken), so at most (D+1)·B
trajectories are in flight or ready. With no drops and D = η this is AReaL's ⌊(N_r − 1)/B⌋ ≤ v + η. D < η is
pacing (tinker-cookbook PR #822's pipeline_depth): typical staleness ≈ D, and the η − D versions between them are
slack for the slow (long) rollouts, which the learner then waits for instead of dropping (on_stale="deadline").
The ready pool is ordered oldest first, by (behav_version, arrival order); a batch is its first B.

- on_stale="drop": a ready trajectory with v − β > η can never be trained, so it is dropped at once: when it
  arrives, or when a step makes it too stale. Dropping frees its admission slot. next_batch returns a batch when
  B trajectories are ready; Batch.n_dropped counts the drops since the previous batch. The pool only holds
  trajectories with v − β ≤ η, so no trained trajectory exceeds η.
- on_stale="wait": nothing is dropped; the learner waits instead. next_batch returns the B *oldest untrained*
  trajectories (in flight or ready, by version), once all of them are ready; else None. Exactness: index the
  admissions i = 0, 1, … in order, admitted at versions a_i, non-decreasing because v only grows. The capacity
  rule with no drops admits i only if i < (a_i + η + 1)·B, i.e. ⌊i/B⌋ − a_i ≤ η. By induction the untrained
  multiset at version v is {a_i : i ≥ v·B}, so batch v holds the versions {a_i : v·B ≤ i < (v+1)·B} and its
  worst staleness is v − a_{vB} ≤ η. Hence every untrained trajectory with β ≤ v − η is in batch v, and these
  fit in one batch of B: the rule implies (a) B are ready and (b) all of them are ready and included.
  For η ≤ 1 (a) and (b) are also sufficient (every untrained β is ≥ v − 1). For η ≥ 2 they are not:
  B=1, η=2, admit a, b, c at v=0; train a; at v=1 admit and train a fresher d while b, c are in flight;
  at v=2 both b and c have β = 0 = v − η and one of them would reach staleness 3. Training oldest first
  avoids this. It cannot deadlock: once the in-flight rollouts finish and the driver admits to capacity,
  (D+1)·B ≥ B trajectories are untrained and ready. (D < η only shrinks the a_i, so the proof holds as is.)
- on_stale="deadline" (with D < η: **pacing**): nothing is dropped, and the learner waits for a rollout only when
  its deadline is due. Each untrained trajectory has a deadline d = a + η, the last version it may be trained at
  (a = its admission version while in flight, its behav_version β ≥ a once ready). next_batch takes the B ready
  trajectories with the earliest deadlines (the ready pool's oldest first) and returns them iff the untrained
  ones left behind stay schedulable by earliest deadline first, one batch of B per version:

      for every u > v:  #{left behind with d ≤ u} ≤ (u − v)·B                        (feasibility)

  (u = v gives: none left behind is due now). Guarantees, over any interleaving of the four calls:
  (1) staleness ≤ η and nothing dropped: feasibility at every step means no untrained trajectory is ever past
  its deadline, so each is trained at a version ≤ its d, i.e. never starved: a rollout admitted at version a is
  trained by version a + η at the latest: the learner never steps past an untrained deadline. (2) No deadlock:
  feasibility of the whole untrained set (for every u ≥ v: #{d ≤ u} ≤ (u − v + 1)·B) is an invariant. A batch
  is taken only if it holds afterwards; an admission at version v has d = v + η and leaves at most (D+1)·B ≤
  (η+1)·B untrained, which the bound at every u ≥ v + η allows; a finished rollout's d only moves later (β ≥ a).
  So once every rollout has finished, the B earliest deadlines are ready and leave a feasible rest (EDF is
  optimal: swapping a later deadline into the batch never helps), and next_batch returns them. (3) The learner
  waits only for due rollouts: B=1, η=3, with b (version 0) in flight it trains c (version 1) at v=1 and d at
  v=2, then waits for b at v=3; wait mode trains nothing until b is back. With D = η, feasibility makes each
  batch the oldest B admitted (the capacity rule refills exactly B per version) and the policy coincides with
  wait in steady state; it pays off with D < η, where the learner trains fresh rollouts and waits only for
  stragglers η − D versions late. (EDF feasibility:
  Liu & Layland 1973.) The naive rule "never step past an unfinished deadline" deadlocks: B=1, η=2, D=2, a, b,
  c admitted at 0; c, then a fresh d trained first leaves a and b both due at version 2.
- η = 0 is synchronous training in every mode: at most (v+1)·B admissions at version ≤ v and v·B trained leave
  ≤ B untrained, so batch v is exactly the B rollouts admitted at version v and nothing is ever dropped.

**fixed:k mode** (fixed_staleness=k), deterministic, for lockstep science runs (the n-step-off protocol).
Admission i belongs to batch ⌊i/B⌋ and try_admit returns w_i = max(0, ⌊i/B⌋ − k), only if w_i ≤ v (the weights
exist; equivalently i < (v + k + 1)·B, the capacity rule with η = k). The driver keeps the last k+1 weight
versions, since w_i may be older than v. Batches are assembled as in wait mode, so batch v is B trajectories of
behaviour version max(0, v − k) and has staleness exactly min(v, k): k once v ≥ k, and the first k batches come
from the initial weights. on_stale, max_staleness and pipeline_depth are ignored (pipeline_depth must be None);
nothing is dropped. Same-version trajectories
being interchangeable, batch v holds the first B *finished* ones of its version (admission order in lockstep).

Counters conserve at all times: n_admitted == in_flight + n_ready + n_trained + n_dropped.
A scheduler built with version=v0 (resuming) behaves as a fresh one whose versions are shifted by v0, except
that fixed:k keeps its absolute rule: batch v ≥ v0 still uses version max(0, v − k), so a resumed lockstep run
continues exactly (the driver restores the ring of the last k+1 weight versions).

Operation log (record_ops=True): `ops` is a list of (op, int) tuples, one per state-changing call:
("admit", w) try_admit returned w; ("done", uid) on_rollout_done accepted trajectory uid; ("batch", n) next_batch
returned n trajectories; ("step", v) on_learner_step returned v. Refused calls (None) are not logged and drops
follow from the logged ops. A driver that numbers trajectories by admission index (uid = n_admitted before the
admit) makes the log replayable: the i-th "admit" is uid i.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # rollout.py imports torch, and a run checks its config (SchedulerConfig) before torch loads
    from asyncopd.rollout import Batch, Trajectory

ON_STALE = ("drop", "wait", "deadline")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass  # not frozen: OmegaConf makes frozen dataclasses read-only, breaking Hydra overrides
class SchedulerConfig:
    batch_size: int = 64                 # trajectories per learner step (B), >= 1
    max_staleness: int = 1               # η in weight versions: 0 = synchronous, 1 = one-step-off, >= 0
    on_stale: str = "drop"               # "drop" | "wait" | "deadline" (str, not Literal: OmegaConf schema types)
    fixed_staleness: int | None = None   # k for the deterministic fixed:k mode; None = bounded-async mode
    pipeline_depth: int | None = None    # D: admission runs at most D versions ahead; 0 <= D <= η, None = η

    def __post_init__(self):
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"SchedulerConfig.batch_size must be an int >= 1, got {self.batch_size!r}")
        if not _is_int(self.max_staleness) or self.max_staleness < 0:
            raise ValueError(f"SchedulerConfig.max_staleness must be an int >= 0, got {self.max_staleness!r}")
        if self.on_stale not in ON_STALE:
            raise ValueError(f"SchedulerConfig.on_stale must be one of {ON_STALE}, got {self.on_stale!r}")
        if self.fixed_staleness is not None and (not _is_int(self.fixed_staleness) or self.fixed_staleness < 0):
            raise ValueError(f"SchedulerConfig.fixed_staleness must be None or an int >= 0, "
                             f"got {self.fixed_staleness!r}")
        if self.pipeline_depth is not None and self.fixed_staleness is not None:
            raise ValueError(f"SchedulerConfig.pipeline_depth must be None in fixed:k mode (fixed_staleness="
                             f"{self.fixed_staleness}), got {self.pipeline_depth!r}")
        if self.pipeline_depth is not None and (not _is_int(self.pipeline_depth)
                                                or not 0 <= self.pipeline_depth <= self.max_staleness):
            raise ValueError(f"SchedulerConfig.pipeline_depth must be None or an int in [0, max_staleness="
                             f"{self.max_staleness}], got {self.pipeline_depth!r}")

    @classmethod
    def parse(cls, spec: str, **fields) -> SchedulerConfig:
        """"fixed:k" -> fixed_staleness=k; "η" (an integer) -> max_staleness=η. Other fields pass through."""
        s = str(spec).strip()
        head, _, k = s.partition(":")
        if head == "fixed" and k.strip().lstrip("-").isdigit():
            return cls(**fields, fixed_staleness=int(k))
        if s.lstrip("-").isdigit():
            return cls(**fields, max_staleness=int(s))
        raise ValueError(f"staleness spec must be 'fixed:<k>' or an integer η, got {spec!r}")

    @property
    def spec(self) -> str:
        """The staleness knob as `parse` reads it: "fixed:k" in fixed:k mode, else "η"."""
        return str(self.max_staleness) if self.fixed_staleness is None else f"fixed:{self.fixed_staleness}"

    @property
    def eta(self) -> int:
        """The staleness bound in force: k in fixed:k mode, else max_staleness."""
        return self.max_staleness if self.fixed_staleness is None else self.fixed_staleness

    @property
    def depth(self) -> int:
        """How many versions admission runs ahead of the learner (the capacity rule's D): pipeline_depth, else η."""
        return self.eta if self.pipeline_depth is None else self.pipeline_depth


@dataclass
class Scheduler:
    cfg: SchedulerConfig
    version: int = 0                     # learner weight version = learner steps taken
    record_ops: bool = False             # keep the operation log in `ops`
    n_admitted: int = field(default=0, init=False)
    in_flight: int = field(default=0, init=False)
    n_trained: int = field(default=0, init=False)   # trajectories in batches returned by next_batch
    n_dropped: int = field(default=0, init=False)
    ops: list[tuple[str, int]] = field(default_factory=list, init=False)
    _v0: int = field(default=0, init=False, repr=False)                  # version at construction
    _flying: Counter = field(default_factory=Counter, init=False, repr=False)  # admission version -> count
    _ready: list = field(default_factory=list, init=False, repr=False)   # heap of (behav_version, seq, traj)
    _ready_versions: Counter = field(default_factory=Counter, init=False, repr=False)  # behav_version -> n ready
    _seq: int = field(default=0, init=False, repr=False)                 # arrival counter, breaks ties
    _taken: bool = field(default=False, init=False, repr=False)          # batch for this version returned
    _drops_since_batch: int = field(default=0, init=False, repr=False)
    _dropped: list = field(default_factory=list, init=False, repr=False)  # dropped, not yet taken by pop_dropped

    def __post_init__(self):
        if not _is_int(self.version) or self.version < 0:
            raise ValueError(f"Scheduler.version must be an int >= 0, got {self.version!r}")
        self._v0 = self.version

    @property
    def n_ready(self) -> int:
        return len(self._ready)

    @property
    def fixed(self) -> bool:
        return self.cfg.fixed_staleness is not None

    def counts(self) -> dict[str, int]:
        """Counters for metrics and traces."""
        return dict(version=self.version, n_admitted=self.n_admitted, in_flight=self.in_flight,
                    n_ready=self.n_ready, n_trained=self.n_trained, n_dropped=self.n_dropped)

    def headroom(self) -> int:
        """How many try_admit calls would succeed now (the capacity rule's slack), so a driver can wake exactly
        that many waiting rollout engines instead of all of them."""
        B, steps = self.cfg.batch_size, self.version - self._v0
        return max(0, (steps + self.cfg.depth + 1) * B - (self.n_admitted - self.n_dropped))

    def _log(self, op: str, arg: int) -> None:
        if self.record_ops:
            self.ops.append((op, arg))

    # --- the four calls ---

    def try_admit(self) -> int | None:
        """Admit one rollout: the weight version to generate with, or None (capacity full)."""
        B, steps = self.cfg.batch_size, self.version - self._v0
        if self.n_admitted - self.n_dropped >= (steps + self.cfg.depth + 1) * B:
            return None
        w = max(0, self._v0 + self.n_admitted // B - self.cfg.eta) if self.fixed else self.version
        self.n_admitted += 1
        self.in_flight += 1
        self._flying[w] += 1
        self._log("admit", w)
        return w

    def on_rollout_done(self, traj: Trajectory) -> None:
        """Take back a finished rollout: it joins the ready pool, or is dropped if already too stale."""
        a, w = traj.admit_version, traj.behav_version      # admission matched by a; staleness counted from w >= a
        if self._flying[a] == 0:                   # Counter lookup: 0 when absent, inserts nothing
            raise ValueError(f"trajectory {traj.uid} has admit_version={a} (behav_version={w}) but no rollout "
                             f"admitted at that version is in flight (outstanding: {dict(sorted(self._flying.items()))})")
        if traj.newest_version > self.version:
            raise ValueError(f"trajectory {traj.uid} has a token from version {traj.newest_version}, "
                             f"newer than the learner's {self.version}")
        self._flying[a] -= 1
        if self._flying[a] == 0:
            del self._flying[a]
        self.in_flight -= 1
        heapq.heappush(self._ready, (w, self._seq, traj))
        self._ready_versions[w] += 1
        self._seq += 1
        self._log("done", traj.uid)
        self._drop_stale()

    def next_batch(self) -> Batch | None:
        """The batch to train at the current version, or None (the learner must wait)."""
        if self._taken:
            raise RuntimeError(f"next_batch called twice at version {self.version}; "
                               f"call on_learner_step after training the batch")
        B = self.cfg.batch_size
        if self.n_ready < B:
            return None
        if self.fixed or self.cfg.on_stale == "wait":
            # the B oldest untrained must all be ready: no in-flight rollout older than the B-th oldest ready one,
            # i.e. at least B ready ones are no newer than the oldest in flight (O(distinct versions) to check)
            if self._flying:
                oldest_flying = min(self._flying)
                if sum(n for w, n in self._ready_versions.items() if w <= oldest_flying) < B:
                    return None
        if self.cfg.on_stale == "deadline" and not self.fixed and not self._deadlines_feasible():
            return None
        from asyncopd.rollout import Batch   # here, not at the top: a config check imports no torch
        trajs = [self._pop_ready() for _ in range(B)]
        batch = Batch(trajs=trajs, version=self.version, n_dropped=self._drops_since_batch)
        assert max(batch.staleness) <= self.cfg.eta, batch.staleness   # guaranteed by the policy (docstring)
        self._drops_since_batch = 0
        self.n_trained += B
        self._taken = True
        self._log("batch", B)
        return batch

    def on_learner_step(self) -> int:
        """The learner trained this version's batch: bump and return the new version."""
        if not self._taken:
            raise RuntimeError(f"on_learner_step at version {self.version} before next_batch returned its batch")
        self._taken = False
        self.version += 1
        self._log("step", self.version)
        self._drop_stale()
        return self.version

    def pop_dropped(self) -> list[Trajectory]:
        """The trajectories dropped since the last call, oldest first, so a driver can name them in its trace
        (drops happen inside on_rollout_done and on_learner_step)."""
        out, self._dropped = self._dropped, []
        return out

    def _deadlines_feasible(self) -> bool:
        """Deadline mode: after a batch of the B earliest-deadline ready trajectories, can the untrained rest still
        be trained by earliest deadline first, B per version? For every deadline u:
        #{left with d ≤ u} ≤ (u − v)·B."""
        B, eta, v = self.cfg.batch_size, self.cfg.eta, self.version
        left = Counter({a + eta: n for a, n in self._flying.items()})   # in flight: deadline from admission
        take = B
        for w in sorted(self._ready_versions):                           # the batch takes the oldest ready
            n = self._ready_versions[w]
            left[w + eta] += n - min(n, take)
            take -= min(n, take)
        behind = 0
        for d in sorted(k for k, n in left.items() if n):
            behind += left[d]
            if behind > (d - v) * B:
                return False
        return True

    def _pop_ready(self) -> Trajectory:
        w, _, traj = heapq.heappop(self._ready)
        self._ready_versions[w] -= 1
        if not self._ready_versions[w]:
            del self._ready_versions[w]
        return traj

    def _drop_stale(self) -> None:
        """Drop mode: ready trajectories that can no longer be trained within η (oldest sit at the heap top)."""
        if self.fixed or self.cfg.on_stale != "drop":
            return
        while self._ready and self.version - self._ready[0][0] > self.cfg.max_staleness:
            self._dropped.append(self._pop_ready())
            self.n_dropped += 1
            self._drops_since_batch += 1
