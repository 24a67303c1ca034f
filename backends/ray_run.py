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

Weights travel as a bucketed torch.distributed broadcast (backends/vllm_fsdp/weight_sync.py) over a gloo group
spanning the learner actor and the rollout actors; rank 0 listens on a TCP port of the learner's node
(`ray.sync_port`, 0 = a free one). After every step but the last the driver starts the learner's `publish` and
every rollout actor's `receive`, which runs beside the engine's decode loop; each receiver records a
`weight_sync` event (bytes, broadcast seconds). The run starts with one such sync at the starting version, so a
resumed run's engines get the checkpoint's weights. The driver waits for a sync to finish before starting the
next (collectives must not interleave); that sync is one training step old by then.

Placement and policies come from `concurrent.*` (rollout_workers = rollout actors, placement, weight_update,
kv_on_update, on_stale, threads_per_role), so the same config runs on one machine without Ray as
exec=concurrent; `ray.*` adds the address and each role's Ray resource request. Outputs are the concurrent
run's: metrics.csv, trace.csv + trace.json, staleness_hist.csv, run_info.json (plus each actor's node),
checkpoint/ (written by the learner actor; `resume=true` continues). Trace times are `time.time()` from the
moment the actors are up, so machines line up as well as their clocks do.

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

import json
import logging
import os
import pickle
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from asyncopd import trace
from asyncopd.scheduler import Scheduler, SchedulerConfig
from backends.session import batch_monitors, config_digest
from backends.toy import build_models
from backends.toy_concurrent import CRASH_ENV, admit_round, parse_eta, write_tables
from backends.weight_sync import DEFAULT_BUCKET_BYTES

log = logging.getLogger(__name__)
WAIT_S = 1.0                    # longest ray.wait before the loop looks again


