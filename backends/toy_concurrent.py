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

The scheduler is driven through `asyncopd.driver.Driver`, the files are the run session's (backends/session.py:
metrics.csv, trace.csv + trace.json, staleness_hist.csv, run_info.json with the placement and the final
scheduler counts, checkpoint/), and each rollout worker's body is the rollout pump (backends/engine_pump.py).
Trace times are `time.monotonic()` (one clock for all processes on Linux) from a shared origin; rollout workers
add `decode_iter` events, and a rollout span starts when the worker queues the request in its engine (queueing
for a slot included).
Shutdown: Ctrl-C, a worker's exception or its death ends the run with the failing worker named. The children
are told to stop and are joined while their last events are drained; every queue this process wrote to is
released without waiting for its unread data (a dead reader must not hold the exit), and a child still alive
after join_timeout_s is terminated. Children ignore SIGINT (the learner orchestrates shutdown) and exit by
themselves when the learner process is gone. Not reproducible by design (wall-clock interleaving); the
learner state is checkpointed like lockstep and `resume=true` continues from it (in-flight rollouts are lost).
"""

from __future__ import annotations

import copyreg
import io
import logging
import multiprocessing as mp
import multiprocessing.queues
import os
import pickle
import queue
import signal
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

from asyncopd import trace
from asyncopd.driver import Driver
from asyncopd.objective import cache_layout
from asyncopd.protocols import Learner
from asyncopd.rollout import scored_tokens
from asyncopd.scheduler import Scheduler
from backends.config import ConcurrentConfig   # torch-free, so a run checks it first; re-exported here
from backends.engine_pump import RolloutPump, admit_round
from backends.session import RunSession
from backends.toy import concurrent_parts as toy_concurrent_parts

log = logging.getLogger(__name__)
CRASH_ENV = "ASYNCOPD_TEST_CRASH_ROLLOUT_AFTER"   # test hook: rollout worker 0 raises after this many rollouts
POLL_S = 0.005                                   # idle wait of a process loop
STOP = b"stop"                                   # the learner's last message on a request queue


# --- children ------------------------------------------------------------------------------------------------

def _dumps(obj) -> bytes:
    """Pickle between this run's own live processes only (nothing in a run folder is ever unpickled): with tensors
    as numpy arrays: torch's own tensor pickling (a torch.save per tensor) costs ~0.1 ms
    each, tens of ms per batch of trajectories; a numpy array pickles as one buffer."""
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    p.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: lambda t: (torch.from_numpy, (t.numpy(),))}
    p.dump(obj)
    return buf.getvalue()


def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def _put(q, obj, stop, on_full=None) -> bool:
    """Put on a bounded queue, giving up when the run stops or the learner process is gone (so no child blocks
    forever on a full queue). `on_full` runs while the queue stays full: the learner checks the reader."""
    while not stop.is_set() and _parent_alive():
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


def rollout_worker(i, cfg, roles, colocated, origin, req_q, weights_q, out_q, events_q, stop):
    """A rollout worker process: the rollout pump over this process's queues."""
    c = cfg.concurrent
    torch.set_num_threads(c.threads_per_role)
    topk, n_samples = cache_layout(cfg.objective)
    engine = roles.rollout_engine()
    rec = trace.Recorder(time.monotonic, origin=origin)
    pump = RolloutPump(engine, rec, worker=i, in_flight_updates=c.weight_update == "in_flight",
                       teacher=roles.teacher() if colocated else None, topk=topk, n_samples=n_samples,
                       score_group=cfg.toy.batch_size // 4, trace_loads=True,
                       crash_after=int(os.environ.get(CRASH_ENV, "0")) if i == 0 else 0)
    events_q.put(("ready", f"rollout worker {i}"))
    t_flush = time.monotonic()
    while not stop.is_set():
        while (msg := _get_nowait(weights_q)) is not None:
            pump.offer_weights(*pickle.loads(msg))
        while (msg := _get_nowait(req_q)) is not None:
            if msg == STOP:                               # the learner's stop message
                return _flush(rec, events_q)
            pump.offer(pickle.loads(msg))
        for trajs, scores in pump.tick():                 # to the teacher, or scored to the learner (colocated)
            _put(out_q, _dumps(trajs if scores is None else (trajs, scores)), stop)
        if not pump.busy:
            _flush(rec, events_q)
            if not _parent_alive():
                return
            time.sleep(POLL_S)                            # idle, or waiting for weights in transit
        elif time.monotonic() - t_flush > 0.2:
            _flush(rec, events_q)
            t_flush = time.monotonic()
    _flush(rec, events_q)


def _get_nowait(q):
    try:
        return q.get_nowait()
    except queue.Empty:
        return None


