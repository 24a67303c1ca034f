"""Sim-scheduled training: the lockstep run replays a simulator's schedule (`staleness=schedule:<file>`).

The one idea: `python -m sim.run ... schedule=true` writes the scheduler's operation log (schedule.json: admit w,
done uid, batch n, step v; see asyncopd/scheduler.py), and this run drives a fresh `Scheduler` with the same
config through the same operations, so a tiny model is trained under exactly the staleness pattern the simulated
cluster would produce. Per operation:

    admit w    the driver's admit must return version w (else the schedule and the scheduler disagree: error);
               rollout uid is queued and generated, in groups, with the weights of version w (a ring of the
               last η+1 versions)
    done uid   its trajectory goes to the driver (too-stale ones are dropped exactly as in the simulation)
    batch n    next_batch returns the n trajectories; the teacher scores them and the learner steps
    step v     the driver's `stepped` returns v; the new weights join the ring; eval and checkpoint as lockstep

Uids are admission indices, as the simulator numbers them; prompts and tokens are functions of the uid (the
session's prompts, the engine's counter RNG), so a replay is deterministic, and the trained staleness histogram
(staleness_hist.csv, as sim.run writes it) equals the simulated one (tests/test_replay.py). A checkpoint
also stores the trajectories generated but not yet trained (pending.safetensors: safetensors, never a pickle)
and the operation index, so `resume=true` rebuilds the scheduler by replaying the log up to that index and
continues exactly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from asyncopd.driver import Driver
from asyncopd.objective import cache_layout
from asyncopd.protocols import Learner, RolloutEngine, Teacher
from asyncopd.rollout import Trajectory, dump_trajectories, load_trajectories, scored_tokens
from asyncopd.scheduler import Scheduler, SchedulerConfig
from backends.session import RunSession, state_bytes
from backends.toy import lockstep_parts

log = logging.getLogger(__name__)


OPS = ("admit", "done", "batch", "step")        # the operation log's names (asyncopd/scheduler.py)


def load_schedule(path: str | Path, batch_size: int, steps: int) -> dict:
    """schedule.json from sim.run, checked before any model is built: its shape, its scheduler config, the run's
    B and steps, and that the whole op log replays on a fresh scheduler (`replay_ops`). Every problem is one
    ValueError that starts with the file's path."""
    path = Path(path)
    if not path.is_file():
        what = "not a file" if path.exists() else "no such file"
        raise ValueError(f"{path}: {what} (staleness=schedule:<file>; write one with python -m sim.run schedule=true)")
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, OSError) as err:                 # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({err}); the file may be truncated: write it again with "
                         f"python -m sim.run schedule=true") from None
    keys = ("scheduler", "steps", "ops")
    if not isinstance(doc, dict) or not all(k in doc for k in keys):
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: not a schedule: expected a JSON object with keys {', '.join(keys)} "
                         f"(python -m sim.run schedule=true writes one), got {got}")
    if not isinstance(doc["scheduler"], dict):
        raise ValueError(f"{path}: 'scheduler' must be an object of SchedulerConfig fields, got {doc['scheduler']!r}")
    try:
        doc["scheduler"] = SchedulerConfig(**doc["scheduler"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its scheduler config is refused: {err}") from None
    ops = doc["ops"]
    if not isinstance(ops, list):
        raise ValueError(f"{path}: 'ops' must be a list of [op, int] pairs, got {type(ops).__name__}")
    for i, entry in enumerate(ops):
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in OPS and type(entry[1]) is int):
            raise ValueError(f"{path}: ops[{i}] is {json.dumps(entry)}; each op must be [op, int] with op one of "
                             f"{', '.join(OPS)}")
    B = doc["scheduler"].batch_size
    if B != batch_size:
        raise ValueError(f"{path}: the schedule has batch_size={B}, but toy.batch_size={batch_size}: "
                         f"set toy.batch_size={B}")
    try:
        replay_ops(Scheduler(doc["scheduler"]), ops)
    except ValueError as err:
        raise ValueError(f"{path}: the ops do not replay on a fresh scheduler with its config: {err}") from None
    n = sum(op == "step" for op, _ in ops)
    if steps > n:
        raise ValueError(f"{path}: steps={steps} is more than the {n} learner steps in schedule"
                         + (f" (its header says steps={doc['steps']}: the op list is cut short)"
                            if doc["steps"] != n else "; simulate more: python -m sim.run steps=... schedule=true"))
    if doc["steps"] != n:
        raise ValueError(f"{path}: its header says steps={doc['steps']!r}, but its ops hold {n} learner steps")
    return doc


def replay_ops(sched: Scheduler, ops: list, pending: dict[int, Trajectory] | None = None) -> None:
    """Drive `sched` through `ops` as the replay does. Trajectories still alive at the end are taken from
    `pending` (a resumed run's); the others only need their version (content-free stand-ins, so this is cheap).
    ValueError naming the first operation the scheduler disagrees with."""
    pending = pending or {}
    flying: dict[int, int] = {}                          # uid -> admission version, admitted and not yet done
    for i, (op, a) in enumerate(ops):
        try:
            _apply(sched, op, a, flying, pending)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"operation {i} [{op!r}, {a}]: {err}") from None


