"""The toy backend's lockstep run: tiny GPT-2 on-policy distillation on a CPU (or one GPU), reproducibly.

One process plays rollout, teacher and learner in the order the shared scheduler decides. With
`staleness=fixed:k` every batch at learner version v is sampled with the weights of version max(0, v − k),
kept in a ring of the last k+1 versions, so staleness is exact (k once v ≥ k). Per learner step:

    admit B rollouts (scheduler) -> generate them with the ring's weights -> teacher scores -> learner step
    -> new version into the ring -> metrics row (+ held-out greedy accuracy every eval_every steps)

Rollout mixture (StableOPD, Luo et al. 2026, arXiv 2604.08527): with `toy.mixture_frac` = f > 0, the last
m = round(f·B) prompts of each step are answered by the teacher itself (sampled at T = 1, behaviour log-probs
log π_T) instead of the student, scored by the teacher like every rollout and trained on with the same
objective in the same batch: B − m student rollouts + m teacher rollouts, one token-mean loss. The monitors
(length, truncation, repetition, train accuracy, staleness) describe the student's B − m rollouts only; the
teacher's are summarised as mixture_len_mean and mixture_accuracy.

Everything random is a function of (seed, step, uid): the prompts of step v come from seed (seed, v), each
rollout's tokens from the engine's counter-based RNG keyed by its uid. With a checkpoint after every
ckpt_every steps this makes a resumed run, even after `kill -9`, finish with the same metrics as one that was
never interrupted (CPU; wall-clock columns aside). A non-finite loss stops the run with a message naming the
step; the last checkpoint is the last good state.

Outputs (in out_dir): metrics.csv, trace.csv + trace.json (Perfetto), checkpoint/, and TensorBoard scalars
under tb/ with logger=tensorboard. Entry point: `python -m backends.run backend=toy ...` (backends/run.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from asyncopd import trace
from asyncopd.estimators import forward_kl_exact, ngram_repetition, reverse_kl_exact, truncation_rate
from asyncopd.objective import cache_layout
from asyncopd.rollout import Batch
from asyncopd.scheduler import Scheduler, SchedulerConfig
from backends import checkpoint
from backends.evaluate import Evaluator
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_models import (STUDENT_SFT, TEACHER_SFT, ModelSpec, load_or_train_teacher,
                                 load_or_warmup_student, response_logits)
from backends.toy_task import HELDOUT_SEED, SortTask
from backends.toy_teacher import ToyTeacher, scored_tokens

log = logging.getLogger(__name__)
WALL_CLOCK_COLUMNS = ("step_s", "rollout_s", "teacher_s", "learner_s", "samples_per_s")  # not reproducible


@dataclass
class ToyConfig:
    # the task (backends/toy_task.py)
    n_symbols: int = 16                  # distinct symbols to sort, >= 2
    max_len: int = 24                    # longest list; responses are at most max_len + 1 tokens
    length_power: float = 1.3            # list length ~ L^-a on 1..max_len: most short, a few long
    # the models (backends/toy_models.py); trained once and cached under cache_dir
    teacher_layers: int = 4              # 4 x 128 ≈ 0.8M parameters
    teacher_width: int = 128
    teacher_steps: int = TEACHER_SFT["steps"]           # SFT steps of the teacher (part of its cache key)
    student_layers: int = 2              # 2 x 64 ≈ 0.1M parameters
    student_width: int = 64
    student_warmup_steps: int = STUDENT_SFT["steps"]    # SFT warm-up: the student starts clearly below the teacher
    n_head: int = 4                      # attention heads of both models
    sft_lr: float = TEACHER_SFT["lr"]                   # learning rate of both SFT runs
    sft_batch_size: int = TEACHER_SFT["batch_size"]
    model_seed: int = 0                  # init + SFT seed: every run of a study shares the same models
    cache_dir: str | None = None         # None: $ASYNCOPD_CACHE or ~/.cache/asyncopd
    # rollouts
    batch_size: int = 64                 # trajectories per learner step (B)
    temperature: float = 1.0             # sampling temperature; 1 keeps π_β the distribution the learner sees
    engine_slots: int = 64               # concurrent sequences in the rollout engine (continuous batching)
    # the learner
    lr: float = 1e-4                     # AdamW learning rate, > 0
    grad_clip: float = 1.0               # max gradient norm, > 0
    weight_decay: float = 0.0            # AdamW weight decay, >= 0
    vcpo_lr: bool = False                # VCPO: scale the learning rate by ESS/N of the batch's IS weights
    mixture_frac: float = 0.0            # StableOPD rollout mixture: share of each batch sampled from the teacher,
                                         # in [0, 1); round(mixture_frac · batch_size) must be in 1..batch_size − 1
    # evaluation, checkpoints, hardware
    eval_every: int = 10                 # held-out greedy accuracy every this many steps (and at the end), >= 1
    eval_prompts: int = 512              # held-out prompts, >= 1
    ckpt_every: int = 10                 # checkpoint every this many steps (and at the end), >= 1
    device: str = "auto"                 # auto | cpu | cuda | cuda:<i>
    threads: int = 0                     # torch CPU threads; 0 = leave torch's default

    def __post_init__(self):
        for name, ok, rule in (
                ("n_symbols", self.n_symbols >= 2, ">= 2"), ("max_len", self.max_len >= 1, ">= 1"),
                ("length_power", self.length_power >= 0, ">= 0"), ("batch_size", self.batch_size >= 1, ">= 1"),
                ("temperature", self.temperature > 0, "> 0"), ("engine_slots", self.engine_slots >= 1, ">= 1"),
                ("lr", self.lr > 0, "> 0"), ("grad_clip", self.grad_clip > 0, "> 0"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"), ("eval_every", self.eval_every >= 1, ">= 1"),
                ("eval_prompts", self.eval_prompts >= 1, ">= 1"), ("ckpt_every", self.ckpt_every >= 1, ">= 1"),
                ("threads", self.threads >= 0, ">= 0"), ("teacher_steps", self.teacher_steps >= 1, ">= 1"),
                ("student_warmup_steps", self.student_warmup_steps >= 0, ">= 0"), ("sft_lr", self.sft_lr > 0, "> 0"),
                ("mixture_frac", 0 <= self.mixture_frac < 1, "in [0, 1)")):
            if not ok:
                raise ValueError(f"toy.{name} must be {rule}, got {getattr(self, name)!r}")
        if self.mixture_frac > 0 and not 1 <= self.n_mixture <= self.batch_size - 1:
            raise ValueError(f"toy.mixture_frac={self.mixture_frac} gives round(mixture_frac · batch_size="
                             f"{self.batch_size}) = {self.n_mixture} teacher rollouts per batch; it must be in "
                             f"1..{self.batch_size - 1} (at least one rollout of each policy)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"toy.device must be auto, cpu, cuda or cuda:<i>, got {self.device!r}")
        for name in ("teacher_width", "student_width"):
            if getattr(self, name) % self.n_head:
                raise ValueError(f"toy.n_head={self.n_head} must divide toy.{name}={getattr(self, name)}")

    @property
    def n_mixture(self) -> int:
        """Teacher rollouts per batch (rollout mixture); the student samples the other batch_size − n_mixture."""
        return round(self.mixture_frac * self.batch_size)

    def task(self) -> SortTask:
        return SortTask(n_symbols=self.n_symbols, max_len=self.max_len, length_power=self.length_power)


def build_models(toy: ToyConfig):
    """(task, teacher, student, info): the cached teacher and warmed-up student for this config."""
    task = toy.task()
    positions = max(64, task.max_seq_len)
    teacher, t_info = load_or_train_teacher(
        task, ModelSpec(toy.teacher_layers, toy.teacher_width, toy.n_head, positions), steps=toy.teacher_steps,
        seed=toy.model_seed, lr=toy.sft_lr, batch_size=toy.sft_batch_size, cache_dir=toy.cache_dir)
    student, s_info = load_or_warmup_student(
        task, ModelSpec(toy.student_layers, toy.student_width, toy.n_head, positions),
        steps=toy.student_warmup_steps, seed=toy.model_seed, lr=toy.sft_lr, batch_size=toy.sft_batch_size,
        cache_dir=toy.cache_dir)
    return task, teacher, student, {"teacher": t_info, "student": s_info}


def parse_staleness(spec: str) -> int | str:
    """'fixed:k' -> k; 'schedule:<file>' -> the file (a simulator schedule, replayed by backends/toy_replay.py)."""
    head, _, k = str(spec).partition(":")
    if head == "fixed" and k.isdigit():
        return int(k)
    if head == "schedule" and k:
        return k
    raise ValueError(f"exec=lockstep takes staleness='fixed:<k>' with an integer k >= 0 or 'schedule:<file>' "
                     f"(from python -m sim.run schedule=true), got {spec!r}")


def config_digest(cfg) -> str:
    """What a resumed run must share with the one it continues: everything but steps, resume, logger and the Ray
    placement (a run may move from a local instance to a cluster), and the vllm_fsdp keys of a toy run."""
    skip = {"steps", "resume", "logger", "ray"} | ({"vllm_fsdp"} if cfg.backend == "toy" else set())
    keep = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def batch_monitors(task: SortTask, batch) -> dict[str, float]:
    """Per-batch monitors every toy run logs: staleness, response length, and StableOPD's length-inflation
    signals (truncation rate, 3-gram repetition), plus the batch's exact-match rate against the verifier."""
    lengths = [t.n_tokens for t in batch.trajs]
    return {"staleness_mean": float(np.mean(batch.staleness)), "staleness_max": max(batch.staleness),
            "response_len_mean": float(np.mean(lengths)), "response_len_max": max(lengths),
            "truncation_rate": truncation_rate([t.finish_reason for t in batch.trajs]),
            "repetition_rate": float(np.mean([ngram_repetition(t.response_ids, 3) for t in batch.trajs])),
            "train_accuracy": float(np.mean([task.verify(t.prompt_ids, t.response_ids) for t in batch.trajs]))}