@dataclass
class RayConfig:
    address: str | None = None           # None: start a local Ray instance | auto | <host>:<port> | ray://<host>:<port>
    num_cpus: int = 3                    # logical CPUs of a local instance, >= 1: the default placement's three
                                         # actors at one each (joining a cluster: the cluster's own)
    num_gpus: int = 0                    # logical GPUs of a local instance, >= 0
    learner_cpus: float = 1.0            # Ray resources of the learner actor (GPUs > 0: it runs on CUDA)
    learner_gpus: float = 0.0
    rollout_cpus: float = 1.0            # ... of each rollout actor (with the colocated teacher inside it)
    rollout_gpus: float = 0.0
    teacher_cpus: float = 1.0            # ... of the teacher actor (placement=separate only)
    teacher_gpus: float = 0.0
    sync_port: int = 0                   # TCP port of the weight-sync rendezvous on the learner's node; 0 = free
    sync_bucket_bytes: int = DEFAULT_BUCKET_BYTES   # weight broadcast bucket, >= 1

    def __post_init__(self):
        a = self.address
        if a is not None and not (a == "auto" or a.startswith("ray://") or a.rpartition(":")[2].isdigit()):
            raise ValueError(f"ray.address must be None (start a local instance), 'auto', '<host>:<port>' or "
                             f"'ray://<host>:<port>', got {a!r}")
        for name, ok, rule in (("num_cpus", self.num_cpus >= 1, ">= 1"), ("num_gpus", self.num_gpus >= 0, ">= 0"),
                               ("sync_port", 0 <= self.sync_port <= 65535, "in [0, 65535]"),
                               ("sync_bucket_bytes", self.sync_bucket_bytes >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"ray.{name} must be {rule}, got {getattr(self, name)!r}")
        for role in ("learner", "rollout", "teacher"):
            cpus, gpus = getattr(self, f"{role}_cpus"), getattr(self, f"{role}_gpus")
            if cpus < 0 or gpus < 0:
                raise ValueError(f"ray.{role}_cpus and ray.{role}_gpus must be >= 0, got {cpus}, {gpus}")
            if gpus > 1 and gpus != int(gpus):
                raise ValueError(f"ray.{role}_gpus above 1 must be a whole number (Ray's rule), got {gpus}")


def check_fits(ray_cfg: RayConfig, concurrent) -> None:
    """A local instance must hold every actor at once, or the run would wait forever for a pending actor."""
    if ray_cfg.address is not None:
        return                           # a cluster's capacity is the cluster's business (actors queue there)
    n, separate = concurrent.rollout_workers, concurrent.placement == "separate"
    for kind, have in (("cpus", ray_cfg.num_cpus), ("gpus", ray_cfg.num_gpus)):
        need = (getattr(ray_cfg, f"learner_{kind}") + n * getattr(ray_cfg, f"rollout_{kind}")
                + separate * getattr(ray_cfg, f"teacher_{kind}"))
        if need > have + 1e-9:
            raise ValueError(f"ray.num_{kind}={have} cannot hold the actors' requests: learner + "
                             f"{n} rollout actor(s){' + teacher' if separate else ''} need {kind}={need:g}; raise "
                             f"ray.num_{kind} or lower ray.*_{kind} (placement={concurrent.placement})")


# --- the driver --------------------------------------------------------------------------------------------

def run(cfg, out_dir: Path) -> pd.DataFrame:
    """One Ray run; `cfg` is a backends.run.RunConfig with exec=ray (and a `ray: RayConfig`). Returns the metrics."""
    import ray

    from backends import ray_actors

    rc, c = cfg.ray, cfg.concurrent
    eta = parse_eta(cfg.staleness)
    check_fits(rc, c)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started_ray = not ray.is_initialized()
    if started_ray:
        if rc.address is None:
            ray.init(address="local", num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, include_dashboard=False)
        else:
            ray.init(address=rc.address)
    actors: dict[str, object] = {}
    try:
        return _drive(cfg, out_dir, eta, ray, ray_actors, actors)
    finally:
        for handle in actors.values():
            ray.kill(handle)
        if started_ray:
            ray.shutdown()


def _drive(cfg, out_dir: Path, eta: int, ray, ray_actors, actors: dict) -> pd.DataFrame:
    toy, objective, c, rc = cfg.toy, cfg.objective, cfg.concurrent, cfg.ray
    B, colocated = toy.batch_size, c.placement == "colocate_teacher_with_rollout"
    task, teacher_model, student_model, model_info = build_models(toy)
    student_ref, teacher_ref = ray.put(pickle.dumps(student_model)), ray.put(pickle.dumps(teacher_model))
    weight_bytes = sum(v.numel() * v.element_size() for v in student_model.state_dict().values())
    ckpt_root, digest = out_dir / "checkpoint", config_digest(cfg)
    roles: dict = {}                                      # ObjectRef not yet read -> the role that answers it

    def call(name: str, method: str, *args):
        ref = getattr(actors[name], method).remote(*args)
        roles[ref] = name
        return ref

    def get(refs):
        """ray.get that fails as soon as any of `refs` fails, naming its role and the actors found dead then
        (a dead rollout actor shows first as the learner's broken weight broadcast)."""
        waiting = list(refs) if isinstance(refs, list) else [refs]
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayError as err:
                dead = [name for name in dead_roles() if name != roles.get(done[0])]
                after = f" after {', '.join(dead)} died" if dead else ""
                raise RuntimeError(f"{roles.get(done[0], 'an actor')} failed{after}: "
                                   f"{str(err).strip().splitlines()[-1]}\n{err}") from err
        for ref in refs if isinstance(refs, list) else [refs]:
            roles.pop(ref, None)
        return ray.get(refs)

    def dead_roles() -> list[str]:
        pings = {name: handle.where.remote() for name, handle in actors.items()}
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

    # --- actors: learner (rank 0), rollout actors (ranks 1..n), teacher; they start side by side -------------
    actors["learner"] = ray.remote(ray_actors.LearnerActor).options(
        num_cpus=rc.learner_cpus, num_gpus=rc.learner_gpus).remote(cfg, student_ref, teacher_ref, str(ckpt_root))
    rollout_names = [f"rollout actor {i}" for i in range(c.rollout_workers)]
    for i, name in enumerate(rollout_names):
        actors[name] = ray.remote(ray_actors.RolloutActor).options(
            num_cpus=rc.rollout_cpus, num_gpus=rc.rollout_gpus, max_concurrency=3).remote(
            i, cfg, student_ref, teacher_ref if colocated else None,
            int(os.environ.get(CRASH_ENV, "0")) if i == 0 else 0)
    if not colocated:
        actors["teacher"] = ray.remote(ray_actors.TeacherActor).options(
            num_cpus=rc.teacher_cpus, num_gpus=rc.teacher_gpus).remote(cfg, teacher_ref)
    resumed = cfg.resume and get(call("learner", "resume", digest))
    if resumed:
        resume_from, state = resumed
        start, next_uid = state["version"], state["next_uid"]
        rows = pd.read_csv(out_dir / "metrics.csv").query("step <= @start").to_dict("records")
        events = trace.from_frame(trace.read(out_dir / "trace.csv").query("t <= @state['t_ckpt']"))
        log.info("resumed from %s at version %d", resume_from, start)
    else:
        start, next_uid, events, rows = 0, 0, [], []
    nodes = dict(zip(actors, get([call(name, "where") for name in actors])))
    init = get(call("learner", "rendezvous", rc.sync_port))
    get([call(name, "join_group", init, rank, 1 + len(rollout_names))
         for rank, name in enumerate(["learner", *rollout_names])])

    # actors stamp absolute time.time(); the trace counts from here (a resumed one continues at its t_ckpt)
    origin = time.time() - (state["t_ckpt"] if resumed else 0.0)
    rec = trace.Recorder(time.time, origin=origin, events=events)

    def take(evs) -> None:
        rec.events.extend(replace(e, t=e.t - origin) for e in evs)

    sched = Scheduler(SchedulerConfig(batch_size=B, max_staleness=eta, on_stale=c.on_stale), version=start)

    def start_sync(version: int) -> list:
        """The learner's publish and every rollout actor's receive of `version`: refs to wait on."""
        return [call("learner", "publish"), *[call(name, "receive", version) for name in rollout_names]]

    def finish(sync_refs: list) -> None:
        take(e for e in get(sync_refs) if e is not None)  # receivers' events; publish gives None

    finish(start_sync(start))                             # the engines start on the learner's weights
    if not resumed:
        rows = [{"step": 0, "version": 0, "estimator": objective.name, "eta": eta,
                 **get(call("learner", "evaluate", 0))}]

    def save_outputs(version: int, ckpt: bool = True) -> None:
        write_tables(out_dir, rows, rec.events, hist)
        if ckpt:
            get(call("learner", "save", version,
                     {"config_digest": digest, "t_ckpt": rec.now(), "next_uid": next_uid}))

    outstanding = [0] * len(rollout_names)                # requests sent to rollout actor i, not yet returned
    owner: dict[int, int] = {}
    scores: dict[int, object] = {}                        # uid -> TeacherScores, delivered and not yet trained
    unscored: list = []                                   # collected, waiting for the teacher (separate)
    scoring: tuple | None = None                          # (ref, trajectories) of the teacher call in flight
    training = None                                       # (ref, batch) of the learner step in flight
    syncs: list = []                                      # receive refs of the weight sync in flight
    hist: Counter = Counter()
    prompt_block = (-1, None)

    def prompt_of(uid: int):                              # prompts of uid block b = uid // B come from seed b
        nonlocal prompt_block
        if prompt_block[0] != uid // B:
            prompt_block = (uid // B, task.make_prompts(B, seed=cfg.seed * 1_000_003 + uid // B))
        return prompt_block[1][uid % B]

    def deliver(trajs, got) -> None:
        for traj, s in zip(trajs, got):
            outstanding[owner.pop(traj.uid)] -= 1
            scores[traj.uid] = s
            sched.on_rollout_done(traj)
            record_drops()

    def record_drops() -> None:
        for t in sched.pop_dropped():
            rec.instant("drop", uid=t.uid, version=t.behav_version, staleness=float(sched.version - t.behav_version))
            del scores[t.uid]

    collecting = {call(name, "collect"): i for i, name in enumerate(rollout_names)}
    t_step = time.monotonic()
    while sched.version < cfg.steps:
        sends, next_uid = admit_round(sched, outstanding, owner, next_uid, prompt_of, rec)
        for name, reqs in zip(rollout_names, sends):
            if reqs:                                      # one chunk per actor and round (not awaited:
                actors[name].submit.remote(reqs)          # a dead actor shows in its collect)
        if training is None and (batch := sched.next_batch()) is not None:
            training = (call("learner", "train", batch, [scores.pop(t.uid) for t in batch.trajs]), batch)
        if scoring is None and unscored:                  # the teacher takes everything waiting at once
            scoring, unscored = (call("teacher", "score", unscored), unscored), []
        waiting = [*collecting, *syncs] + [r for r in (scoring and scoring[0], training and training[0]) if r]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_S)
        for ref in ready:
            if ref in collecting:
                i = collecting.pop(ref)
                trajs, got, evs = get(ref)
                take(evs)
                collecting[call(rollout_names[i], "collect")] = i
                if got is None:
                    unscored += trajs
                else:
                    deliver(trajs, got)
            elif ref in syncs:
                syncs.remove(ref)
                finish([ref])
            elif scoring and ref == scoring[0]:
                got, evs = get(ref)
                take(evs)
                deliver(scoring[1], got)
                scoring = None
            else:                                         # the learner finished a step
                (metrics, event), batch = get(ref), training[1]
                training = None
                version = sched.on_learner_step()
                record_drops()
                hist.update(batch.staleness)
                take([replace(event, version=version, n_seqs=len(batch), tokens=batch.n_tokens,
                              staleness=float(np.mean(batch.staleness)))])
                if version < cfg.steps:
                    finish(syncs)                         # the previous sync: one step old, finished
                    syncs = start_sync(version)
                now = time.monotonic()
                step_s, t_step = now - t_step, now
                row = {"step": version, "version": version, "estimator": objective.name, "eta": eta,
                       **batch_monitors(task, batch), **metrics, "ess": metrics.get("ess", float("nan")),
                       "n_dropped": batch.n_dropped, "step_s": step_s, "learner_s": event.dur_s,
                       "samples_per_s": B / step_s, **{k: v for k, v in sched.counts().items() if k != "version"}}
                if version % toy.eval_every == 0 or version == cfg.steps:
                    row.update(get(call("learner", "evaluate", version)))
                    t_step = time.monotonic()             # evaluation time is not training throughput
                rows.append(row)
                if version % toy.ckpt_every == 0 or version == cfg.steps:
                    save_outputs(version)
                    t_step = time.monotonic()

    # --- wind down: stop the engines and keep their last events; the scheduler's counts stay as they are
    finish(syncs)
    for evs in get([call(name, "stop") for name in rollout_names]):
        take(evs)
    counts = sched.counts()
    assert counts["n_admitted"] == counts["in_flight"] + counts["n_ready"] + counts["n_trained"] + counts["n_dropped"]
    if start >= cfg.steps:
        log.info("nothing to do: the checkpoint is already at step %d >= steps=%d", start, cfg.steps)
    else:
        save_outputs(sched.version, ckpt=False)           # the trace now holds the engines' last events too
    info = {"exec": "ray", "eta": eta, "batch_size": B, "engine_slots": toy.engine_slots,
            "placement": c.placement, "rollout_workers": c.rollout_workers, "weight_update": c.weight_update,
            "kv_on_update": c.kv_on_update, "on_stale": c.on_stale, "threads_per_role": c.threads_per_role,
            "ray": {**asdict(rc), "nodes": nodes, "weight_bytes": weight_bytes},
            "scheduler": counts, "resumed_from_step": start}
    trace.to_perfetto(rec.events, out_dir / "trace.json")
    perfetto = json.loads((out_dir / "trace.json").read_text())
    (out_dir / "trace.json").write_text(json.dumps({**perfetto, "otherData": info}))
    (out_dir / "models.json").write_text(json.dumps(model_info, indent=1, default=str))
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=1))
    return pd.DataFrame(rows)