def _apply(sched: Scheduler, op: str, a: int, flying: dict[int, int], pending: dict[int, Trajectory]) -> None:
    if op == "admit":
        uid, w = sched.n_admitted, sched.try_admit()
        if w is None:
            raise ValueError(f"the scheduler admits nothing here (capacity full: {sched.in_flight} in flight, "
                             f"{sched.n_ready} ready at version {sched.version})")
        if w != a:
            raise ValueError(f"the scheduler admits at version {w}, the schedule says {a}")
        flying[uid] = w
    elif op == "done":
        if a not in flying:
            raise ValueError(f"uid {a} was never admitted ({sched.n_admitted} admissions so far)"
                             if not 0 <= a < sched.n_admitted else f"uid {a} is not in flight (already done)")
        w = flying.pop(a)
        sched.on_rollout_done(pending.get(a) or Trajectory.fake(a, 1, w))
    elif op == "batch":
        batch = sched.next_batch()
        if batch is None:
            raise ValueError(f"no batch is ready at version {sched.version} ({sched.n_ready} ready, "
                             f"{sched.in_flight} in flight, B={sched.cfg.batch_size})")
        if len(batch) != a:
            raise ValueError(f"the batch holds {len(batch)} trajectories, the schedule says {a}")
    else:
        v = sched.on_learner_step()
        if v != a:
            raise ValueError(f"the learner step makes version {v}, the schedule says {a}")


def rebuild_scheduler(doc: dict, n_ops: int, pending: dict[int, Trajectory]) -> Scheduler:
    """The scheduler after the first n_ops operations. Trajectories that are still alive (in flight or ready)
    at that point are taken from `pending`; the others only need their version (content-free stand-ins)."""
    sched = Scheduler(doc["scheduler"])
    replay_ops(sched, doc["ops"][:n_ops], pending)
    sched.pop_dropped()
    return sched


def run(cfg, out_dir: Path) -> pd.DataFrame:
    """One replayed run; `cfg` is a backends.run.RunConfig with staleness=schedule:<file>."""
    doc = load_schedule(cfg.schedule_file, cfg.toy.batch_size, cfg.steps)
    task, engine, teacher, learner, evaluate, model_info = lockstep_parts(cfg)
    with RunSession(cfg, out_dir, mode="replay", task=task) as session:
        resumed = session.resume(learner.resume_checkpoint)
        if resumed:
            pending = {t.uid: t for t in load_trajectories(resumed["path"] / "pending.safetensors")}
            state = resumed["state"]
            replay = Replay(cfg, session, doc, engine, teacher, learner, evaluate, resumed["ring"], pending,
                            session.driver(rebuild_scheduler(doc, state["op_index"], pending), state))
            replay.i, replay.queued = state["op_index"], [tuple(q) for q in state["queued"]]
        else:
            replay = Replay(cfg, session, doc, engine, teacher, learner, evaluate, {0: learner.state_dict()}, {},
                            session.driver(Scheduler(doc["scheduler"])))
            session.first_row(evaluate(learner.model, replay.ring[0], 0))
        desc = f"{cfg.objective.name} {Path(cfg.schedule_file).name}"
        with tqdm(total=cfg.steps, initial=session.start, desc=desc) as bar:
            while replay.driver.sched.version < cfg.steps:
                if replay.next_op():
                    bar.update(1)
        return session.finish(replay.driver, {"backend": cfg.backend, "schedule": cfg.schedule_file}, model_info)


