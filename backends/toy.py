"""The toy backend's roles: tiny GPT-2 teacher and student on a sort task, on a CPU (or one GPU).

`ToyConfig` (the `toy.*` keys of a run, defined torch-free in backends/config.py) describes the task, the two
models (trained here once and cached as safetensors, nothing downloaded), the rollout batch, the learner and the
evaluation cadence. `build_models` loads or trains the pair; `lockstep_parts` builds the roles of a one-process
run (lockstep and schedule replay: backends/lockstep.py, backends/replay.py); `mixture_engine` is the rollout
mixture's teacher sampler. The concurrent and Ray runs build their rollout engines and teachers inside their
worker processes and actors from a `ToyRoles`, which carries the models there.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

from asyncopd.objective import cache_layout
from backends.config import ToyConfig   # torch-free, so a run checks it first; re-exported here
from backends.evaluate import Evaluator
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_models import ModelSpec, load_or_train_teacher, load_or_warmup_student
from backends.toy_task import SortTask
from backends.toy_teacher import ToyTeacher


def build_models(toy: ToyConfig):
    """(task, teacher, student, info): the cached teacher and warmed-up student for this config."""
    task = toy.task()
    positions = max(64, task.max_seq_len)
    teacher, t_info = load_or_train_teacher(
        task, ModelSpec(toy.teacher_layers, toy.teacher_width, toy.teacher_width // toy.head_dim, positions),
        steps=toy.teacher_steps, seed=toy.model_seed, lr=toy.sft_lr, batch_size=toy.sft_batch_size,
        cache_dir=toy.cache_dir)
    student, s_info = load_or_warmup_student(
        task, ModelSpec(toy.student_layers, toy.student_width, toy.student_width // toy.head_dim, positions),
        steps=toy.student_warmup_steps, seed=toy.model_seed, lr=toy.sft_lr, batch_size=toy.sft_batch_size,
        horizon=toy.student_warmup_horizon, cache_dir=toy.cache_dir)
    return task, teacher, student, {"teacher": t_info, "student": s_info}


def toy_learner(cfg, student_model, task: SortTask) -> ToyLearner:
    """The learner on `student_model` with the run's objective and `toy.*` optimiser settings."""
    toy = cfg.toy
    return ToyLearner(student_model, cfg.objective, lr=toy.lr, pad_id=task.pad_id, weight_decay=toy.weight_decay,
                      grad_clip=toy.grad_clip, vcpo_lr=toy.vcpo_lr, lr_warmup_steps=toy.lr_warmup_steps)


@dataclass
class ToyRoles:
    """How a worker process or a Ray actor builds its toy roles: the run's config and both models, pickled by
    this run's own process (pickle travels only between a run's live processes, never through a run folder)."""

    cfg: object                          # backends.run.RunConfig
    student_bytes: bytes
    teacher_bytes: bytes
    version: int = 0                     # the version of the student's weights in student_bytes

    @classmethod
    def of(cls, cfg, student_model, teacher_model, version: int = 0) -> ToyRoles:
        return cls(cfg, pickle.dumps(student_model), pickle.dumps(teacher_model), version)

    def rollout_engine(self, device: str | torch.device = "cpu") -> ToyRolloutEngine:
        """A streaming rollout engine on the student (weights of `self.version` until the first load)."""
        toy, task = self.cfg.toy, self.cfg.toy.task()
        return ToyRolloutEngine(pickle.loads(self.student_bytes), max_batch=toy.engine_slots,
                                max_new_tokens=task.max_response_len, temperature=toy.temperature,
                                eos_id=task.eos_id, seed=self.cfg.seed, version=self.version,
                                capture_samples=cache_layout(self.cfg.objective)[1],
                                kv_on_update=self.cfg.concurrent.kv_on_update, device=device)

    def teacher(self, device: str | torch.device = "cpu") -> ToyTeacher:
        return ToyTeacher(pickle.loads(self.teacher_bytes), batch_size=self.cfg.toy.batch_size, device=device)

    def learner_side(self, device: str | torch.device = "cpu") -> tuple[ToyLearner, Evaluator]:
        """(learner, evaluate) on the student and the teacher (the Ray run's learner actor)."""
        task = self.cfg.toy.task()
        student = pickle.loads(self.student_bytes).to(device)
        teacher = pickle.loads(self.teacher_bytes).to(device)
        return toy_learner(self.cfg, student, task), Evaluator.of_run(self.cfg, task, student, teacher, device)


def concurrent_parts(cfg):
    """(task, roles_of, learner, evaluate, model_info) of exec=concurrent: the learner and the evaluator in this
    process; roles_of(learner, version) describes the workers' roles with the learner's current weights, which
    are `version` (a resumed run's workers start on the checkpoint's)."""
    toy = cfg.toy
    task, teacher_model, student_model, model_info = build_models(toy)
    learner = toy_learner(cfg, student_model, task)
    evaluate = Evaluator.of_run(cfg, task, student_model, teacher_model, "cpu")

    def roles_of(learner_now, version: int) -> ToyRoles:
        return ToyRoles.of(cfg, learner_now.model, teacher_model, version)
    return task, roles_of, learner, evaluate, model_info


def ray_parts(cfg):
    """(task, roles, model_info) of exec=ray: the driver ships `roles` to the actors, which build theirs."""
    task, teacher_model, student_model, model_info = build_models(cfg.toy)
    return task, ToyRoles.of(cfg, student_model, teacher_model), model_info


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
    device = toy.torch_device()
    task, teacher_model, student_model, model_info = build_models(toy)
    _, n_samples = cache_layout(cfg.objective)
    engine = ToyRolloutEngine(student_model, max_batch=toy.engine_slots, max_new_tokens=task.max_response_len,
                              temperature=toy.temperature, eos_id=task.eos_id, seed=cfg.seed,
                              capture_samples=n_samples, device=device)
    teacher = ToyTeacher(teacher_model, batch_size=toy.batch_size, device=device)
    learner = toy_learner(cfg, student_model.to(device), task)
    evaluate = Evaluator.of_run(cfg, task, student_model, teacher.model, device)
    return task, engine, teacher, learner, evaluate, model_info
