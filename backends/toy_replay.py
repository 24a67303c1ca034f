"""Sim-scheduled training: the toy lockstep run replays a simulator's schedule (`staleness=schedule:<file>`).

The one idea: `python -m sim.run ... schedule=true` writes the scheduler's operation log (schedule.json: admit w,
done uid, batch n, step v; see asyncopd/scheduler.py), and this run drives a fresh `Scheduler` with the same
config through the same operations, so a tiny model is trained under exactly the staleness pattern the simulated
cluster would produce. Per operation:

    admit w    try_admit() must return w (else the schedule and the scheduler disagree: error); rollout uid is
               queued and generated, in groups, with the weights of version w (a ring of the last η+1 versions)
    done uid   its trajectory goes to on_rollout_done (too-stale ones are dropped exactly as in the simulation)
    batch n    next_batch() returns the n trajectories; the teacher scores them and the learner steps
    step v     on_learner_step() returns v; the new weights join the ring; eval and checkpoint as lockstep

Uids are admission indices, as the simulator numbers them; the prompt of uid comes from seed block uid // B and
its tokens from the engine's counter RNG keyed by uid, so a replay is deterministic. The trained staleness
histogram (staleness_hist.csv, as sim.run writes it) therefore equals the simulated one (tests/test_toy_replay.py). A checkpoint also stores the
trajectories generated but not yet trained (pending.pt) and the operation index, so `resume=true` rebuilds the
scheduler by replaying the log up to that index and continues exactly (`pending` holds every trajectory that is
generated and not yet trained or dropped, keyed by uid).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from asyncopd import trace
from asyncopd.objective import cache_layout
from asyncopd.rollout import Trajectory
from asyncopd.scheduler import Scheduler, SchedulerConfig
from backends.toy import batch_monitors, config_digest, lockstep_parts
from backends.toy_teacher import scored_tokens

log = logging.getLogger(__name__)


def load_schedule(path: str | Path, batch_size: int, steps: int) -> dict:
    """schedule.json from sim.run, checked against the run: same B, enough steps."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"staleness=schedule:{path}: no such file (write one with python -m sim.run schedule=true)")
    doc = json.loads(path.read_text())
    doc["scheduler"] = SchedulerConfig(**doc["scheduler"])
    if doc["scheduler"].batch_size != batch_size:
        raise ValueError(f"schedule {path} has batch_size={doc['scheduler'].batch_size}, but toy.batch_size="
                         f"{batch_size}: set toy.batch_size={doc['scheduler'].batch_size}")
    if steps > doc["steps"]:
        raise ValueError(f"steps={steps} is more than the {doc['steps']} learner steps in schedule {path}")
    return doc


def rebuild_scheduler(doc: dict, n_ops: int, pending: dict[int, Trajectory]) -> Scheduler:
    """The scheduler after the first n_ops operations. Trajectories that are still alive (in flight or ready)
    at that point are taken from `pending`; the others only need their version (content-free stand-ins)."""
    sched = Scheduler(doc["scheduler"])
    admitted: dict[int, int] = {}
    for op, a in doc["ops"][:n_ops]:
        if op == "admit":
            uid = sched.n_admitted
            admitted[uid] = sched.try_admit()
        elif op == "done":
            sched.on_rollout_done(pending.get(a) or Trajectory.fake(a, 1, admitted[a]))
        elif op == "batch":
            sched.next_batch()
        else:
            sched.on_learner_step()
    sched.pop_dropped()
    return sched


