"""The toy backend's Ray run: learner, rollout and teacher as Ray actors, the scheduler in the driver.

The one idea: the concurrent run with Ray as the process layer, so the same loop spans machines. The driver
(the process that calls `run`) owns the `Scheduler` (bounded async, `staleness=<η>`) and the trace; it sends each
admission round to the rollout actors as one chunk per actor, least loaded first, keeps one blocking `collect`
call in flight per rollout actor and takes whatever `ray.wait` returns first: finished trajectories go to the
teacher actor (everything unscored in one call while the teacher is idle) or arrive scored
(`placement=colocate_teacher_with_rollout`), then into the scheduler; when `next_batch` gives a batch the
learner trains on it in its own actor while the driver keeps collecting, so rollouts never wait for training.

    driver --submit--> rollout actor i --collect--> driver --score--> teacher actor --> driver --train--> learner
    learner (rank 0) ==broadcast_state_dict (gloo)==> rollout actors (ranks 1..n)

Weights travel as a bucketed torch.distributed broadcast (backends/weight_sync.py) over a gloo group
spanning the learner actor and the rollout actors; rank 0 listens on a TCP port of the learner's node
(`ray.sync_port`, 0 = a free one). After every step but the last the driver starts the learner's `publish` and
every rollout actor's `receive`, which runs beside the engine's decode loop; each receiver records a
`weight_sync` event (bytes, broadcast seconds). The run starts with one such sync at the starting version, so a
resumed run's engines get the checkpoint's weights. The driver waits for a sync to finish before starting the
next (collectives must not interleave); that sync is one training step old by then.

Placement and policies come from `concurrent.*` (rollout_workers = rollout actors, placement, weight_update,
kv_on_update, on_stale, threads_per_role), so the same config runs on one machine without Ray as
exec=concurrent; `ray.*` (RayConfig, backends/config.py) adds the address and each role's Ray resource
request. Outputs are the concurrent run's: metrics.csv, trace.csv + trace.json, staleness_hist.csv,
run_info.json (plus each actor's node), checkpoint/ (written by the learner actor; `resume=true` continues).
Trace times are `time.time()` from the moment the actors are up, so machines line up as well as their clocks do.

    python -m backends.run exec=ray staleness=2 steps=50                   # a local Ray instance (ray.num_cpus)
    ray start --head --num-cpus=8 && python -m backends.run exec=ray ray.address=auto staleness=2 \\
        concurrent.rollout_workers=4 concurrent.placement=separate ray.rollout_cpus=1.5 steps=200
    python -m backends.run exec=ray ray.address=ray://<head>:10001 ...     # from outside the cluster

On a cluster every node needs this repository installed in the same environment (`pip install -e ".[ray]"`),
and the output folder (where the learner actor checkpoints) must be on a file system the learner's node shares
with the driver. Failures: an actor's exception or death ends the run with the role named ("rollout actor 0
failed: ..."); the run's actors are killed on every exit path, and Ray is shut down if the run started it. A
process that has already called `ray.init` (a notebook, the tests) keeps its instance: the run uses it as it is.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from asyncopd.scheduler import Scheduler
from backends.config import RayConfig, check_fits   # torch-free, so a run checks them first; re-exported here
from backends.engine_pump import admit_round
from backends.session import RunSession
from backends.toy import ray_parts
from backends.toy_concurrent import CRASH_ENV

log = logging.getLogger(__name__)
WAIT_S = 1.0                    # longest ray.wait before the loop looks again


# --- the driver --------------------------------------------------------------------------------------------

def run(cfg, out_dir: Path, parts=None) -> pd.DataFrame:
    """One Ray run; `cfg` is a backends.run.RunConfig with exec=ray (and a `ray: RayConfig`). Returns the metrics.
    `parts(cfg)` gives (task, roles, model_info): the toy backend's by default (backends.toy.ray_parts), vLLM +
    FSDP2 with backends.vllm_fsdp.parts.ray_parts."""
    import ray

    rc = cfg.ray
    check_fits(rc, cfg.concurrent)
    started_ray = not ray.is_initialized()
    if started_ray:
        if rc.address is None:
            ray.init(address="local", num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, include_dashboard=False)
        else:
            ray.init(address=rc.address)
    roles = Roles(ray)
    try:
        return _drive(cfg, out_dir, roles, parts or ray_parts)
    finally:
        roles.kill()
        if started_ray:
            ray.shutdown()


class Roles:
    """The run's actors by role name; calls whose failure names the role (and the actors found dead then)."""

    def __init__(self, ray):
        self.ray, self.actors, self.names = ray, {}, {}   # names: ObjectRef not yet read -> role

    def call(self, name: str, method: str, *args, **kwargs):
        ref = getattr(self.actors[name], method).remote(*args, **kwargs)
        self.names[ref] = name
        return ref

    def get(self, refs):
        """ray.get that fails as soon as any of `refs` fails, naming its role and the actors dead by then (a dead
        rollout actor shows first as the learner's broken weight broadcast)."""
        ray, many = self.ray, isinstance(refs, list)
        waiting = list(refs) if many else [refs]
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayError as err:
                role = self.names.get(done[0], "an actor")
                dead = [name for name in self.dead() if name != role]
                after = f" after {', '.join(dead)} died" if dead else ""
                raise RuntimeError(f"{role} failed{after}: {str(err).strip().splitlines()[-1]}\n{err}") from err
        for ref in refs if many else [refs]:
            self.names.pop(ref, None)
        return ray.get(refs)

    def dead(self) -> list[str]:
        ray = self.ray
        pings = {name: handle.where.remote() for name, handle in self.actors.items()}
        ray.wait(list(pings.values()), num_returns=len(pings), timeout=10.0)
        dead = []
        for name, ref in pings.items():
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(name)
            except ray.exceptions.GetTimeoutError:
                pass                                      # busy, not known dead
        return dead

    def kill(self) -> None:
        for handle in self.actors.values():
            self.ray.kill(handle)


