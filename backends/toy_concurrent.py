"""The toy backend's concurrent run: rollout worker(s), teacher and learner as OS processes on the wall clock.

The one idea: the same scheduler as the lockstep run, but now time is real. The main process is the learner and
owns the `Scheduler` (bounded-async mode, `staleness=<η>`); it admits rollouts to capacity and sends each
rollout worker its share, (uid, prompt, admit_version) least-loaded worker first, as one message per admission
round (unpickling 64 small messages, one tensor each, cost the worker ~28 ms per step: a fifth of it), trains
whenever `next_batch` gives it B scored trajectories, and publishes (version, weights) to every worker.
Processes (spawn context), joined by bounded queues:

    learner (main) --requests--> rollout worker i --trajectories--> teacher --scored--> learner
                   --weights---> rollout worker i            (placement=colocate_teacher_with_rollout: the
                                                               worker scores its own trajectories)

Each rollout worker steps its `ToyRolloutEngine` continuously (continuous batching). A request admitted at
version w starts on weights >= w (the worker waits for them if they are still in transit); with
`weight_update=in_flight` new weights are loaded between decode steps and running sequences continue on them
(KV cache kept or recomputed: `kv_on_update`), with `between_rollouts` the worker stops starting requests,
drains its engine, then loads. A trajectory carries `admit_version` (what the scheduler admitted) and
`behav_version` (its oldest token's version), so staleness is always counted from the weights that really
produced it. Every process calls `torch.set_num_threads(threads_per_role)` so the roles overlap.

Outputs as lockstep (metrics.csv, trace.csv + trace.json, checkpoint/), plus staleness_hist.csv (trajectories
trained since this process started, as sim.run writes it) and run_info.json (placement, final
scheduler counts: n_admitted = n_trained + n_dropped + in_flight + n_ready). Trace times are `time.monotonic()`
(one clock for all processes on Linux) from a shared origin; rollout workers add `decode_iter` events, and a
rollout span starts when the worker queues the request in its engine (queueing for a slot included).
Shutdown: Ctrl-C, a worker's exception or its death ends the run with the failing worker named; children are
stopped, joined and, if they hang, terminated. Not reproducible by design (wall-clock interleaving); the
learner state is checkpointed like lockstep and `resume=true` continues from it (in-flight rollouts are lost).
"""

from __future__ import annotations

import copyreg
import io
import json
import logging
import multiprocessing as mp
import multiprocessing.queues
import os
import pickle
import queue
import signal
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asyncopd import trace
from asyncopd.objective import cache_layout
from asyncopd.scheduler import Scheduler, SchedulerConfig
from backends import checkpoint
from backends.evaluate import Evaluator
from backends.session import batch_monitors, config_digest
from backends.toy import build_models
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_teacher import ToyTeacher, scored_tokens

log = logging.getLogger(__name__)
PLACEMENTS = ("separate", "colocate_teacher_with_rollout")
WEIGHT_UPDATES = ("in_flight", "between_rollouts")
CRASH_ENV = "ASYNCOPD_TEST_CRASH_ROLLOUT_AFTER"   # test hook: rollout worker 0 raises after this many rollouts
POLL_S = 0.005                                   # idle wait of a process loop