class Replay:
    """The schedule's operations, one `next_op` at a time, over the roles and the ring of past versions."""

    def __init__(self, cfg, session: RunSession, doc: dict, engine: RolloutEngine, teacher: Teacher, learner: Learner,
                 evaluate, ring: dict, pending: dict, driver: Driver):
        self.cfg, self.session, self.ops, self.eta = cfg, session, doc["ops"], doc["scheduler"].eta
        self.engine, self.teacher, self.learner, self.evaluate = engine, teacher, learner, evaluate
        self.ring, self.pending, self.driver = ring, pending, driver  # pending: generated, not trained or dropped
        self.topk, self.n_samples = cache_layout(cfg.objective)
        self.i, self.queued = 0, []                       # next operation; admitted (uid, w) not yet generated
        self.batch, self.metrics, self.t_step = None, None, time.monotonic()

    def next_op(self) -> bool:
        """Carry out operation i; True when it was a learner step."""
        op, a = self.ops[self.i]
        self.i += 1
        if op == "admit":
            uid, w = self.driver.admit()
            if w != a:
                raise RuntimeError(f"schedule operation {self.i - 1}: the scheduler admitted at version {w}, the "
                                   f"schedule says {a}: the file does not belong to this scheduler config")
            self.queued.append((uid, w))
        elif op == "done":
            if a not in self.pending:
                self.generate_queued()
            for uid in self.driver.done(self.pending[a]):
                del self.pending[uid]
        elif op == "batch":
            self.train()
        else:
            self.step()
            return True
        return False

    def generate_queued(self) -> None:
        """Generate every admitted, not yet generated rollout, one engine call per weight version."""
        rec = self.session.rec
        for w in sorted({w for _, w in self.queued}):
            uids = [u for u, x in self.queued if x == w]
            if self.engine.version != w:
                t0 = rec.now()
                self.engine.load_weights(self.ring[w], w)
                rec.span("weight_sync", t0, version=w, bytes=state_bytes(self.ring[w]))
            t0 = rec.now()
            for traj in self.engine.generate([self.session.prompt(u) for u in uids], uids):
                rec.span("rollout", t0, uid=traj.uid, version=w, tokens=traj.n_tokens)
                self.pending[traj.uid] = traj
        self.queued.clear()

    def train(self) -> None:
        rec, batch = self.session.rec, self.driver.next_batch()
        for t in batch.trajs:
            del self.pending[t.uid]
        t0 = rec.now()
        scores = self.teacher.score(batch.trajs, topk=self.topk, n_samples=self.n_samples)
        rec.span("teacher", t0, n_seqs=len(batch), tokens=scored_tokens(batch.trajs))
        self.t_learn = rec.now()
        try:
            self.metrics = self.learner.step(batch, scores)
        except FloatingPointError as err:
            raise self.session.diverged(err, batch.version) from err
        self.learner_s, self.batch = rec.now() - self.t_learn, batch

    def step(self) -> None:
        session = self.session
        self.generate_queued()                            # admissions before the step use the old weights
        version, dropped = self.driver.stepped(self.batch, self.t_learn, dur_s=self.learner_s)
        for uid in dropped:
            del self.pending[uid]
        self.ring[version] = self.learner.state_dict()
        for old in [u for u in self.ring if u < version - self.eta]:
            del self.ring[old]
        now = time.monotonic()
        row = session.row(version, self.batch, self.metrics, self.driver, step_s=now - self.t_step,
                          learner_s=self.learner_s)
        if session.due_eval(version):
            row.update(self.evaluate(self.learner.model, self.ring[version], version))
        session.record(row)
        if session.due_checkpoint(version):
            self.checkpoint(version)
        self.t_step = time.monotonic()

    def checkpoint(self, version: int) -> None:
        pending = dump_trajectories(list(self.pending.values()))
        self.session.checkpoint(version, self.driver, self.learner.save_checkpoint, ring=self.ring,
                                state={"op_index": self.i, "queued": self.queued},
                                extra={"pending.safetensors": pending})
