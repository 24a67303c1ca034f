"""The lockstep run: one process plays rollout, teacher and learner in the order the scheduler decides.

With `staleness=fixed:k` every batch at learner version v is sampled with the weights of version max(0, v − k),
kept in a ring of the last k+1 versions, so staleness is exact (k once v ≥ k). Per learner step:

    admit B rollouts (driver) -> generate them with the ring's weights -> teacher scores -> learner step
    -> new version into the ring -> metrics row (+ held-out evaluation every eval_every steps)

The roles come from `parts(cfg)`: the toy engines (backends/toy.py) by default, vLLM + FSDP2 with
backends/vllm_fsdp/parts.py. Files, resume, metrics and the trace are the run session's (backends/session.py).

Rollout mixture (StableOPD, Luo et al. 2026, arXiv 2604.08527): with `toy.mixture_frac` = f > 0, m = round(f·B)
extra rollouts per step are answered by the teacher itself (sampled at T = 1, behaviour log-probs log π_T)
beside the B − m student rollouts the scheduler admits, scored and trained on with the same objective in the
same batch. The teacher's rollouts are not admitted (the scheduler bounds the student's staleness only): their
uids are MIXTURE_UID0 + v·m + j, their prompts the session's prompts of those uids. The monitors describe the
student's rollouts; the teacher's are summarised as mixture_len_mean and mixture_accuracy.

Everything random is a function of (seed, uid): the prompt of uid comes from its block's seed, the tokens from
the engine's counter-based RNG keyed by uid. With a checkpoint every ckpt_every steps a resumed run, even after
`kill -9`, finishes with the same metrics as one never interrupted (CPU; wall-clock columns aside).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from asyncopd.driver import Driver
from asyncopd.objective import cache_layout
from asyncopd.protocols import Learner, RolloutEngine, Teacher
from asyncopd.rollout import Batch, scored_tokens
from asyncopd.scheduler import Scheduler
from backends.session import RunSession, state_bytes
from backends.toy import lockstep_parts, mixture_engine

log = logging.getLogger(__name__)
MIXTURE_UID0 = 10 ** 12                  # uids of the rollout mixture's teacher samples (never admitted)


def run(cfg, out_dir: Path, parts=lockstep_parts) -> pd.DataFrame:
    """One lockstep run; `cfg` is a backends.run.RunConfig with staleness=fixed:k. Returns the metrics table."""
    task, engine, teacher, learner, evaluate, model_info = parts(cfg)
    with RunSession(cfg, out_dir, mode="lockstep", task=task) as session:
        resumed = session.resume(learner.resume_checkpoint)
        ring = resumed["ring"] if resumed else {0: learner.state_dict()}
        driver = session.driver(Scheduler(cfg.scheduler, version=session.start), resumed and resumed["state"])
        if not resumed:
            session.first_row(evaluate(learner.model, ring[0], 0))
        steps = Steps(cfg, session, driver, engine, teacher, learner, evaluate, ring)
        for v in tqdm(range(session.start, cfg.steps), desc=f"{cfg.objective.name} {cfg.staleness}",
                      initial=session.start, total=cfg.steps):
            steps.step(v)
        return session.finish(driver, {"backend": cfg.backend}, model_info)


class Steps:
    """One lockstep learner step at a time, over the roles and the ring of past weight versions."""

    def __init__(self, cfg, session: RunSession, driver: Driver, engine: RolloutEngine, teacher: Teacher,
                 learner: Learner, evaluate, ring: dict):
        self.cfg, self.session, self.driver = cfg, session, driver
        self.engine, self.teacher, self.learner, self.evaluate, self.ring = engine, teacher, learner, evaluate, ring
        self.topk, self.n_samples = cache_layout(cfg.objective)
        self.n_mix = cfg.toy.n_mixture
        self.mixture = mixture_engine(session.task, teacher.model, cfg.toy, seed=cfg.seed,
                                      capture_samples=self.n_samples, device=engine.device) if self.n_mix else None
        self.first = True

    def step(self, v: int) -> None:
        session, rec, k = self.session, self.session.rec, self.cfg.scheduler.fixed_staleness
        t_step = time.monotonic()
        admitted = [self.driver.admit() for _ in range(self.cfg.scheduler.batch_size)]
        w = admitted[0][1]                                  # fixed:k admits a whole batch at max(0, v − k)
        if self.engine.version != w or self.first:
            t0 = rec.now()
            self.engine.load_weights(self.ring[w], w)
            rec.span("weight_sync", t0, version=w, bytes=state_bytes(self.ring[w]))
            self.first = False
        t0 = rec.now()
        uids = [uid for uid, _ in admitted]
        for traj in self.engine.generate([session.prompt(u) for u in uids], uids):   # the batch at once
            rec.span("rollout", t0, uid=traj.uid, version=traj.behav_version, tokens=traj.n_tokens)
            self.driver.done(traj)
        batch = self.driver.next_batch()                    # the student's rollouts: what the monitors describe
        mixed = self.mix(v)
        train = Batch(batch.trajs + mixed, batch.version, batch.n_dropped) if mixed else batch
        rollout_s = rec.now() - t0

        t0 = rec.now()
        scores = self.teacher.score(train.trajs, topk=self.topk, n_samples=self.n_samples)
        teacher_s = rec.now() - t0
        rec.span("teacher", t0, n_seqs=len(train), tokens=scored_tokens(train.trajs))
        t0 = rec.now()
        try:
            metrics = self.learner.step(train, scores)
        except FloatingPointError as err:
            raise session.diverged(err, v) from err
        learner_s = rec.now() - t0
        version, _ = self.driver.stepped(batch, t0)
        self.ring[version] = self.learner.state_dict()
        for old in [u for u in self.ring if u < version - k]:
            del self.ring[old]

        step_s = time.monotonic() - t_step
        row = session.row(version, batch, metrics, self.driver, step_s=step_s, learner_s=learner_s,
                          n_samples=len(train), rollout_s=rollout_s, teacher_s=teacher_s,
                          **self.mixture_monitors(mixed))
        if session.due_eval(version):
            row.update(self.evaluate(self.learner.model, self.ring[version], version))
        session.record(row)
        if session.due_checkpoint(version):
            session.checkpoint(version, self.driver, self.learner.save_checkpoint, ring=self.ring)

    def mix(self, v: int) -> list:
        """The rollout mixture's teacher samples of step v (none without a mixture)."""
        if not self.n_mix:
            return []
        uids = list(range(MIXTURE_UID0 + v * self.n_mix, MIXTURE_UID0 + (v + 1) * self.n_mix))
        return self.mixture.generate([self.session.prompt(u) for u in uids], uids)

    def mixture_monitors(self, mixed: list) -> dict[str, float]:
        """mixture_frac always (0.0 = plain OPD); with teacher rollouts in the batch, their mean length and
        exact-match rate (the teacher samples at T = 1, so it is not always right)."""
        toy, task = self.cfg.toy, self.session.task
        if not mixed:
            return {"mixture_frac": toy.mixture_frac}
        return {"mixture_frac": toy.mixture_frac, "mixture_len_mean": float(np.mean([t.n_tokens for t in mixed])),
                "mixture_accuracy": float(np.mean([task.verify(t.prompt_ids, t.response_ids) for t in mixed]))}