@dataclass
class ConcurrentConfig:
    rollout_workers: int = 1             # rollout worker processes, each with its own engine, >= 1
    placement: str = "separate"          # separate: a teacher process | colocate_teacher_with_rollout
    weight_update: str = "in_flight"     # in_flight: load between decode steps | between_rollouts: drain first
    kv_on_update: str = "keep"           # in_flight only: running sequences keep their KV cache | recompute it
    on_stale: str = "drop"               # scheduler policy for too-stale rollouts: drop | wait
    threads_per_role: int = 1            # torch threads in every process, >= 1
    queue_batches: int = 2               # bound of the trajectory queues, in batches of B, >= 1
    join_timeout_s: float = 10.0         # wait this long for a child to exit before terminating it

    def __post_init__(self):
        for name, allowed in (("placement", PLACEMENTS), ("weight_update", WEIGHT_UPDATES),
                              ("kv_on_update", ("keep", "recompute")), ("on_stale", ("drop", "wait"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"concurrent.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("rollout_workers", "threads_per_role", "queue_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"concurrent.{name} must be >= 1, got {getattr(self, name)!r}")


def parse_eta(spec: str) -> int:
    """'η' (an integer >= 0) -> η. fixed:k is the lockstep n-step-off protocol and has no concurrent meaning."""
    s = str(spec).strip()
    if s.isdigit():
        return int(s)
    raise ValueError(f"exec=concurrent takes staleness=<η>, an integer >= 0 (the bounded-async scheduler's "
                     f"max_staleness; 0 = synchronous), got {spec!r}; fixed:k is lockstep-only")


# --- children ------------------------------------------------------------------------------------------------

def _dumps(obj) -> bytes:
    """Pickle with tensors as numpy arrays: torch's own tensor pickling (a torch.save per tensor) costs ~0.1 ms
    each, tens of ms per batch of trajectories; a numpy array pickles as one buffer."""
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    p.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: lambda t: (torch.from_numpy, (t.numpy(),))}
    p.dump(obj)
    return buf.getvalue()


def _put(q, obj, stop, on_full=None) -> bool:
    """Put on a bounded queue, giving up when the run stops (so no child blocks forever on a full queue).
    `on_full` runs while the queue stays full: the learner checks that the queue's reader is still alive."""
    while not stop.is_set():
        try:
            q.put(obj, timeout=0.1)
            return True
        except queue.Full:
            if on_full is not None:
                on_full()
    return False


def _child(name: str, target, events_q, stop, *args) -> None:
    """Process entry: ignore Ctrl-C (the learner orchestrates shutdown), report an exception by name, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for q in args:                 # data queues: on shutdown, unread items are discarded rather than block exit
        if isinstance(q, mp.queues.Queue) and q is not events_q:
            q.cancel_join_thread()
    try:
        target(*args)
    except BaseException:
        events_q.put(("error", name, traceback.format_exc()))
        raise


def _flush(rec: trace.Recorder, events_q) -> None:
    if rec.events:
        events_q.put(("events", rec.events))
        rec.events = []


def rollout_worker(i, cfg, model_bytes, teacher_bytes, version, origin, req_q, weights_q, out_q, events_q, stop):
    c, toy = cfg.concurrent, cfg.toy
    torch.set_num_threads(c.threads_per_role)
    task = toy.task()
    topk, n_samples = cache_layout(cfg.objective)
    engine = ToyRolloutEngine(pickle.loads(model_bytes), max_batch=toy.engine_slots,
                              max_new_tokens=task.max_response_len, temperature=toy.temperature, eos_id=task.eos_id,
                              seed=cfg.seed, version=version, capture_samples=n_samples,
                              kv_on_update=c.kv_on_update)
    teacher = ToyTeacher(pickle.loads(teacher_bytes), batch_size=toy.batch_size) if teacher_bytes else None
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    rec = trace.Recorder(time.monotonic, origin=origin)
    crash_after = int(os.environ.get(CRASH_ENV, "0")) if i == 0 else 0
    pending, started, done_acc = deque(), {}, []         # requests not yet in the engine; uid -> (t0, admit_v)
    latest, n_done, t_flush = None, 0, time.monotonic()
    parent = mp.parent_process()
    events_q.put(("ready", f"rollout worker {i}"))
    while not stop.is_set():
        while True:                                       # newest published weights
            try:
                latest = pickle.loads(weights_q.get_nowait())
            except queue.Empty:
                break
        while True:                                       # new requests: one message per admission round
            try:
                msg = req_q.get_nowait()
            except queue.Empty:
                break
            if msg is None:
                return _flush(rec, events_q)
            pending.extend(pickle.loads(msg))
        busy = engine.n_running + engine.n_waiting > 0
        if latest is not None and latest[0] > engine.version and (c.weight_update == "in_flight" or not busy):
            t0 = rec.now()
            engine.load_weights(latest[1], latest[0])
            rec.span("weight_sync", t0, worker=i, version=latest[0], bytes=weight_bytes)
            latest = None
        # start requests whose weights are here; between_rollouts holds them while newer weights wait to load
        hold = c.weight_update == "between_rollouts" and latest is not None and latest[0] > engine.version
        while pending and pending[0][2] <= engine.version and not hold:
            uid, prompt, w = pending.popleft()
            engine.add(prompt, uid)
            started[uid] = (rec.now(), w)
        if engine.n_running + engine.n_waiting == 0:
            _flush(rec, events_q)
            if parent is not None and not parent.is_alive():
                return
            time.sleep(POLL_S)                            # idle, or waiting for weights in transit
            continue
        t0, tokens0, prefill0 = rec.now(), engine.stats.tokens, engine.stats.prefill_tokens
        finished = engine.step()
        rec.span("decode_iter", t0, worker=i, version=engine.version, n_seqs=engine.stats.tokens - tokens0,
                 tokens=engine.stats.prefill_tokens - prefill0)
        for traj in finished:
            t_start, w = started.pop(traj.uid)
            done_acc.append(replace(traj, admit_version=w))
            rec.span("rollout", t_start, worker=i, uid=traj.uid, version=traj.behav_version, tokens=traj.n_tokens)
        n_done += len(finished)
        if crash_after and n_done >= crash_after:
            raise RuntimeError(f"test hook {CRASH_ENV}={crash_after}: rollout worker {i} crashes on purpose")
        idle = engine.n_running + engine.n_waiting == 0
        if done_acc and (teacher is None or idle or len(done_acc) >= max(1, toy.batch_size // 4)):
            if teacher is None:
                _put(out_q, _dumps(done_acc), stop)
            else:                                         # colocated teacher: score here, send to the learner
                t0 = rec.now()
                scores = teacher.score(done_acc, topk=topk, n_samples=n_samples)
                rec.span("teacher", t0, worker=i, n_seqs=len(done_acc),
                         tokens=scored_tokens(done_acc))
                _put(out_q, _dumps((done_acc, scores)), stop)
            done_acc = []
        if time.monotonic() - t_flush > 0.2:
            _flush(rec, events_q)
            t_flush = time.monotonic()
    _flush(rec, events_q)


def teacher_worker(cfg, teacher_bytes, origin, in_q, out_q, events_q, stop):
    torch.set_num_threads(cfg.concurrent.threads_per_role)
    B, (topk, n_samples) = cfg.toy.batch_size, cache_layout(cfg.objective)
    teacher = ToyTeacher(pickle.loads(teacher_bytes), batch_size=B)
    rec = trace.Recorder(time.monotonic, origin=origin)
    events_q.put(("ready", "teacher"))
    while not stop.is_set():
        try:
            trajs = pickle.loads(in_q.get(timeout=0.05))
        except queue.Empty:
            _flush(rec, events_q)
            continue
        while len(trajs) < B:                             # batch whatever else is already waiting
            try:
                trajs += pickle.loads(in_q.get_nowait())
            except queue.Empty:
                break
        t0 = rec.now()
        scores = teacher.score(trajs, topk=topk, n_samples=n_samples)
        rec.span("teacher", t0, n_seqs=len(trajs), tokens=scored_tokens(trajs))
        _put(out_q, _dumps((trajs, scores)), stop)
        _flush(rec, events_q)
    _flush(rec, events_q)


# --- the learner: main process -------------------------------------------------------------------------------

def write_tables(out_dir: Path, rows: list[dict], events: list, hist: Counter) -> None:
    """What a wall-clock run has so far: metrics.csv (atomic rename), trace.csv in time order, staleness_hist.csv."""
    pd.DataFrame(rows).to_csv(out_dir / "metrics.csv.tmp", index=False)
    Path(out_dir / "metrics.csv.tmp").replace(out_dir / "metrics.csv")
    trace.write(sorted(events, key=lambda e: e.t), out_dir / "trace.csv")
    trace.staleness_hist(hist).to_csv(out_dir / "staleness_hist.csv", index=False)


def admit_round(sched: Scheduler, outstanding: list[int], owner: dict[int, int], next_uid: int, prompt_of, rec):
    """Admit to capacity, least-loaded worker first. Returns (per worker its (uid, prompt, admit_version)
    requests, the next uid); `outstanding` and `owner` (uid -> worker) are updated, an admit event per request."""
    sends = [[] for _ in outstanding]
    while (w := sched.try_admit()) is not None:
        i = int(np.argmin(outstanding))
        sends[i].append((next_uid, prompt_of(next_uid), w))
        rec.instant("admit", uid=next_uid, version=w)
        owner[next_uid], outstanding[i] = i, outstanding[i] + 1
        next_uid += 1
    return sends, next_uid


def run(cfg, out_dir: Path) -> pd.DataFrame:
    """One concurrent run; `cfg` is a backends.run.RunConfig with exec=concurrent. Returns the metrics table."""
    toy, objective, c = cfg.toy, cfg.objective, cfg.concurrent
    eta = parse_eta(cfg.staleness)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(c.threads_per_role)
    task, teacher_model, student_model, model_info = build_models(toy)
    B = toy.batch_size
    learner = ToyLearner(student_model, objective, lr=toy.lr, pad_id=task.pad_id, weight_decay=toy.weight_decay,
                         grad_clip=toy.grad_clip, vcpo_lr=toy.vcpo_lr)
    evaluate = Evaluator(task, student_model, teacher_model, n_prompts=toy.eval_prompts, seed=cfg.seed, device="cpu")

    ckpt_root, digest = out_dir / "checkpoint", config_digest(cfg)
    resumed = cfg.resume and learner.resume_checkpoint(ckpt_root, digest=digest)
    if resumed:
        resume_from, _, state = resumed
        start, next_uid = state["version"], state["next_uid"]
        rows = pd.read_csv(out_dir / "metrics.csv").query("step <= @start").to_dict("records")
        events = trace.from_frame(trace.read(out_dir / "trace.csv").query("t <= @state['t_ckpt']"))
        log.info("resumed from %s at version %d", resume_from, start)
    else:
        start, next_uid, events = 0, 0, []
        rows = [{"step": 0, "version": 0, "estimator": objective.name, "eta": eta,
                 **evaluate(learner.model, learner.state_dict(), 0)}]
    sched = Scheduler(SchedulerConfig(batch_size=B, max_staleness=eta, on_stale=c.on_stale), version=start)
    origin = time.monotonic() - (state["t_ckpt"] if events else 0.0)
    rec = trace.Recorder(time.monotonic, origin=origin, events=events)

    def save_outputs(version: int, ckpt: bool = True) -> None:
        write_tables(out_dir, rows, rec.events, hist)
        if ckpt:
            learner.save_checkpoint(ckpt_root, version=version, ring={version: learner.state_dict()},
                                    state={"config_digest": digest, "t_ckpt": rec.now(), "next_uid": next_uid})

    # --- processes and queues ---------------------------------------------------------------------------
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    events_q = ctx.Queue()                                # unbounded, drained by the learner continuously
    scored_q = ctx.Queue(maxsize=c.queue_batches * B)
    colocated = c.placement == "colocate_teacher_with_rollout"
    traj_q = None if colocated else ctx.Queue(maxsize=c.queue_batches * B)
    req_qs = [ctx.Queue(maxsize=(eta + 1) * B + 1) for _ in range(c.rollout_workers)]   # admission rounds
    weights_qs = [ctx.Queue() for _ in range(c.rollout_workers)]   # a few versions at most: drained every step
    student_bytes, teacher_bytes = pickle.dumps(learner.model), pickle.dumps(teacher_model)
    procs: dict[str, mp.Process] = {}
    for i in range(c.rollout_workers):
        procs[f"rollout worker {i}"] = ctx.Process(
            target=_child, name=f"asyncopd-rollout-{i}", daemon=True,
            args=(f"rollout worker {i}", rollout_worker, events_q, stop, i, cfg, student_bytes,
                  teacher_bytes if colocated else None, start, origin, req_qs[i], weights_qs[i],
                  scored_q if colocated else traj_q, events_q, stop))
    if not colocated:
        procs["teacher"] = ctx.Process(target=_child, name="asyncopd-teacher", daemon=True,
                                       args=("teacher", teacher_worker, events_q, stop, cfg, teacher_bytes, origin,
                                             traj_q, scored_q, events_q, stop))

    outstanding = [0] * c.rollout_workers                 # requests sent to worker i and not yet returned
    owner: dict[int, int] = {}
    scores: dict[int, object] = {}                        # uid -> TeacherScores, delivered and not yet trained
    prompt_block = (-1, None)

    def prompt_of(uid: int) -> torch.Tensor:              # prompts of uid block b = uid // B come from seed b
        nonlocal prompt_block
        b = uid // B
        if prompt_block[0] != b:
            prompt_block = (b, task.make_prompts(B, seed=cfg.seed * 1_000_003 + b))
        return prompt_block[1][uid % B]

    def drain_events(block_s: float = 0.0) -> None:
        try:
            while True:
                msg = events_q.get(timeout=block_s) if block_s else events_q.get_nowait()
                if msg[0] == "error":
                    raise RuntimeError(f"{msg[1]} failed: {msg[2].strip().splitlines()[-1]}\n{msg[2]}")
                if msg[0] == "ready":
                    ready.add(msg[1])
                else:
                    rec.events.extend(msg[1])
                block_s = 0.0
        except queue.Empty:
            pass

    def check_children() -> None:
        drain_events()
        for name, p in procs.items():
            if p.exitcode is not None:
                drain_events(0.5)                         # its error report may still be in the pipe
                raise RuntimeError(f"{name} (pid {p.pid}) exited with code {p.exitcode} before the run ended")

    def record_drops() -> None:                           # name what the scheduler just dropped
        for t in sched.pop_dropped():
            rec.instant("drop", uid=t.uid, version=t.behav_version, staleness=float(sched.version - t.behav_version))
            del scores[t.uid]

    ready: set[str] = set()
    hist: Counter = Counter()                             # staleness of every trajectory trained in this process
    try:
        for p in procs.values():
            p.start()
        while len(ready) < len(procs):                    # spawn + imports take seconds: not training time
            check_children()
            drain_events(0.05)
        t_step = time.monotonic()
        while sched.version < cfg.steps:
            check_children()
            sends, next_uid = admit_round(sched, outstanding, owner, next_uid, prompt_of, rec)
            for q, reqs in zip(req_qs, sends):            # one message per worker: a tensor each costs ~0.4 ms
                if reqs:                                  # to unpickle one by one, 28 ms for a batch of 64
                    _put(q, _dumps(reqs), stop, on_full=check_children)
            batch = sched.next_batch()
            if batch is None:
                try:
                    trajs, got = pickle.loads(scored_q.get(timeout=0.05))
                except queue.Empty:
                    continue
                for traj, s in zip(trajs, got):
                    outstanding[owner.pop(traj.uid)] -= 1
                    scores[traj.uid] = s
                    sched.on_rollout_done(traj)
                    record_drops()
                continue
            t0 = rec.now()
            try:
                metrics = learner.step(batch, [scores.pop(t.uid) for t in batch.trajs])
            except FloatingPointError as err:
                raise RuntimeError(f"training diverged at step {sched.version + 1}: {err}. The last good "
                                   f"checkpoint is {checkpoint.latest(ckpt_root)} (resume=true continues)") from err
            learner_s = rec.now() - t0
            version = sched.on_learner_step()
            record_drops()
            hist.update(batch.staleness)
            rec.span("learner_step", t0, version=version, n_seqs=len(batch), tokens=batch.n_tokens,
                     staleness=float(np.mean(batch.staleness)))
            msg = _dumps((version, learner.state_dict()))
            for q in weights_qs:                          # publish; each worker loads the newest it has
                q.put(msg)
            now = time.monotonic()
            step_s, t_step = now - t_step, now
            row = {"step": version, "version": version, "estimator": objective.name, "eta": eta,
                   **batch_monitors(task, batch), **metrics, "ess": metrics.get("ess", float("nan")), "n_dropped": batch.n_dropped,
                   "step_s": step_s, "learner_s": learner_s, "samples_per_s": B / step_s,
                   **{k: v for k, v in sched.counts().items() if k != "version"}}
            if version % toy.eval_every == 0 or version == cfg.steps:
                row.update(evaluate(learner.model, learner.state_dict(), version))
                t_step = time.monotonic()                 # evaluation time is not training throughput
            rows.append(row)
            if version % toy.ckpt_every == 0 or version == cfg.steps:
                drain_events()
                save_outputs(version)
                t_step = time.monotonic()
    except KeyboardInterrupt:
        log.warning("interrupted at version %d: stopping the workers; last checkpoint %s", sched.version,
                    checkpoint.latest(ckpt_root))
        raise
    finally:
        _shutdown(procs, stop, req_qs, events_q, rec, c.join_timeout_s)

    counts = sched.counts()
    assert counts["n_admitted"] == counts["in_flight"] + counts["n_ready"] + counts["n_trained"] + counts["n_dropped"]
    if start >= cfg.steps:
        log.info("nothing to do: the checkpoint is already at step %d >= steps=%d", start, cfg.steps)
    else:
        save_outputs(sched.version, ckpt=False)           # the trace now holds the children's last events too
    info = {"exec": "concurrent", "eta": eta, "batch_size": B, "engine_slots": toy.engine_slots,
            "placement": c.placement, "rollout_workers": c.rollout_workers,
            "weight_update": c.weight_update, "kv_on_update": c.kv_on_update, "on_stale": c.on_stale,
            "threads_per_role": c.threads_per_role, "scheduler": counts, "resumed_from_step": start}
    trace.to_perfetto(rec.events, out_dir / "trace.json")
    perfetto = json.loads((out_dir / "trace.json").read_text())   # placement etc. as the trace's metadata
    (out_dir / "trace.json").write_text(json.dumps({**perfetto, "otherData": info}))
    (out_dir / "models.json").write_text(json.dumps(model_info, indent=1, default=str))
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=1))
    return pd.DataFrame(rows)


def _shutdown(procs, stop, req_qs, events_q, rec, timeout_s: float) -> None:
    """Stop every child: signal, join while draining their events, terminate (then kill) whatever hangs."""
    stop.set()
    for q in req_qs:
        try:
            q.put_nowait(None)
        except queue.Full:
            pass
    deadline = time.monotonic() + timeout_s
    for name, p in procs.items():
        while p.is_alive() and time.monotonic() < deadline:
            try:                                           # keep the pipe empty so its feeder thread can exit
                msg = events_q.get(timeout=0.05)
                if msg[0] == "events":
                    rec.events.extend(msg[1])
            except queue.Empty:
                pass
        if p.is_alive():
            log.warning("%s (pid %d) did not exit in %.0f s: terminating it", name, p.pid, timeout_s)
            p.terminate()
            p.join(2.0)
            if p.is_alive():
                p.kill()
        p.join(timeout=2.0)
    rec.events.sort(key=lambda e: e.t)