def teacher_worker(cfg, roles, origin, in_q, out_q, events_q, stop):
    torch.set_num_threads(cfg.concurrent.threads_per_role)
    B, (topk, n_samples) = cfg.toy.batch_size, cache_layout(cfg.objective)
    teacher = roles.teacher()
    rec = trace.Recorder(time.monotonic, origin=origin)
    events_q.put(("ready", "teacher"))
    while not stop.is_set():
        try:
            trajs = pickle.loads(in_q.get(timeout=0.05))
        except queue.Empty:
            _flush(rec, events_q)
            if not _parent_alive():
                return
            continue
        while len(trajs) < B and (msg := _get_nowait(in_q)) is not None:   # batch whatever else is waiting
            trajs += pickle.loads(msg)
        t0 = rec.now()
        scores = teacher.score(trajs, topk=topk, n_samples=n_samples)
        rec.span("teacher", t0, n_seqs=len(trajs), tokens=scored_tokens(trajs))
        _put(out_q, _dumps((trajs, scores)), stop)
        _flush(rec, events_q)
    _flush(rec, events_q)


# --- the learner: main process -------------------------------------------------------------------------------

def run(cfg, out_dir: Path, parts=None) -> pd.DataFrame:
    """One concurrent run; `cfg` is a backends.run.RunConfig with exec=concurrent. Returns the metrics table.
    `parts(cfg)` gives (task, roles_of(learner, version), learner, evaluate, model_info): the toy backend's by
    default, vLLM + FSDP2 with backends.vllm_fsdp.parts.concurrent_parts."""
    c = cfg.concurrent
    torch.set_num_threads(c.threads_per_role)
    task, roles_of, learner, evaluate, model_info = (parts or toy_concurrent_parts)(cfg)
    with RunSession(cfg, out_dir, mode="concurrent", task=task) as session:
        resumed = session.resume(learner.resume_checkpoint)
        driver = session.driver(Scheduler(cfg.scheduler, version=session.start), resumed and resumed["state"])
        if not resumed:
            session.first_row(evaluate(learner.model, learner.state_dict(), 0))
        roles = roles_of(learner, session.start)
        workers = Workers(cfg, session, roles)
        try:
            workers.start()
            if roles.version < session.start:             # engines on older weights (vLLM's folders): the
                                                          # checkpoint's weights first
                workers.publish(session.start, learner.state_dict())
            train(cfg, session, driver, workers, learner, evaluate)
        except KeyboardInterrupt:
            log.warning("interrupted at version %d: stopping the workers; the last checkpoint is %s",
                        driver.sched.version, session.last_checkpoint())
            raise
        finally:
            workers.shutdown()
        info = {"backend": cfg.backend, "engine_slots": cfg.toy.engine_slots, "placement": c.placement,
                "rollout_workers": c.rollout_workers, "weight_update": c.weight_update, "kv_on_update": c.kv_on_update,
                "on_stale": c.on_stale, "pipeline_depth": c.pipeline_depth, "threads_per_role": c.threads_per_role}
        return session.finish(driver, info, model_info)


def train(cfg, session: RunSession, driver: Driver, workers: Workers, learner: Learner, evaluate) -> None:
    """The learner's loop: admit to capacity, take scored trajectories, train whenever a batch is ready, publish."""
    rec = session.rec
    outstanding, owner = [0] * cfg.concurrent.rollout_workers, {}   # requests per worker; uid -> worker
    scores: dict[int, object] = {}                        # uid -> TeacherScores, delivered and not yet trained
    t_step = time.monotonic()
    while driver.sched.version < cfg.steps:
        workers.check()
        sends, admitted = admit_round(driver, outstanding, session.prompt)
        owner.update(admitted)
        workers.send_requests(sends)
        batch = driver.next_batch()
        if batch is None:
            for traj, s in workers.scored(timeout_s=0.05):
                outstanding[owner.pop(traj.uid)] -= 1
                scores[traj.uid] = s
                for uid in driver.done(traj):
                    del scores[uid]
            continue
        t0 = rec.now()
        try:
            metrics = learner.step(batch, [scores.pop(t.uid) for t in batch.trajs])
        except FloatingPointError as err:
            raise session.diverged(err, batch.version) from err
        learner_s = rec.now() - t0
        version, dropped = driver.stepped(batch, t0)
        for uid in dropped:
            del scores[uid]
        workers.publish(version, learner.state_dict())
        now = time.monotonic()
        row = session.row(version, batch, metrics, driver, step_s=now - t_step, learner_s=learner_s)
        t_step = now
        if session.due_eval(version):
            row.update(evaluate(learner.model, learner.state_dict(), version))
            t_step = time.monotonic()                     # evaluation time is not training throughput
        session.record(row)
        if session.due_checkpoint(version):
            workers.drain()
            session.checkpoint(version, driver, learner.save_checkpoint, ring={version: learner.state_dict()})
            t_step = time.monotonic()


