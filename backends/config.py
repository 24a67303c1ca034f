"""The toy backend's and the process layers' config schemas: the `toy.*`, `concurrent.*` and `ray.*` keys of a run.

Importable without torch, transformers or ray (stdlib and the torch-free asyncopd.config and asyncopd.scheduler
only), so `python -m backends.run` rejects a bad config before it imports any of them; tests/test_boundaries.py
checks it. The run's own schema, `RunConfig`, composes these in backends/run.py; `RealConfig` (`vllm_fsdp.*`) is
backends/vllm_fsdp/config.py and `HealthConfig` (`health.*`) backends/health.py, both torch-free too. The
modules that use a config re-export it (`from backends.toy import ToyConfig` keeps working).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncopd.config import check_finite
from asyncopd.scheduler import ON_STALE

if TYPE_CHECKING:
    from backends.toy_task import SortTask

TEACHER_SFT = dict(steps=1500, batch_size=128, lr=3e-3)     # the toy models' SFT defaults (backends/toy_models.py)
STUDENT_SFT = dict(steps=300, batch_size=128, lr=3e-3, horizon=0)
PLACEMENTS = ("separate", "colocate_teacher_with_rollout")  # concurrent.placement
WEIGHT_UPDATES = ("in_flight", "between_rollouts")          # concurrent.weight_update
DEFAULT_BUCKET_BYTES = 4 << 20                              # weight broadcast bucket (backends/weight_sync.py)


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
    student_warmup_horizon: int = STUDENT_SFT["horizon"]  # the warm-up's lr schedule length, 0 or >= its steps:
                                         # longer stops it partway (a student still learning); 0 = anneal it
    head_dim: int = 32                   # attention head size of both models; each model has width / head_dim
                                         # heads; vLLM's CPU attention needs >= 32
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
    lr_warmup_steps: int = 0             # linear warm-up of the learning rate over the first learner steps, >= 0
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
        check_finite(self, "toy.")
        for name, ok, rule in (
                ("n_symbols", self.n_symbols >= 2, ">= 2"), ("max_len", self.max_len >= 1, ">= 1"),
                ("length_power", self.length_power >= 0, ">= 0"), ("batch_size", self.batch_size >= 1, ">= 1"),
                ("temperature", self.temperature > 0, "> 0"), ("engine_slots", self.engine_slots >= 1, ">= 1"),
                ("lr", self.lr > 0, "> 0"), ("grad_clip", self.grad_clip > 0, "> 0"),
                ("lr_warmup_steps", self.lr_warmup_steps >= 0, ">= 0"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"), ("eval_every", self.eval_every >= 1, ">= 1"),
                ("eval_prompts", self.eval_prompts >= 1, ">= 1"), ("ckpt_every", self.ckpt_every >= 1, ">= 1"),
                ("threads", self.threads >= 0, ">= 0"), ("teacher_steps", self.teacher_steps >= 1, ">= 1"),
                ("student_warmup_steps", self.student_warmup_steps >= 0, ">= 0"), ("sft_lr", self.sft_lr > 0, "> 0"),
                ("student_warmup_horizon", self.student_warmup_horizon == 0 or
                 self.student_warmup_horizon >= self.student_warmup_steps, "0 or >= toy.student_warmup_steps"),
                ("head_dim", self.head_dim >= 1, ">= 1"),
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
            if getattr(self, name) % self.head_dim:
                raise ValueError(f"toy.head_dim={self.head_dim} must divide toy.{name}={getattr(self, name)}")

    @property
    def n_mixture(self) -> int:
        """Teacher rollouts per batch (rollout mixture); the student samples the other batch_size − n_mixture."""
        return round(self.mixture_frac * self.batch_size)

    def task(self) -> SortTask:
        from backends.toy_task import SortTask   # imports torch: only when a run builds its task
        return SortTask(n_symbols=self.n_symbols, max_len=self.max_len, length_power=self.length_power)

    def torch_device(self):
        """`device` as a torch.device (auto: CUDA when present, else the CPU); imports torch when called."""
        import torch
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)


@dataclass
class ConcurrentConfig:
    """exec=concurrent (backends/toy_concurrent.py) and exec=ray (backends/ray_run.py)."""
    rollout_workers: int = 1             # rollout worker processes, each with its own engine, >= 1
    placement: str = "separate"          # separate: a teacher process | colocate_teacher_with_rollout
    weight_update: str = "in_flight"     # in_flight: load between decode steps | between_rollouts: drain first
    kv_on_update: str = "keep"           # in_flight only: running sequences keep their KV cache | recompute it
    on_stale: str = "drop"               # scheduler policy for too-stale rollouts: drop | wait | deadline
    pipeline_depth: int | None = None    # admission runs at most D versions ahead, 0 <= D <= η; None = η
                                         # (D < η with on_stale=deadline is pacing: asyncopd/scheduler.py)
    threads_per_role: int = 1            # torch threads in every process, >= 1
    queue_batches: int = 2               # bound of the trajectory queues, in batches of B, >= 1
    join_timeout_s: float = 10.0         # wait this long for a child to exit before terminating it

    def __post_init__(self):
        check_finite(self, "concurrent.")
        for name, allowed in (("placement", PLACEMENTS), ("weight_update", WEIGHT_UPDATES),
                              ("kv_on_update", ("keep", "recompute")), ("on_stale", ON_STALE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"concurrent.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("rollout_workers", "threads_per_role", "queue_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"concurrent.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.join_timeout_s < 0:
            raise ValueError(f"concurrent.join_timeout_s must be >= 0, got {self.join_timeout_s!r}")
        if self.pipeline_depth is not None and (type(self.pipeline_depth) is not int or self.pipeline_depth < 0):
            raise ValueError(f"concurrent.pipeline_depth must be None or an int >= 0 (and <= the staleness η), "
                             f"got {self.pipeline_depth!r}")


@dataclass
class RayConfig:
    """exec=ray only (backends/ray_run.py)."""
    address: str | None = None           # None: start a local Ray instance | auto | <host>:<port> | ray://<host>:<port>
    num_cpus: int = 3                    # logical CPUs of a local instance, >= 1: the default placement's three
                                         # actors at one each (joining a cluster: the cluster's own)
    num_gpus: int = 0                    # logical GPUs of a local instance, >= 0
    learner_cpus: float = 1.0            # Ray resources of the learner actor (GPUs > 0: it runs on CUDA)
    learner_gpus: float = 0.0
    rollout_cpus: float = 1.0            # ... of each rollout actor (with the colocated teacher inside it)
    rollout_gpus: float = 0.0
    teacher_cpus: float = 1.0            # ... of the teacher actor (placement=separate only)
    teacher_gpus: float = 0.0
    sync_port: int = 0                   # TCP port of the weight-sync rendezvous on the learner's node; 0 = free
    sync_bucket_bytes: int = DEFAULT_BUCKET_BYTES   # weight broadcast bucket, >= 1

    def __post_init__(self):
        check_finite(self, "ray.")
        a = self.address
        if a is not None and not (a == "auto" or a.startswith("ray://") or a.rpartition(":")[2].isdigit()):
            raise ValueError(f"ray.address must be None (start a local instance), 'auto', '<host>:<port>' or "
                             f"'ray://<host>:<port>', got {a!r}")
        for name, ok, rule in (("num_cpus", self.num_cpus >= 1, ">= 1"), ("num_gpus", self.num_gpus >= 0, ">= 0"),
                               ("sync_port", 0 <= self.sync_port <= 65535, "in [0, 65535]"),
                               ("sync_bucket_bytes", self.sync_bucket_bytes >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"ray.{name} must be {rule}, got {getattr(self, name)!r}")
        for role in ("learner", "rollout", "teacher"):
            cpus, gpus = getattr(self, f"{role}_cpus"), getattr(self, f"{role}_gpus")
            if cpus < 0 or gpus < 0:
                raise ValueError(f"ray.{role}_cpus and ray.{role}_gpus must be >= 0, got {cpus}, {gpus}")
            if gpus > 1 and gpus != int(gpus):
                raise ValueError(f"ray.{role}_gpus above 1 must be a whole number (Ray's rule), got {gpus}")


def check_fits(ray_cfg: RayConfig, concurrent: ConcurrentConfig) -> None:
    """A local instance must hold every actor at once, or the run would wait forever for a pending actor."""
    if ray_cfg.address is not None:
        return                           # a cluster's capacity is the cluster's business (actors queue there)
    n, separate = concurrent.rollout_workers, concurrent.placement == "separate"
    for kind, have in (("cpus", ray_cfg.num_cpus), ("gpus", ray_cfg.num_gpus)):
        need = (getattr(ray_cfg, f"learner_{kind}") + n * getattr(ray_cfg, f"rollout_{kind}")
                + separate * getattr(ray_cfg, f"teacher_{kind}"))
        if need > have + 1e-9:
            raise ValueError(f"ray.num_{kind}={have} cannot hold the actors' requests: learner + "
                             f"{n} rollout actor(s){' + teacher' if separate else ''} need {kind}={need:g}; raise "
                             f"ray.num_{kind} or lower ray.*_{kind} (placement={concurrent.placement})")
