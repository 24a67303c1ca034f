"""backend=vllm_fsdp: the roles of a run on real engines: vLLM rollouts and teacher, the FSDP2 learner.

The one idea: the run loops do not change. `backends/toy.py` (lockstep) asks for its parts (task, rollout
engine, teacher, learner, evaluator); with `backend=vllm_fsdp` they come from here: a `VLLMRolloutEngine` on the
student folder, a `VLLMTeacher` on the teacher folder, an `FSDPLearner` (bf16 compute on fp32 master weights,
lm head chunked over tokens) on the student, in a process group of its own (world size 1; NCCL on a GPU, gloo on
a CPU). The scheduler, estimators, metrics, trace and checkpoints are the toy backend's.

Models: local Hugging Face folders (`vllm_fsdp.student_path`, `vllm_fsdp.teacher_path`); empty paths export the
toy pair of `toy` (backends/toy_export.py), so a run is self-contained. Nothing is downloaded
(`local_files_only=True`), and a folder's own Python code runs only with `vllm_fsdp.trust_remote_code=true`.
The prompts and the verifier are the sort task's, so the models must speak its token ids (the exported toy
pair does); held-out evaluation runs the toy backend's `Evaluator` on an fp32 copy of the student (GPT-2
models only).

    python -m backends.run backend=vllm_fsdp staleness=fixed:1 steps=50 estimator=forward_kl_topk   # on a GPU

Not supported with vLLM rollouts: `reverse_kl_mc` (it needs extra draws per position at rollout time, which
vLLM does not make) and `toy.mixture_frac > 0`.
"""

from __future__ import annotations

import copy
import tempfile
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


def engine_config(real: RealConfig, path: Path, gpu_memory: float, max_logprobs: int) -> VLLMConfig:
    """The vLLM engine of one role (rollout or teacher) on the model folder `path`."""
    return VLLMConfig(model_path=str(path), dtype=real.dtype, gpu_memory_utilization=gpu_memory,
                      max_model_len=real.max_model_len, max_logprobs=max_logprobs,
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


def lockstep_parts(cfg, *, build_engine=build_llm_engine):
    """(task, engine, teacher, learner, evaluate, model_info) of a one-process run on vLLM + FSDP2.
    `build_engine(VLLMConfig, logprobs_mode=) -> (engine, api)` is vLLM's by default (tests pass a fake)."""
    toy, real, objective = cfg.toy, cfg.vllm_fsdp, cfg.objective
    topk, n_samples = cache_layout(objective)
    if n_samples:
        raise ValueError(f"estimator {objective.estimator} needs {n_samples} extra draws per position at rollout "
                         "time, which vLLM rollouts do not make: use forward_kl_topk, reverse_kl_topk or "
                         "reverse_kl_sampled with backend=vllm_fsdp")
    if toy.mixture_frac:
        raise ValueError("toy.mixture_frac > 0 (rollout mixture) is a toy-backend feature; set it to 0 with "
                         "backend=vllm_fsdp")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if toy.device == "auto" else toy.device)
    task = toy.task()
    teacher_path, student_path = model_paths(cfg)
    load = dict(local_files_only=True, trust_remote_code=real.trust_remote_code, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(student_path, **load)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_path, **load).eval()
    student_eval = copy.deepcopy(student).eval()           # the evaluator's own fp32 copy, never sharded

    temperature = toy.temperature
    engine = VLLMRolloutEngine(
        *build_engine(engine_config(real, student_path, real.rollout_gpu_memory, 0),
                      logprobs_mode=logprobs_mode_for(temperature)),
        max_new_tokens=task.max_response_len, temperature=temperature, eos_id=task.eos_id, seed=cfg.seed)
    teacher = VLLMTeacher(*build_engine(engine_config(real, teacher_path, real.teacher_gpu_memory, topk),
                                        logprobs_mode="raw_logprobs"), batch_size=toy.batch_size)
    init_single_process_group(device)
    learner = FSDPLearner(student.to(device), objective, lr=toy.lr, pad_id=task.pad_id,
                          mixed_precision=real.mixed_precision, head_chunk_tokens=real.head_chunk_tokens,
                          weight_decay=toy.weight_decay, grad_clip=toy.grad_clip, vcpo_lr=toy.vcpo_lr)
    evaluate = _EvalCopy(Evaluator(task, student_eval, teacher_model, n_prompts=toy.eval_prompts, seed=cfg.seed,
                                   device=device), student_eval.to(device))
    info = {"teacher": {"path": str(teacher_path)}, "student": {"path": str(student_path)},
            "device": str(device), "mixed_precision": real.mixed_precision}
    return task, engine, teacher, learner, evaluate, info
