"""One run's files and bookkeeping, the same for every execution mode (lockstep, replay, concurrent, Ray).

The one idea: a run loop keeps only its control flow and its transport; everything a user reads afterwards
comes from here, so the modes cannot drift apart. A `RunSession` owns:

- the output folder: metrics.csv, trace.csv + trace.json (Perfetto, with the run's info as `otherData`),
  staleness_hist.csv, run_info.json, models.json, checkpoint/, and TensorBoard scalars under tb/ with
  `logger=tensorboard`; every file is written atomically (`asyncopd.files.atomic_write`);
- opening the run: fresh, or `resume=true` from the last checkpoint, refusing a checkpoint of another config
  (`config_digest`); resuming restores the metrics rows, the trace up to the checkpoint and the driver's state;
- the prompts: uid u answers prompt u mod B of block ⌊u/B⌋, drawn from seed (seed·1_000_003 + ⌊u/B⌋), so
  every mode gives a uid the same prompt (uids are admission indices, `asyncopd.driver`);
- the trace recorder (one clock and origin for the run; a resumed run's clock continues from its checkpoint);
- the eval and checkpoint cadence, and the one message for a diverged run.

The metrics row (`row`), one per learner step plus a step-0 row with the initial evaluation, has the same
columns in every mode:

    step, version                  learner version after the step (step == version)
    objective, staleness           ObjectiveConfig.name; the staleness knob as given (fixed:k, η, schedule:<f>)
    staleness_mean, staleness_max  over the batch, and its split (asyncopd.driver.split):
    staleness_in_flight, staleness_in_queue
    response_len_mean/max, truncation_rate, repetition_rate, train_accuracy   the batch's monitors
    loss, kl, grad_norm, lr, n_tokens, ess, ...                               the learner's (ess NaN if none)
    n_dropped                      too-stale trajectories dropped since the previous batch
    len_generated_mean, len_trained_mean, length_w1, drop_rate, wasted_token_frac
                                   what the staleness policy did to the data so far (asyncopd.data_skew);
                                   run_info.json's summary has every measure, percentiles and staleness by length
    sched_n_admitted, sched_in_flight, sched_n_ready, sched_n_trained, sched_n_dropped, sched_n_lost
                                   the scheduler's counters over the whole run (Driver.counts)
    step_s, learner_s, samples_per_s          wall clock (WALL_CLOCK_COLUMNS: not reproducible)
    accuracy, eval_reverse_kl, eval_forward_kl, eval_response_len            every eval_every steps, else NaN
    health                         "ok", or the collapse signals that fired at this step (backends/health.py)

Per-mode extras (MODE_EXTRAS): lockstep adds rollout_s and teacher_s (its phases are sequential, so they
are meaningful) and the rollout mixture's mixture_frac, mixture_len_mean, mixture_accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asyncopd import trace
from asyncopd.driver import Driver, split
from asyncopd.estimators import ngram_repetition, truncation_rate
from asyncopd.files import atomic_write
from backends import checkpoint
from backends.health import CollapseError, HealthCheck

log = logging.getLogger(__name__)
_STOP = {"signum": None}   # a stop signal taken by backends.run.take_signals, checked at every recorded step


def request_stop(signum: int | None) -> None:
    """Make the running session end at its next recorded step with SystemExit(128 + signum); None clears it.
    The signal handler raises SystemExit at once as well; this is the backstop for when that exception is lost
    (a handler that runs inside a finalizer, e.g. a __del__ during garbage collection, has it printed as
    "Exception ignored" and the run would otherwise go on to its last step and exit 0)."""
    _STOP["signum"] = signum


WALL_CLOCK_COLUMNS = ("step_s", "rollout_s", "teacher_s", "learner_s", "samples_per_s")   # not reproducible
MODE_EXTRAS = {"lockstep": ("rollout_s", "teacher_s", "mixture_frac", "mixture_len_mean", "mixture_accuracy"),
               "replay": (), "concurrent": (), "ray": ()}
SKEW_COLUMNS = ("len_generated_mean", "len_trained_mean", "length_w1", "drop_rate", "wasted_token_frac")  # run so far
PROMPT_SEED_STRIDE = 1_000_003           # block b of prompts comes from seed (seed · stride + b)


def config_digest(cfg) -> str:
    """What a resumed run must share with the one it continues: everything but steps, resume, logger, the Ray
    placement (a run may move from a local instance to a cluster), how many checkpoints are kept, the health
    check's thresholds, and the vllm_fsdp keys of a toy run."""
    skip = {"steps", "resume", "logger", "ray", "keep_checkpoints", "health"}
    if cfg.backend == "toy":
        skip.add("vllm_fsdp")
    keep = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def block_prompts(task, seed: int, block: int, batch_size: int) -> list:
    """The prompts of uids block·B .. block·B + B − 1 of a run with this seed (uid u is prompt u mod B)."""
    return task.make_prompts(batch_size, seed=seed * PROMPT_SEED_STRIDE + block)