def start_actors(cfg, roles: Roles, run_roles) -> list[str]:
    """Learner (rank 0 of the weight-sync group), rollout actors (ranks 1..n) and the teacher, side by side, each
    building its part from `run_roles` (ToyRoles or VLLMRoles). Returns the rollout actors' names."""
    from backends import ray_actors

    ray, c, rc = roles.ray, cfg.concurrent, cfg.ray
    colocated = c.placement == "colocate_teacher_with_rollout"
    roles_ref = ray.put(run_roles)
    roles.actors["learner"] = ray.remote(ray_actors.LearnerActor).options(
        num_cpus=rc.learner_cpus, num_gpus=rc.learner_gpus).remote(cfg, roles_ref)
    names = [f"rollout actor {i}" for i in range(c.rollout_workers)]
    for i, name in enumerate(names):
        roles.actors[name] = ray.remote(ray_actors.RolloutActor).options(
            num_cpus=rc.rollout_cpus, num_gpus=rc.rollout_gpus, max_concurrency=3).remote(
            i, cfg, roles_ref, colocated,
            int(os.environ.get(CRASH_ENV, "0")) if i == 0 else 0)
    if not colocated:
        roles.actors["teacher"] = ray.remote(ray_actors.TeacherActor).options(
            num_cpus=rc.teacher_cpus, num_gpus=rc.teacher_gpus).remote(cfg, roles_ref)
    return names


def _drive(cfg, out_dir: Path, roles: Roles, parts) -> pd.DataFrame:
    toy, c, rc = cfg.toy, cfg.concurrent, cfg.ray
    task, run_roles, model_info = parts(cfg)
    with RunSession(cfg, out_dir, mode="ray", task=task, clock=time.time) as session:
        rollout_names = start_actors(cfg, roles, run_roles)
        resumed = session.resume(lambda root, digest: roles.get(roles.call("learner", "resume", str(root), digest)))
        nodes = dict(zip(roles.actors, roles.get([roles.call(name, "where") for name in roles.actors])))
        init = roles.get(roles.call("learner", "rendezvous", rc.sync_port))
        roles.get([roles.call(name, "join_group", init, rank, 1 + len(rollout_names))
                   for rank, name in enumerate(["learner", *rollout_names])])
        if not resumed:
            session.rec.origin = time.time()              # the trace counts from the moment the actors are up
        driver = session.driver(Scheduler(cfg.scheduler, version=session.start), resumed and resumed["state"])
        loop = RayLoop(cfg, session, driver, roles, rollout_names)
        loop.finish_sync(loop.start_sync(session.start))  # the engines start on the learner's weights
        if not resumed:
            session.first_row(roles.get(roles.call("learner", "evaluate", 0)))
        loop.run()
        loop.wind_down()
        weight_bytes = roles.get(roles.call("learner", "weight_bytes"))
        info = {"engine_slots": toy.engine_slots, "placement": c.placement, "rollout_workers": c.rollout_workers,
                "weight_update": c.weight_update, "kv_on_update": c.kv_on_update, "on_stale": c.on_stale,
                "pipeline_depth": c.pipeline_depth,
                "threads_per_role": c.threads_per_role, "ray": {**asdict(rc), "nodes": nodes,
                                                                "weight_bytes": weight_bytes}}
        return session.finish(driver, info, model_info)