class Workers:
    """The child processes (spawn context) and the queues that join them to the learner."""

    def __init__(self, cfg, session: RunSession, roles):
        c, B = cfg.concurrent, cfg.toy.batch_size
        self.session, self.timeout_s = session, c.join_timeout_s
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.events_q = ctx.Queue()                       # unbounded, drained by the learner continuously
        self.scored_q = ctx.Queue(maxsize=c.queue_batches * B)
        colocated = c.placement == "colocate_teacher_with_rollout"
        traj_q = None if colocated else ctx.Queue(maxsize=c.queue_batches * B)
        self.req_qs = [ctx.Queue(maxsize=(cfg.scheduler.depth + 1) * B + 1) for _ in range(c.rollout_workers)]
        self.weights_qs = [ctx.Queue() for _ in range(c.rollout_workers)]   # drained by the workers every tick
        self.queues = [q for q in (self.events_q, self.scored_q, traj_q, *self.req_qs, *self.weights_qs) if q]
        origin = session.rec.origin
        self.procs: dict[str, mp.Process] = {}
        for i in range(c.rollout_workers):
            name = f"rollout worker {i}"
            self.procs[name] = ctx.Process(
                target=_child, name=f"asyncopd-rollout-{i}", daemon=True,
                args=(name, rollout_worker, self.events_q, self.stop, i, cfg, roles, colocated, origin,
                      self.req_qs[i], self.weights_qs[i],
                      self.scored_q if colocated else traj_q, self.events_q, self.stop))
        if not colocated:
            self.procs["teacher"] = ctx.Process(
                target=_child, name="asyncopd-teacher", daemon=True,
                args=("teacher", teacher_worker, self.events_q, self.stop, cfg, roles, origin, traj_q,
                      self.scored_q, self.events_q, self.stop))
        self.ready: set[str] = set()

    def start(self) -> None:
        """Start every child and wait until each has built its roles (spawn + imports: not training time)."""
        for p in self.procs.values():
            p.start()
        while len(self.ready) < len(self.procs):
            self.check()
            self.drain(0.05)

    def drain(self, block_s: float = 0.0) -> None:
        """Take the children's messages: trace events, readiness, and errors (raised, naming the child)."""
        while (msg := self._get(self.events_q, block_s)) is not None:
            block_s = 0.0
            if msg[0] == "error":
                raise RuntimeError(f"{msg[1]} failed: {msg[2].strip().splitlines()[-1]}\n{msg[2]}")
            if msg[0] == "ready":
                self.ready.add(msg[1])
            else:
                self.session.rec.events.extend(msg[1])

    def check(self) -> None:
        """Drain, then fail if any child has exited (its error report may still be in the pipe: wait for it)."""
        self.drain()
        for name, p in self.procs.items():
            if p.exitcode is not None:
                self.drain(0.5)
                raise RuntimeError(f"{name} (pid {p.pid}) exited with code {p.exitcode} before the run ended")

    def send_requests(self, sends: list[list]) -> None:
        for q, reqs in zip(self.req_qs, sends):         # one message per worker and admission round: unpickling
            if reqs:                                      # 64 small messages one by one cost ~28 ms a batch
                _put(q, _dumps(reqs), self.stop, on_full=self.check)

    def scored(self, timeout_s: float) -> list:
        """(trajectory, scores) pairs of one scored message, or [] when none arrives in timeout_s."""
        msg = self._get(self.scored_q, timeout_s)
        return [] if msg is None else list(zip(*pickle.loads(msg)))

    def publish(self, version: int, state_dict) -> None:
        msg = _dumps((version, state_dict))
        for q in self.weights_qs:                         # each worker loads the newest it has
            q.put(msg)

    def shutdown(self) -> None:
        """Stop every child: signal, join while draining their last events, terminate whatever outlives
        join_timeout_s, and release this process's side of every queue without waiting for unread data."""
        self.stop.set()
        for q in self.req_qs:
            try:
                q.put_nowait(STOP)
            except queue.Full:
                pass
        alive = [p for p in self.procs.values() if p.pid is not None]
        log.info("stopping %d worker process(es)", len(alive))
        deadline = time.monotonic() + self.timeout_s
        while any(p.is_alive() for p in alive) and time.monotonic() < deadline:
            try:
                self.drain(0.05)
            except RuntimeError:
                pass                                      # an error report during shutdown: the run ends anyway
        for name, p in self.procs.items():
            if p.is_alive():
                log.warning("%s (pid %d) is still running %.0f s after the stop signal: terminating it",
                            name, p.pid, self.timeout_s)
                p.terminate()
                p.join(2.0)
                if p.is_alive():
                    p.kill()
            if p.pid is not None:
                p.join(timeout=2.0)
        for q in self.queues:                             # a queue whose reader is gone must not hold our exit
            q.cancel_join_thread()
            q.close()

    @staticmethod
    def _get(q, block_s: float):
        try:
            return q.get(timeout=block_s) if block_s else q.get_nowait()
        except (queue.Empty, OSError, ValueError):        # closed queue: nothing more will come
            return None