def state_bytes(sd: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict: what a weight sync moves."""
    return sum(t.numel() * t.element_size() for t in sd.values())


def batch_monitors(task, batch) -> dict[str, float]:
    """Per-batch monitors every run logs: staleness and its split, response length, and StableOPD's
    length-inflation signals (truncation rate, 3-gram repetition), plus the batch's exact-match rate."""
    lengths = [t.n_tokens for t in batch.trajs]
    parts = split(batch)
    return {"staleness_mean": float(np.mean(batch.staleness)), "staleness_max": max(batch.staleness),
            "staleness_in_flight": parts["staleness_in_flight"], "staleness_in_queue": parts["staleness_in_queue"],
            "response_len_mean": float(np.mean(lengths)), "response_len_max": max(lengths),
            "truncation_rate": truncation_rate([t.finish_reason for t in batch.trajs]),
            "repetition_rate": float(np.mean([ngram_repetition(t.response_ids, 3) for t in batch.trajs])),
            "train_accuracy": float(np.mean([task.verify(t.prompt_ids, t.response_ids) for t in batch.trajs]))}


class RunSession:
    """`with RunSession(cfg, out_dir, mode=..., task=...) as session:` ... `return session.finish(driver, info)`."""

    def __init__(self, cfg, out_dir, *, mode: str, task, clock=time.monotonic):
        if mode not in MODE_EXTRAS:
            raise ValueError(f"mode must be one of {tuple(MODE_EXTRAS)}, got {mode!r}")
        self.cfg, self.mode, self.task, self.clock = cfg, mode, task, clock
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root, self.digest = self.out_dir / "checkpoint", config_digest(cfg)
        self.rows: list[dict] = []
        self.rec = trace.Recorder(clock, origin=clock())
        self.start = 0                                    # learner version this process started at
        self.B = cfg.toy.batch_size
        self._block: tuple[int, list | None] = (-1, None)
        self._writer = _tensorboard(self.out_dir) if cfg.logger == "tensorboard" else None
        self.health = HealthCheck(cfg.health)

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- opening ----------------------------------------------------------------------------------------

    def resume(self, load) -> dict | None:
        """With resume=true, `load(ckpt_root, digest=)` (the learner's resume_checkpoint, or a call into the actor
        that holds it) restores the learner and returns (path, ring, state), or None when there is no checkpoint.
        The session then restores its rows and trace to the checkpoint. Returns {"path", "ring", "state"} or None."""
        if not self.cfg.resume:
            return None
        got = load(self.ckpt_root, digest=self.digest)
        if not got:
            log.info("resume=true but no checkpoint under %s: starting from scratch", self.ckpt_root)
            return None
        path, ring, state = got
        self.start = int(state["version"])
        rows = pd.read_csv(self.out_dir / "metrics.csv", dtype={"objective": str, "staleness": str, "health": str})
        self.rows = rows[rows.step <= self.start].to_dict("records")
        for row in self.rows:                             # the health check's baselines and streak, as they were
            self.health(row)
        t_ckpt = state["t_ckpt"]                          # by time, not count: workers' events arrive late and
        events = trace.read(self.out_dir / "trace.csv")   # sort in before later ones
        self.rec.events = trace.from_frame(events[events.t <= t_ckpt])
        self.rec.origin = self.clock() - t_ckpt
        log.info("resumed from %s at version %d", path, self.start)
        return {"path": path, "ring": ring, "state": state}

    def driver(self, sched, state: dict | None = None) -> Driver:
        """The run's Driver over `sched`, continuing a checkpoint's uids and histogram when given its state."""
        driver = Driver(sched, self.rec)
        if state is not None:
            driver.restore(state["driver"])
        return driver

    def prompt(self, uid: int) -> torch.Tensor:
        """The prompt of trajectory `uid` (the same in every mode)."""
        b = uid // self.B
        if self._block[0] != b:
            self._block = (b, block_prompts(self.task, self.cfg.seed, b, self.B))
        return self._block[1][uid % self.B]

    # --- per step ---------------------------------------------------------------------------------------

    def due_eval(self, version: int) -> bool:
        return version % self.cfg.toy.eval_every == 0 or version == self.cfg.steps

    def due_checkpoint(self, version: int) -> bool:
        return version % self.cfg.toy.ckpt_every == 0 or version == self.cfg.steps

    def first_row(self, evaluation: dict) -> None:
        """The step-0 row of a fresh run: the initial student's evaluation."""
        self.record({"step": 0, "version": 0, "objective": self.cfg.objective.name,
                     "staleness": str(self.cfg.staleness), **evaluation})

    def row(self, version: int, batch, metrics: dict, driver: Driver, *, step_s: float, learner_s: float,
            n_samples: int | None = None, **extras) -> dict:
        """The metrics row of learner step `version` (not yet recorded: add the evaluation, then `record` it).
        samples_per_s counts n_samples trajectories trained (default: the batch's; the mixture adds to them)."""
        unknown = set(extras) - set(MODE_EXTRAS[self.mode])
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not {self.mode} columns (MODE_EXTRAS)")
        counts = {f"sched_{k}": v for k, v in driver.counts().items() if k != "version"}
        skew = driver.skew.summary()
        return {"step": version, "version": version, "objective": self.cfg.objective.name,
                "staleness": str(self.cfg.staleness), **batch_monitors(self.task, batch), **metrics,
                "ess": metrics.get("ess", float("nan")), "n_dropped": batch.n_dropped, **counts,
                **{k: skew[k] for k in SKEW_COLUMNS},
                "step_s": step_s, "learner_s": learner_s, "samples_per_s": (n_samples or len(batch)) / step_s, **extras}

    def record(self, row: dict) -> None:
        """Append a finished row, with its `health` (backends/health.py): "ok" or the collapse signals that fired.
        With logger=tensorboard its numbers become scalars at step `version`. A collapse (signals `patience`
        steps in a row) is logged, and with health.on_collapse=stop ends the run: metrics.csv is written, then
        CollapseError is raised."""
        fired = self.health(row)
        row["health"] = "; ".join(fired) or "ok"
        self.rows.append(row)
        if self._writer is not None:
            for key, val in row.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool) and key not in ("step", "version"):
                    self._writer.add_scalar(key, val, row["version"])
        if self.health.collapsed:
            self._collapse(row)
        if _STOP["signum"] is not None:
            raise SystemExit(128 + _STOP["signum"])

    def _collapse(self, row: dict) -> None:
        cfg = self.cfg.health
        last = self.last_checkpoint()
        msg = (f"training collapsed at step {row['step']}: {row['health']} ({cfg.patience} unhealthy steps in a row; "
               f"thresholds: health.*). The last checkpoint is {last if last is not None else 'none'}")
        if cfg.on_collapse == "warn":
            log.warning("%s; going on (health.on_collapse=warn)", msg)
            return
        self._write_metrics()
        raise CollapseError(f"{msg}. Stopped (health.on_collapse=stop; set health.on_collapse=warn to go on)")

    def last_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.ckpt_root)

    def diverged(self, err: BaseException, version: int) -> RuntimeError:
        """The error a loop raises when the learner's step at `version` was not finite."""
        last = self.last_checkpoint()
        where = (f"The last good checkpoint is {last} (resume=true continues from it)" if last is not None else
                 "No checkpoint was written yet (resume=true would start from scratch)")
        return RuntimeError(f"training diverged at step {version + 1}: {err}. {where}")

    # --- files ------------------------------------------------------------------------------------------

    def write_tables(self, driver: Driver) -> None:
        """metrics.csv, trace.csv (in time order) and staleness_hist.csv as they stand."""
        self.rec.events.sort(key=lambda e: e.t)           # workers' events arrive late; stable for in-order ones
        self._write_metrics()
        trace.write(self.rec.events, self.out_dir / "trace.csv")
        hist = trace.staleness_hist(driver.hist)
        atomic_write(self.out_dir / "staleness_hist.csv", lambda tmp: hist.to_csv(tmp, index=False))

    def _write_metrics(self) -> None:
        df = pd.DataFrame(self.rows)
        atomic_write(self.out_dir / "metrics.csv", lambda tmp: df.to_csv(tmp, index=False))

    def checkpoint(self, version: int, driver: Driver, store, *, ring: dict | None = None,
                   state: dict | None = None, extra: dict[str, bytes] | None = None) -> None:
        """Write the tables, then `store(ckpt_root, version=, ring=, state=, extra=)` (the learner's
        save_checkpoint, or a call into its actor) with the session's and the driver's resume state; keep the
        newest keep_checkpoints checkpoints."""
        self.write_tables(driver)
        store(self.ckpt_root, version=version, ring=ring or {}, extra=extra,
              state={"config_digest": self.digest, "t_ckpt": self.rec.now(),
                     "driver": driver.state(), **(state or {})})
        checkpoint.prune(self.ckpt_root, self.cfg.keep_checkpoints)

    def finish(self, driver: Driver, info: dict, model_info: dict) -> pd.DataFrame:
        """The final files: tables, trace.json with `info` as its metadata, run_info.json, models.json."""
        counts = driver.counts()
        assert counts["n_admitted"] == (counts["in_flight"] + counts["n_ready"] + counts["n_trained"]
                                        + counts["n_dropped"] + counts["n_lost"]), counts
        if self.start >= self.cfg.steps:
            log.info("nothing to do: the checkpoint is already at step %d >= steps=%d", self.start, self.cfg.steps)
        self.write_tables(driver)
        info = {"exec": self.mode, "staleness": str(self.cfg.staleness), "batch_size": self.B, **info,
                "scheduler": counts, **driver.summary(), "resumed_from_step": self.start}
        trace.to_perfetto(self.rec.events, self.out_dir / "trace.json", other=info)
        atomic_write(self.out_dir / "run_info.json", json.dumps(info, indent=1, default=str))
        atomic_write(self.out_dir / "models.json", json.dumps(model_info, indent=1, default=str))
        return pd.DataFrame(self.rows)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from err
    return SummaryWriter(str(out_dir / "tb"))
