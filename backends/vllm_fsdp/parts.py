"""backend=vllm_fsdp: the roles of a run on real engines: vLLM rollouts and teacher, the FSDP2 learner.

The one idea: the run loops do not change. The lockstep loop (backends/lockstep.py) asks for its parts (task,
rollout engine, teacher, learner, evaluator), the concurrent run (backends/toy_concurrent.py) for its
learner side and the roles its worker processes build their engines from (`VLLMRoles`), and the Ray run
(backends/ray_run.py) for the roles its actors build everything from; with
`backend=vllm_fsdp` they come from here: a `VLLMRolloutEngine` on the student folder, a `VLLMTeacher` on the
teacher folder, an `FSDPLearner` (bf16 compute on fp32 master weights, lm head chunked over tokens) on the
student, in a process group of its own (world size 1; NCCL on a GPU, gloo on a CPU). The scheduler, estimators,
metrics, trace and checkpoints are the same as the toy backend's.

Models: local Hugging Face folders (`vllm_fsdp.student_path`, `vllm_fsdp.teacher_path`); empty paths export the
toy pair of `toy` (backends/toy_export.py), so a run is self-contained. Nothing is downloaded
(`local_files_only=True`), and a folder's own Python code runs only with `vllm_fsdp.trust_remote_code=true`.
The prompts and the verifier are the sort task's, so the models must speak its token ids (the exported toy
pair does); held-out evaluation runs the toy backend's `Evaluator` on an fp32 copy of the student (GPT-2
models only).

    python -m backends.run backend=vllm_fsdp staleness=fixed:1 steps=50 estimator=forward_kl_topk
    python -m backends.run backend=vllm_fsdp exec=concurrent staleness=1 steps=50    # vLLM in worker processes
    python -m backends.run backend=vllm_fsdp exec=ray staleness=1 steps=50           # vLLM in Ray actors

Not supported with vLLM rollouts: `reverse_kl_mc` (it needs extra draws per position at rollout time, which
vLLM does not make) and `toy.mixture_frac > 0`.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from asyncopd.objective import cache_layout
from backends.evaluate import Evaluator
from backends.toy_export import export_toy_models
from backends.vllm_fsdp.config import RealConfig
from backends.vllm_fsdp.fsdp_learner import FSDPLearner
from backends.vllm_fsdp.vllm_engine import VLLMConfig, VLLMRolloutEngine, build_llm_engine, logprobs_mode_for
from backends.vllm_fsdp.vllm_teacher import VLLMTeacher


def model_paths(cfg) -> tuple[Path, Path]:
    """(teacher folder, student folder): the configured ones, the exported toy pair where a path is empty."""
    real = cfg.vllm_fsdp
    exported = export_toy_models(cfg.toy) if not (real.teacher_path and real.student_path) else (None, None)
    return Path(real.teacher_path or exported[0]), Path(real.student_path or exported[1])


def engine_config(real: RealConfig, path: Path, gpu_memory: float, max_logprobs: int,
                  max_num_seqs: int = VLLMConfig.max_num_seqs) -> VLLMConfig:
    """The vLLM engine of one role (rollout or teacher) on the model folder `path`."""
    return VLLMConfig(model_path=str(path), dtype=real.dtype, gpu_memory_utilization=gpu_memory,
                      max_model_len=real.max_model_len, max_logprobs=max_logprobs, max_num_seqs=max_num_seqs,
                      enforce_eager=real.enforce_eager, trust_remote_code=real.trust_remote_code,
                      cpu_kv_cache_gib=real.cpu_kv_cache_gib)


def init_single_process_group(device: torch.device) -> None:
    """A process group of one rank for the learner (NCCL on a GPU, gloo on a CPU), unless one exists."""
    if dist.is_initialized():
        return
    rendezvous = Path(tempfile.mkdtemp(prefix="asyncopd_pg_")) / "rendezvous"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                            rank=0, world_size=1)


class _EvalCopy:
    """The toy Evaluator on an unsharded fp32 copy of the student, refreshed from the published weights."""

    def __init__(self, evaluator: Evaluator, model):
        self.evaluator, self.model = evaluator, model

    def __call__(self, _learner_model, weights: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        self.model.load_state_dict({k: v.float() for k, v in weights.items()})
        return self.evaluator(self.model, weights, version)


@dataclass
class VLLMRoles:
    """How a process builds the vLLM roles: the run's config and the two model folders (picklable, so the
    concurrent run's worker processes build their own engines). Engines start on the folders' weights, version 0;
    a resumed run publishes its learner's weights to them at once. `build_engine` is vLLM's unless a test
    passes a stand-in."""

    cfg: object                          # backends.run.RunConfig
    student_path: Path
    teacher_path: Path
    build_engine: object = build_llm_engine
    version: int = 0                     # the version of the folders' weights

    def rollout_engine(self, device=None) -> VLLMRolloutEngine:
        real, task, temperature = self.cfg.vllm_fsdp, self.cfg.toy.task(), self.cfg.toy.temperature
        return VLLMRolloutEngine(
            *self.build_engine(engine_config(real, self.student_path, real.rollout_gpu_memory, 0,
                                             max_num_seqs=self.cfg.toy.engine_slots),
                               logprobs_mode=logprobs_mode_for(temperature)),
            max_new_tokens=task.max_response_len, temperature=temperature, eos_id=task.eos_id, seed=self.cfg.seed)

    def teacher(self, device=None) -> VLLMTeacher:
        real, (topk, _) = self.cfg.vllm_fsdp, cache_layout(self.cfg.objective)
        return VLLMTeacher(*self.build_engine(engine_config(real, self.teacher_path, real.teacher_gpu_memory, topk),
                                              logprobs_mode="raw_logprobs"), batch_size=self.cfg.toy.batch_size)

    def learner_side(self, device=None):
        """(learner, evaluate) in this process (the Ray run's learner actor)."""
        _, learner, evaluate, _ = learner_parts(self.cfg, self, device)
        return learner, evaluate

    def model_info(self, device) -> dict:
        return {"teacher": {"path": str(self.teacher_path)}, "student": {"path": str(self.student_path)},
                "device": str(device), "mixed_precision": self.cfg.vllm_fsdp.mixed_precision}


def check_supported(cfg) -> None:
    """What vLLM rollouts cannot do, refused before anything starts."""
    objective = cfg.objective
    if (n_samples := cache_layout(objective)[1]):
        raise ValueError(f"estimator {objective.estimator} needs {n_samples} extra draws per position at rollout "
                         "time, which vLLM rollouts do not make: use forward_kl_topk, reverse_kl_topk or "
                         "reverse_kl_sampled with backend=vllm_fsdp")
    if cfg.toy.mixture_frac:
        raise ValueError("toy.mixture_frac > 0 (rollout mixture) is a toy-backend feature; set it to 0 with "
                         "backend=vllm_fsdp")


def vllm_roles(cfg, build_engine=build_llm_engine) -> VLLMRoles:
    """The run's vLLM roles (model folders: the configured ones, or the exported toy pair)."""
    check_supported(cfg)
    teacher_path, student_path = model_paths(cfg)
    return VLLMRoles(cfg, student_path, teacher_path, build_engine)


def learner_parts(cfg, roles: VLLMRoles, device=None):
    """(task, learner, evaluate, model_info): the learner side of a vLLM + FSDP2 run, in this process."""
    toy, real = cfg.toy, cfg.vllm_fsdp
    device = torch.device(device) if device is not None else toy.torch_device()   # a Ray actor's, or toy.device
    task = toy.task()
    load = dict(local_files_only=True, trust_remote_code=real.trust_remote_code, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(roles.student_path, **load)
    teacher_model = AutoModelForCausalLM.from_pretrained(roles.teacher_path, **load).eval()
    student_eval = copy.deepcopy(student).eval()           # the evaluator's own fp32 copy, never sharded
    init_single_process_group(device)                      # unless vLLM started one here: the learner reuses it
    learner = FSDPLearner(student.to(device), cfg.objective, lr=toy.lr, pad_id=task.pad_id,
                          mixed_precision=real.mixed_precision, head_chunk_tokens=real.head_chunk_tokens,
                          weight_decay=toy.weight_decay, grad_clip=toy.grad_clip, vcpo_lr=toy.vcpo_lr,
                          lr_warmup_steps=toy.lr_warmup_steps)
    evaluate = _EvalCopy(Evaluator.of_run(cfg, task, student_eval, teacher_model, device), student_eval.to(device))
    return task, learner, evaluate, roles.model_info(device)


def lockstep_parts(cfg, *, build_engine=build_llm_engine):
    """(task, engine, teacher, learner, evaluate, model_info) of a one-process run on vLLM + FSDP2.
    `build_engine(VLLMConfig, logprobs_mode=) -> (engine, api)` is vLLM's by default (tests pass a fake)."""
    roles = vllm_roles(cfg, build_engine)
    engine, teacher = roles.rollout_engine(), roles.teacher()   # before the learner, as vLLM sets up its group
    task, learner, evaluate, info = learner_parts(cfg, roles)
    return task, engine, teacher, learner, evaluate, info


def ray_parts(cfg):
    """(task, roles, model_info) of exec=ray on vLLM + FSDP2: the learner actor builds the FSDP2 learner, the
    rollout and teacher actors their vLLM engines, each from the model folders."""
    roles = vllm_roles(cfg)
    return cfg.toy.task(), roles, roles.model_info(torch.device("cuda" if cfg.ray.learner_gpus else "cpu"))


def concurrent_parts(cfg):
    """(task, roles_of, learner, evaluate, model_info) of exec=concurrent on vLLM + FSDP2: the worker processes
    build their engines from the roles (on the folders' weights, version 0, whatever the learner's are); the
    learner and the evaluator live in this process."""
    roles = vllm_roles(cfg)
    task, learner, evaluate, info = learner_parts(cfg, roles)
    return task, lambda _learner, _version: roles, learner, evaluate, info