def mixture_engine(task: SortTask, teacher_model, toy: ToyConfig, *, seed: int, capture_samples: int,
                   device) -> ToyRolloutEngine:
    """The rollout mixture's sampler: the teacher at T = 1 (its own distribution, so behav_logp = log π_T),
    capturing the extra samples the objective needs like the student's engine. Its weights never change."""
    return ToyRolloutEngine(teacher_model, max_batch=toy.engine_slots, max_new_tokens=task.max_response_len,
                            eos_id=task.eos_id, seed=seed, capture_samples=capture_samples, device=device)


def mixture_monitors(task: SortTask, toy: ToyConfig, mixed: list) -> dict[str, float]:
    """The mixture's columns: mixture_frac always (0.0 = plain OPD); with teacher rollouts in the batch, their
    mean length and exact-match rate (the teacher samples at T = 1, so it is not always right)."""
    if not mixed:
        return {"mixture_frac": toy.mixture_frac}
    return {"mixture_frac": toy.mixture_frac, "mixture_len_mean": float(np.mean([t.n_tokens for t in mixed])),
            "mixture_accuracy": float(np.mean([task.verify(t.prompt_ids, t.response_ids) for t in mixed]))}


def lockstep_parts(cfg):
    """(task, engine, teacher, learner, evaluate, model_info) of a one-process run (lockstep and its schedule
    replay): torch threads and device from cfg.toy, the cached models, and the engine capturing what the
    objective's cache layout needs."""
    toy = cfg.toy
    if toy.mixture_frac > 0 and str(cfg.staleness).startswith("schedule:"):
        raise ValueError("toy.mixture_frac > 0 runs with exec=lockstep staleness=fixed:<k> only, not a schedule replay")
    if toy.threads:
        torch.set_num_threads(toy.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if toy.device == "auto" else toy.device)
    task, teacher_model, student_model, model_info = build_models(toy)
    _, n_samples = cache_layout(cfg.objective)
    engine = ToyRolloutEngine(student_model, max_batch=toy.engine_slots, max_new_tokens=task.max_response_len,
                              temperature=toy.temperature, eos_id=task.eos_id, seed=cfg.seed,
                              capture_samples=n_samples, device=device)
    teacher = ToyTeacher(teacher_model, batch_size=toy.batch_size, device=device)
    learner = ToyLearner(student_model.to(device), cfg.objective, lr=toy.lr, pad_id=task.pad_id,
                         weight_decay=toy.weight_decay, grad_clip=toy.grad_clip, vcpo_lr=toy.vcpo_lr)
    evaluate = Evaluator(task, student_model, teacher.model, n_prompts=toy.eval_prompts, seed=cfg.seed, device=device)
    return task, engine, teacher, learner, evaluate, model_info