class RayLoop:
    """The driver's loop: admission rounds to the rollout actors, one blocking `collect` in flight per rollout
    actor, the teacher and the learner called asynchronously, whatever `ray.wait` returns first handled first."""

    def __init__(self, cfg, session: RunSession, driver, roles: Roles, rollout_names: list[str]):
        self.cfg, self.session, self.driver, self.roles, self.rollout_names = cfg, session, driver, roles, rollout_names
        self.outstanding, self.owner = [0] * len(rollout_names), {}   # requests per actor; uid -> actor index
        self.scores: dict[int, object] = {}               # uid -> TeacherScores, delivered and not yet trained
        self.unscored: list = []                          # collected, waiting for the teacher (separate)
        self.scoring = None                               # (ref, trajectories) of the teacher call in flight
        self.training = None                              # (ref, batch) of the learner step in flight
        self.syncs: list = []                             # refs of the weight sync in flight
        self.collecting: dict = {}                        # collect ref -> rollout actor index
        self.t_step = time.monotonic()

    def take(self, events) -> None:
        """Actors' events, stamped with absolute time.time(), onto the run's clock."""
        origin = self.session.rec.origin
        self.session.rec.events.extend(replace(e, t=e.t - origin) for e in events if e is not None)

    def start_sync(self, version: int) -> list:
        """The learner's publish and every rollout actor's receive of `version`: refs to wait on."""
        return [self.roles.call("learner", "publish"),
                *[self.roles.call(name, "receive", version) for name in self.rollout_names]]

    def finish_sync(self, refs: list) -> None:
        self.take(self.roles.get(refs))                   # receivers' weight_sync events; publish gives None

    def run(self) -> None:
        roles, ray = self.roles, self.roles.ray
        self.collecting = {roles.call(name, "collect"): i for i, name in enumerate(self.rollout_names)}
        while self.driver.sched.version < self.cfg.steps:
            self.admit()
            if self.training is None and (batch := self.driver.next_batch()) is not None:
                ref = roles.call("learner", "train", batch, [self.scores.pop(t.uid) for t in batch.trajs])
                self.training = (ref, batch)
            if self.scoring is None and self.unscored:    # the teacher takes everything waiting at once
                self.scoring, self.unscored = (roles.call("teacher", "score", self.unscored), self.unscored), []
            waiting = [*self.collecting, *self.syncs] + [x[0] for x in (self.scoring, self.training) if x]
            for ref in ray.wait(waiting, num_returns=1, timeout=WAIT_S)[0]:
                self.handle(ref)

    def admit(self) -> None:
        sends, owner = admit_round(self.driver, self.outstanding, self.session.prompt)
        self.owner.update(owner)
        for name, reqs in zip(self.rollout_names, sends):
            if reqs:                                      # one chunk per actor and round (not awaited:
                self.roles.actors[name].submit.remote(reqs)   # a dead actor shows in its collect)

    def handle(self, ref) -> None:
        roles = self.roles
        if ref in self.collecting:
            i = self.collecting.pop(ref)
            trajs, got, events = roles.get(ref)
            self.take(events)
            self.collecting[roles.call(self.rollout_names[i], "collect")] = i
            if got is None:
                self.unscored += trajs
            else:
                self.deliver(trajs, got)
        elif ref in self.syncs:
            self.syncs.remove(ref)
            self.finish_sync([ref])
        elif self.scoring and ref == self.scoring[0]:
            got, events = roles.get(ref)
            self.take(events)
            self.deliver(self.scoring[1], got)
            self.scoring = None
        else:
            self.stepped(*roles.get(ref))

    def deliver(self, trajs, got) -> None:
        for traj, s in zip(trajs, got):
            self.outstanding[self.owner.pop(traj.uid)] -= 1
            self.scores[traj.uid] = s
            for uid in self.driver.done(traj):
                del self.scores[uid]

    def stepped(self, metrics: dict | None, error: str | None, event) -> None:
        """The learner finished a step: bump the version, start the next weight sync, write the row."""
        session, batch = self.session, self.training[1]
        self.training = None
        if error is not None:
            raise session.diverged(FloatingPointError(error), batch.version)
        version, dropped = self.driver.stepped(batch, event.t - session.rec.origin, dur_s=event.dur_s)
        for uid in dropped:
            del self.scores[uid]
        if version < self.cfg.steps:
            self.finish_sync(self.syncs)                  # the previous sync: one step old, finished
            self.syncs = self.start_sync(version)
        now = time.monotonic()
        row = session.row(version, batch, metrics, self.driver, step_s=now - self.t_step, learner_s=event.dur_s)
        self.t_step = now
        if session.due_eval(version):
            row.update(self.roles.get(self.roles.call("learner", "evaluate", version)))
            self.t_step = time.monotonic()                # evaluation time is not training throughput
        session.record(row)
        if session.due_checkpoint(version):
            session.checkpoint(version, self.driver, self._store)
            self.t_step = time.monotonic()

    def _store(self, root, *, version, ring, state, extra) -> None:
        self.roles.get(self.roles.call("learner", "save_checkpoint", str(root), version=version, ring=ring,
                                       state=state, extra=extra))

    def wind_down(self) -> None:
        """Stop the engines and keep their last events; the scheduler's counts stay as they are."""
        self.finish_sync(self.syncs)
        for events in self.roles.get([self.roles.call(name, "stop") for name in self.rollout_names]):
            self.take(events)
