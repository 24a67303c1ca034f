"""The three roles of the Ray run (backends/ray_run.py) as plain classes that the driver wraps with `ray.remote`.

The one idea: each role is the concurrent run's process body turned into an object the driver calls. The
driver owns the scheduler and the trace; an actor returns what it did as `trace.Event`s with its result,
stamped with the absolute `time.time()` (one clock across machines, as far as NTP keeps them), which the driver
shifts to its origin.

- `LearnerActor`: the learner and its evaluator (ToyLearner, or FSDPLearner with `backend=vllm_fsdp`); trains
  one batch per call, checkpoints, and is rank 0 (the source) of the gloo group that carries weights to the
  rollout actors.
- `RolloutActor`: the rollout pump (backends/engine_pump.py) on a streaming engine (ToyRolloutEngine or
  VLLMRolloutEngine), run continuously by a background thread (continuous batching), fed by `submit` and
  drained by `collect`, which blocks until trajectories are finished (scored here when the teacher is
  colocated). `receive` joins a weight broadcast in its own thread while the engine keeps decoding and hands
  the weights to the pump, which loads them between decode steps (`weight_update=in_flight`) or once the engine
  has drained (`between_rollouts`). Ray runs it as a threaded actor (max_concurrency = 3: one blocked
  `collect`, one `receive`, one short call).
- `TeacherActor`: a ToyTeacher (or VLLMTeacher) scoring whatever the driver sends.

Every actor builds its role from the run's roles object (`ToyRoles` or `VLLMRoles`: `rollout_engine`, `teacher`,
`learner_side`). The weight-sync group is a `SyncGroup` (backends/weight_sync.py), outside torch.distributed's
default group, which vLLM (one rank per engine process) and the FSDP2 learner (its own group) already use.

A role whose Ray request has GPUs runs its model on CUDA (Ray sets CUDA_VISIBLE_DEVICES); weights still travel
over gloo through CPU buffers.
"""

from __future__ import annotations

import socket
import threading
import time
import traceback
from pathlib import Path

import torch

from asyncopd import trace
from asyncopd.objective import cache_layout
from asyncopd.rollout import scored_tokens
from backends.engine_pump import RolloutPump
from backends.session import state_bytes
from backends.weight_sync import SyncGroup, broadcast_state_dict

POLL_S = 0.005                 # idle wait of the engine thread
SYNC_TIMEOUT_S = 300           # gloo: a collective that waits this long for a peer fails


def _device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 else "cpu")


def node_ip() -> str:
    import ray                                  # imported where it runs: inside a Ray worker
    return ray.util.get_node_ip_address()


class _Role:
    """What every actor answers: where it runs, and joining the weight-sync group."""

    group: SyncGroup | None = None

    def where(self) -> str:
        return node_ip()

    def join_group(self, init_method: str, rank: int, world: int) -> None:
        self.group = SyncGroup(init_method, rank, world, timeout_s=SYNC_TIMEOUT_S)


class LearnerActor(_Role):
    def __init__(self, cfg, roles):
        torch.set_num_threads(cfg.concurrent.threads_per_role)
        self.learner, self.evaluate_fn = roles.learner_side(_device(cfg.ray.learner_gpus))
        self.bucket_bytes = cfg.ray.sync_bucket_bytes

    def weight_bytes(self) -> int:
        return state_bytes(self.learner.state_dict())

    def rendezvous(self, port: int) -> str:
        """tcp://<this node>:<port> for the weight-sync group; port 0 = a free port here (rank 0 listens)."""
        if port == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        return f"tcp://{node_ip()}:{port}"

    def resume(self, root: str, digest: str):
        """Load the latest checkpoint under `root` (a folder the driver shares): (path, ring, state) or None."""
        got = self.learner.resume_checkpoint(Path(root), digest=digest)
        return None if not got else (got[0], {}, got[2])

    def publish(self) -> None:
        """Rank 0 of the weight broadcast (the receivers record it)."""
        broadcast_state_dict(self.learner.state_dict(), src=0, group=self.group, bucket_bytes=self.bucket_bytes)

    def train(self, batch, scores) -> tuple[dict | None, str | None, trace.Event]:
        """(metrics, None, the step's span), or (None, the error, span) when the step was not finite (the
        weights untouched): the driver reports it with the run's one divergence message."""
        t0 = time.time()
        try:
            metrics, error = self.learner.step(batch, scores), None
        except FloatingPointError as err:
            metrics, error = None, str(err)
        return metrics, error, trace.Event(t=t0, dur_s=time.time() - t0, kind="learner_step")

    def evaluate(self, version: int) -> dict:
        return self.evaluate_fn(self.learner.model, self.learner.state_dict(), version)

    def save_checkpoint(self, root: str, *, version: int, ring: dict, state: dict, extra=None) -> None:
        self.learner.save_checkpoint(Path(root), version=version, ring={version: self.learner.state_dict()},
                                     state=state, extra=extra)