def run(cfg, out_dir: Path, parts=lockstep_parts) -> pd.DataFrame:
    """One lockstep run; `cfg` is a backends.run.RunConfig. Returns the metrics table (also in metrics.csv).
    `parts(cfg)` builds the roles: the toy engines by default, vLLM + FSDP2 with backends.vllm_fsdp.parts."""
    toy, objective = cfg.toy, cfg.objective
    k = parse_staleness(cfg.staleness)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task, engine, teacher, learner, evaluate, model_info = parts(cfg)
    topk, n_samples = cache_layout(objective)
    B = toy.batch_size
    weight_bytes = sum(p.numel() * p.element_size() for p in learner.model.parameters())

    # --- start or resume --------------------------------------------------------------------------------
    ckpt_root, digest = out_dir / "checkpoint", config_digest(cfg)
    resumed = cfg.resume and learner.resume_checkpoint(ckpt_root, digest=digest)
    if resumed:
        resume_from, ring, state = resumed
        start = state["version"]
        rows = pd.read_csv(out_dir / "metrics.csv").query("step <= @start").to_dict("records")
        events = trace.from_frame(trace.read(out_dir / "trace.csv").iloc[:state["n_events"]])
        log.info("resumed from %s at version %d", resume_from, start)
    else:
        if cfg.resume:
            log.info("resume=true but no checkpoint under %s: starting from scratch", ckpt_root)
        start, ring, events = 0, {0: learner.state_dict()}, []
        rows = [{"step": 0, "version": 0, "estimator": objective.name, "staleness_k": k,
                 **evaluate(learner.model, ring[0], 0)}]
    n_student = B - toy.n_mixture                              # the rest of each batch is the teacher's (mixture)
    mixture = mixture_engine(task, teacher.model, toy, seed=cfg.seed, capture_samples=n_samples,
                             device=engine.device) if toy.n_mixture else None
    sched = Scheduler(SchedulerConfig(batch_size=n_student, fixed_staleness=k), version=start)
    recorder = trace.Recorder(time.monotonic, origin=time.monotonic() - (events[-1].t if events else 0.0),
                              events=events)
    writer = _tensorboard(out_dir) if cfg.logger == "tensorboard" else None

    def save_outputs(version: int) -> None:
        pd.DataFrame(rows).to_csv(out_dir / "metrics.csv.tmp", index=False)
        Path(out_dir / "metrics.csv.tmp").replace(out_dir / "metrics.csv")
        trace.write(recorder.events, out_dir / "trace.csv")
        learner.save_checkpoint(ckpt_root, version=version, ring=ring,
                                state={"config_digest": digest, "n_events": len(recorder.events)})

    # --- the loop: one learner step per iteration -------------------------------------------------------
    for v in tqdm(range(start, cfg.steps), desc=f"{objective.name} k={k}", initial=start, total=cfg.steps):
        t_step = time.monotonic()
        versions = [sched.try_admit() for _ in range(n_student)]
        w = versions[0]                                        # fixed:k admits a whole batch at max(0, v − k)
        for _ in versions:
            recorder.instant("admit", version=w)
        if engine.version != w or v == start:
            t0 = recorder.now()
            engine.load_weights(ring[w], w)
            recorder.span("weight_sync", t0, version=w, bytes=weight_bytes)
        prompts = task.make_prompts(B, seed=cfg.seed * 1_000_003 + v)
        t0 = recorder.now()
        trajs = engine.generate(prompts[:n_student], list(range(v * B, v * B + n_student)))
        for traj in trajs:                                     # lockstep generates the batch at once
            recorder.span("rollout", t0, uid=traj.uid, version=traj.behav_version, tokens=traj.n_tokens)
            sched.on_rollout_done(traj)
        batch = sched.next_batch()                             # the student's rollouts: what the monitors describe
        mixed = mixture.generate(prompts[n_student:], list(range(v * B + n_student, (v + 1) * B))) if mixture else []
        train = Batch(batch.trajs + mixed, batch.version, batch.n_dropped) if mixed else batch
        rollout_s = recorder.now() - t0

        t0 = recorder.now()
        scores = teacher.score(train.trajs, topk=topk, n_samples=n_samples)
        teacher_s = recorder.now() - t0
        recorder.span("teacher", t0, n_seqs=len(train), tokens=scored_tokens(train.trajs))
        t0 = recorder.now()
        try:
            metrics = learner.step(train, scores)
        except FloatingPointError as err:
            last = checkpoint.latest(ckpt_root)
            raise RuntimeError(f"training diverged at step {v + 1}: {err}. The last good checkpoint is "
                               f"{last} (resume=true continues from it)") from err
        learner_s = recorder.now() - t0
        version = sched.on_learner_step()
        recorder.span("learner_step", t0, version=version, n_seqs=len(batch), tokens=batch.n_tokens,
                      staleness=float(np.mean(batch.staleness)))
        ring[version] = learner.state_dict()
        for old in [u for u in ring if u < version - k]:
            del ring[old]

        step_s = time.monotonic() - t_step
        row = {"step": version, "version": version, "estimator": objective.name, "staleness_k": k,
               **batch_monitors(task, batch), **mixture_monitors(task, toy, mixed), **metrics,
               "ess": metrics.get("ess", float("nan")), "step_s": step_s, "rollout_s": rollout_s,
               "teacher_s": teacher_s, "learner_s": learner_s,
               "samples_per_s": B / step_s}
        if version % toy.eval_every == 0 or version == cfg.steps:
            row.update(evaluate(learner.model, ring[version], version))
        rows.append(row)
        if writer is not None:
            for key, val in row.items():
                if isinstance(val, (int, float)) and key != "step":
                    writer.add_scalar(key, val, version)
        if version % toy.ckpt_every == 0 or version == cfg.steps:
            save_outputs(version)

    if start >= cfg.steps:
        log.info("nothing to do: the checkpoint is already at step %d >= steps=%d", start, cfg.steps)
    trace.to_perfetto(recorder.events, out_dir / "trace.json")
    (out_dir / "models.json").write_text(json.dumps(model_info, indent=1, default=str))
    if writer is not None:
        writer.close()
    return pd.DataFrame(rows)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from err
    return SummaryWriter(str(out_dir / "tb"))
