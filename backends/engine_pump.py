"""One rollout worker's body, whatever carries its messages: a process's queues (exec=concurrent) or a Ray
actor's threads (exec=ray).

The one idea: a rollout worker does the same steps in the same order over any transport, so they are written
once against the `StreamingEngine` protocol (asyncopd/protocols.py), which the toy engine and the vLLM engine
implement. The transport hands in requests (`offer`) and published weights (`offer_weights`) and ships what
`tick` returns. Per `tick`:

    take the newest weights      loaded now with weight_update=in_flight (between decode steps: running
                                 sequences continue on them), or once the engine is drained with between_rollouts
    start requests               in admission order, each once the engine holds weights >= its admitted version;
                                 between_rollouts holds new starts while newer weights wait to load
    step                         one engine iteration, a `decode_iter` span (sequences decoded, prompt tokens
                                 prefilled); each finished trajectory gets its `admit_version` and a `rollout` span
                                 from the moment it was queued in the engine
    flush                        without a colocated teacher, finished trajectories are shipped at once; with one
                                 (placement=colocate_teacher_with_rollout) they are scored here, B/4 at a time or
                                 whatever is done when the engine runs dry, and shipped with their scores

`tick` returns the (trajectories, scores or None) to ship, and `busy` says whether the engine has work, so an
idle transport can wait for messages instead of spinning. `admit_round` is the learner's side: admit to capacity
and hand each admission to the least-loaded worker.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from dataclasses import replace

from asyncopd.protocols import StreamingEngine, Teacher
from asyncopd.rollout import scored_tokens
from asyncopd.trace import Recorder
from backends.session import state_bytes


class RolloutPump:
    def __init__(self, engine: StreamingEngine, rec: Recorder, *, worker: int, in_flight_updates: bool,
                 teacher: Teacher | None = None, topk: int = 0, n_samples: int = 0, score_group: int = 1,
                 trace_loads: bool = False, crash_after: int = 0):
        self.engine, self.rec, self.worker, self.teacher = engine, rec, worker, teacher
        self.in_flight_updates, self.topk, self.n_samples = in_flight_updates, topk, n_samples
        self.score_group, self.trace_loads, self.crash_after = max(1, score_group), trace_loads, crash_after
        self.pending: deque = deque()            # (uid, prompt, admit_version) not yet in the engine
        self.started: dict[int, tuple] = {}      # uid -> (queued at, admit_version)
        self.latest: tuple | None = None         # (version, state dict) received, not yet loaded
        self.done: list = []                     # finished, not yet shipped (colocated teacher: not yet scored)
        self.n_done = 0

    def offer(self, requests) -> None:
        self.pending.extend(requests)

    def offer_weights(self, version: int, state_dict) -> None:
        if self.latest is None or version > self.latest[0]:
            self.latest = (version, state_dict)

    @property
    def busy(self) -> bool:
        return self.engine.n_unfinished > 0

    def tick(self) -> list[tuple[list, list | None]]:
        """One round of the worker's loop (module docstring). Returns what to ship now."""
        engine, rec = self.engine, self.rec
        newer = self.latest is not None and self.latest[0] > engine.version
        if newer and (self.in_flight_updates or not self.busy):
            self._load()
            newer = False
        hold = newer and not self.in_flight_updates
        while self.pending and self.pending[0][2] <= engine.version and not hold:
            uid, prompt, w = self.pending.popleft()
            engine.add(prompt, uid)
            self.started[uid] = (rec.now(), w)
        if not self.busy:
            return self._flush(idle=True)
        t0, tokens0, prefill0 = rec.now(), engine.stats.tokens, engine.stats.prefill_tokens
        finished = engine.step()
        rec.span("decode_iter", t0, worker=self.worker, version=engine.version,
                 n_seqs=engine.stats.tokens - tokens0, tokens=engine.stats.prefill_tokens - prefill0)
        for traj in finished:
            t_start, w = self.started.pop(traj.uid)
            self.done.append(replace(traj, admit_version=w))
            rec.span("rollout", t_start, worker=self.worker, uid=traj.uid, version=traj.behav_version,
                     tokens=traj.n_tokens)
        self.n_done += len(finished)
        if self.crash_after and self.n_done >= self.crash_after:
            raise RuntimeError(f"test hook: rollout worker {self.worker} crashes on purpose after {self.n_done} "
                               f"rollouts")
        return self._flush(idle=not self.busy)

    def _load(self) -> None:
        version, state = self.latest
        self.latest = None
        t0 = self.rec.now()
        self.engine.load_weights(state, version)
        if self.trace_loads:
            self.rec.span("weight_sync", t0, worker=self.worker, version=version, bytes=state_bytes(state))

    def _flush(self, idle: bool) -> list[tuple[list, list | None]]:
        if not self.done or (self.teacher is not None and not idle and len(self.done) < self.score_group):
            return []
        done, self.done = self.done, []
        if self.teacher is None:
            return [(done, None)]
        t0 = self.rec.now()
        scores = self.teacher.score(done, topk=self.topk, n_samples=self.n_samples)
        self.rec.span("teacher", t0, worker=self.worker, n_seqs=len(done), tokens=scored_tokens(done))
        return [(done, scores)]


def admit_round(driver, outstanding: list[int], prompt_of) -> tuple[list[list], dict[int, int]]:
    """Admit to capacity, least-loaded worker first. Returns (per worker its (uid, prompt, admit_version)
    requests, uid -> worker); `outstanding` is updated."""
    sends, owner = [[] for _ in outstanding], {}
    while True:
        i = int(np.argmin(outstanding))
        if (got := driver.admit(worker=i)) is None:
            return sends, owner
        uid, w = got
        sends[i].append((uid, prompt_of(uid), w))
        owner[uid], outstanding[i] = i, outstanding[i] + 1