class TeacherActor(_Role):
    def __init__(self, cfg, roles):
        torch.set_num_threads(cfg.concurrent.threads_per_role)
        self.teacher = roles.teacher(_device(cfg.ray.teacher_gpus))
        self.topk, self.n_samples = cache_layout(cfg.objective)

    def score(self, trajs) -> tuple[list, list[trace.Event]]:
        t0 = time.time()
        scores = self.teacher.score(trajs, topk=self.topk, n_samples=self.n_samples)
        return scores, [trace.Event(t=t0, dur_s=time.time() - t0, kind="teacher", n_seqs=len(trajs),
                                    tokens=scored_tokens(trajs))]


class RolloutActor(_Role):
    def __init__(self, i: int, cfg, roles, colocated: bool, crash_after: int = 0):
        c, toy = cfg.concurrent, cfg.toy
        torch.set_num_threads(c.threads_per_role)
        topk, n_samples = cache_layout(cfg.objective)
        device = _device(cfg.ray.rollout_gpus)
        engine = roles.rollout_engine(device)
        teacher = roles.teacher(device) if colocated else None
        self.i, self.bucket_bytes, self.colocated = i, cfg.ray.sync_bucket_bytes, teacher is not None
        self.rec = trace.Recorder(time.time)                          # written by the engine thread only
        self.pump = RolloutPump(engine, self.rec, worker=i, in_flight_updates=c.weight_update == "in_flight",
                                teacher=teacher, topk=topk, n_samples=n_samples, score_group=toy.batch_size // 4,
                                crash_after=crash_after)
        self.cond = threading.Condition()   # guards everything below, shared with the engine thread
        self.inbox: list = []               # (uid, prompt, admit_version) not yet taken by the engine thread
        self.latest = None                  # (version, state dict) received, not yet handed to the pump
        self.outbox: list = []              # (trajectories, scores or None), finished, not yet collected
        self.out_events: list[trace.Event] = []
        self.error: str | None = None
        self.stopped = False
        self.thread: threading.Thread | None = None

    # --- called by the driver (Ray threads) -----------------------------------------------------------------

    def submit(self, requests: list) -> None:
        with self.cond:
            self.inbox.extend(requests)
            self.cond.notify_all()

    def receive(self, version: int) -> trace.Event:
        """Join the learner's broadcast of `version`; the first one (the run's start, maybe a resumed version)
        loads before the engine thread starts, later ones are handed to it. Returns the weight_sync event
        (bytes, broadcast seconds)."""
        t0 = self.rec.now()
        state, stats = broadcast_state_dict(None, src=0, group=self.group, bucket_bytes=self.bucket_bytes)
        event = trace.Event(t=t0, dur_s=stats.seconds, kind="weight_sync", worker=self.i, version=version,
                            bytes=stats.bytes)
        if self.thread is None:
            self.pump.engine.load_weights(state, version)
            self.thread = threading.Thread(target=self._run, name=f"engine-{self.i}", daemon=True)
            self.thread.start()
            return event
        with self.cond:
            if self.latest is None or version > self.latest[0]:
                self.latest = (version, state)
            self.cond.notify_all()
        return event

    def collect(self) -> tuple[list, list | None, list[trace.Event]]:
        """Block until trajectories are finished (or the actor stops): (trajectories, their scores when the
        teacher is colocated else None, trace events). The engine thread's exception is raised here."""
        with self.cond:
            while not self.outbox and self.error is None and not self.stopped:
                self.cond.wait()
            if self.error is not None:
                raise RuntimeError(f"rollout actor {self.i}: the engine thread failed\n{self.error}")
            out, self.outbox = self.outbox, []
            events, self.out_events = self.out_events, []
        trajs = [t for ts, _ in out for t in ts]
        return trajs, ([s for _, ss in out for s in ss] if self.colocated else None), events

    def stop(self) -> list[trace.Event]:
        """Stop the engine thread; returns the events it had not shipped yet."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10.0)
        with self.cond:
            events, self.out_events = self.out_events + self.rec.events, []
            self.rec.events = []
        return events

    # --- the engine thread: the rollout pump ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            with self.cond:
                self.error = traceback.format_exc()
                self.cond.notify_all()

    def _loop(self) -> None:
        pump = self.pump
        while True:
            with self.cond:
                if self.stopped:
                    return
                pump.offer(self.inbox)
                self.inbox = []
                if self.latest is not None:
                    pump.offer_weights(*self.latest)
                    self.latest = None
            out = pump.tick()
            with self.cond:
                self.outbox += out
                self.out_events += self.rec.events          # ship the engine thread's events with its results
                self.rec.events = []
                if out:
                    self.cond.notify_all()
                if not pump.busy and not self.inbox and self.latest is None and not self.stopped:
                    self.cond.wait(POLL_S)                  # idle, or waiting for weights in transit
