"""The toy backend's roles: tiny GPT-2 teacher and student on a sort task, on a CPU (or one GPU).

`ToyConfig` (the `toy.*` keys of a run) describes the task, the two models (trained here once and cached as
safetensors, nothing downloaded), the rollout batch, the learner and the evaluation cadence. `build_models`
loads or trains the pair; `lockstep_parts` builds the roles of a one-process run (lockstep and schedule
replay: backends/lockstep.py, backends/replay.py); `mixture_engine` is the rollout mixture's teacher sampler.
The concurrent and Ray runs build the same roles inside their worker processes and actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncopd.objective import cache_layout
from backends.evaluate import Evaluator
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_models import STUDENT_SFT, TEACHER_SFT, ModelSpec, load_or_train_teacher, load_or_warmup_student
from backends.toy_task import SortTask
from backends.toy_teacher import ToyTeacher


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


def mixture_engine(task: SortTask, teacher_model, toy: ToyConfig, *, seed: int, capture_samples: int,
                   device) -> ToyRolloutEngine:
    """The rollout mixture's sampler: the teacher at T = 1 (its own distribution, so behav_logp = log π_T),
    capturing the extra samples the objective needs like the student's engine. Its weights never change."""
    return ToyRolloutEngine(teacher_model, max_batch=toy.engine_slots, max_new_tokens=task.max_response_len,
                            eos_id=task.eos_id, seed=seed, capture_samples=capture_samples, device=device)


def lockstep_parts(cfg):
    """(task, engine, teacher, learner, evaluate, model_info) of a one-process run (lockstep and its schedule
    replay): torch threads and device from cfg.toy, the cached models, and the engine capturing what the
    objective's cache layout needs."""
    toy = cfg.toy
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