def run(cfg, out_dir: Path, schedule: str) -> pd.DataFrame:
    """One replayed run; `cfg` is a backends.run.RunConfig with staleness=schedule:<file>."""
    toy, objective = cfg.toy, cfg.objective
    doc = load_schedule(schedule, toy.batch_size, cfg.steps)
    ops, B, eta = doc["ops"], toy.batch_size, doc["scheduler"].eta
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task, engine, teacher, learner, evaluate, model_info = lockstep_parts(cfg)
    topk, n_samples = cache_layout(objective)

    ckpt_root, digest = out_dir / "checkpoint", config_digest(cfg)
    resumed = cfg.resume and learner.resume_checkpoint(ckpt_root, digest=digest)
    if resumed:
        path, ring, state = resumed
        pending = {t.uid: t for t in torch.load(path / "pending.pt", weights_only=False)}
        i0, queued = state["op_index"], [tuple(q) for q in state["queued"]]
        hist = Counter({int(k): n for k, n in state["staleness_hist"].items()})
        sched = rebuild_scheduler(doc, i0, pending)
        rows = pd.read_csv(out_dir / "metrics.csv").query("step <= @sched.version").to_dict("records")
        events = trace.from_frame(trace.read(out_dir / "trace.csv").iloc[:state["n_events"]])
        log.info("resumed from %s at version %d, operation %d", path, sched.version, i0)
    else:
        sched, ring, pending, queued, i0, events = Scheduler(doc["scheduler"]), {0: learner.state_dict()}, {}, [], 0, []
        hist = Counter()                                 # staleness of every trained trajectory
        rows = [{"step": 0, "version": 0, "estimator": objective.name, "schedule": str(schedule),
                 **evaluate(learner.model, ring[0], 0)}]
    recorder = trace.Recorder(time.monotonic, origin=time.monotonic() - (events[-1].t if events else 0.0),
                              events=events)
    prompt_block: dict[int, list] = {}

    def prompt_of(uid: int) -> torch.Tensor:
        b = uid // B
        if b not in prompt_block:
            prompt_block.clear()
            prompt_block[b] = task.make_prompts(B, seed=cfg.seed * 1_000_003 + b)
        return prompt_block[b][uid % B]

    def generate_queued() -> None:
        """Generate every admitted, not yet generated rollout, one engine call per weight version."""
        for w in sorted({w for _, w in queued}):
            uids = [u for u, x in queued if x == w]
            if engine.version != w:
                t0 = recorder.now()
                engine.load_weights(ring[w], w)
                recorder.span("weight_sync", t0, version=w)
            t0 = recorder.now()
            for traj in engine.generate([prompt_of(u) for u in uids], uids):
                recorder.span("rollout", t0, uid=traj.uid, version=w, tokens=traj.n_tokens)
                pending[traj.uid] = traj
        queued.clear()

    def record_drops() -> None:
        for t in sched.pop_dropped():
            del pending[t.uid]
            recorder.instant("drop", uid=t.uid, version=t.behav_version, staleness=float(sched.version - t.behav_version))

    def save_outputs(i: int) -> None:
        pd.DataFrame(rows).to_csv(out_dir / "metrics.csv.tmp", index=False)
        Path(out_dir / "metrics.csv.tmp").replace(out_dir / "metrics.csv")
        trace.write(recorder.events, out_dir / "trace.csv")
        trace.staleness_hist(hist).to_csv(out_dir / "staleness_hist.csv", index=False)
        buf = io.BytesIO()
        torch.save(list(pending.values()), buf)          # generated, not yet trained (in flight or ready)
        learner.save_checkpoint(ckpt_root, version=sched.version, ring=ring, state={"config_digest": digest, "n_events": len(recorder.events), "op_index": i,
                                          "queued": queued, "staleness_hist": hist}, extra={"pending.pt": buf.getvalue()})

    bar = tqdm(total=cfg.steps, initial=sched.version, desc=f"{objective.name} {Path(schedule).name}")
    i = i0
    while sched.version < cfg.steps:
        op, a = ops[i]
        i += 1
        if op == "admit":
            w = sched.try_admit()
            if w != a:
                raise RuntimeError(f"schedule operation {i - 1}: the scheduler admitted at version {w}, the schedule "
                                   f"says {a}: the file does not belong to this scheduler config")
            recorder.instant("admit", uid=sched.n_admitted - 1, version=w)
            queued.append((sched.n_admitted - 1, w))
        elif op == "done":
            if a not in pending:
                generate_queued()
            sched.on_rollout_done(pending[a])
            record_drops()
        elif op == "batch":
            batch = sched.next_batch()
            for t in batch.trajs:
                del pending[t.uid]
            hist.update(batch.staleness)
            t0 = recorder.now()
            scores = teacher.score(batch.trajs, topk=topk, n_samples=n_samples)
            recorder.span("teacher", t0, n_seqs=len(batch), tokens=scored_tokens(batch.trajs))
            t0 = recorder.now()
            metrics = learner.step(batch, scores)
            recorder.span("learner_step", t0, version=sched.version + 1, n_seqs=len(batch),
                          tokens=batch.n_tokens, staleness=float(np.mean(batch.staleness)))
        else:
            generate_queued()                        # admissions before the step use the old weights
            version = sched.on_learner_step()
            record_drops()
            ring[version] = learner.state_dict()
            for old in [u for u in ring if u < version - eta]:
                del ring[old]
            row = {"step": version, "version": version, "estimator": objective.name, "schedule": str(schedule),
                   **batch_monitors(task, batch), **metrics, "n_dropped": batch.n_dropped}
            if version % toy.eval_every == 0 or version == cfg.steps:
                row.update(evaluate(learner.model, ring[version], version))
            rows.append(row)
            bar.update(1)
            if version % toy.ckpt_every == 0 or version == cfg.steps:
                save_outputs(i)
    bar.close()
    trace.to_perfetto(recorder.events, out_dir / "trace.json")
    (out_dir / "models.json").write_text(json.dumps(model_info, indent=1, default=str))
    return pd.DataFrame(rows)
