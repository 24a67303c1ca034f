"""`RealConfig`: the `vllm_fsdp.*` keys of a run (backend=vllm_fsdp): model folders, vLLM engines, FSDP2 learner.

Importable without torch or vllm, so a run checks it before loading them; the engine and learner modules take their
option names (DTYPES, MIXED_PRECISION) from here, and parts.py turns it into a VLLMConfig (`engine_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from asyncopd.config import check_finite

DTYPES = ("auto", "bfloat16", "float16", "float32")   # vLLM weights and compute (vllm_engine.VLLMConfig.dtype)
MIXED_PRECISION = ("fp32", "bf16")                     # the FSDP2 learner's compute (fsdp_learner.FSDPLearner)


@dataclass
class RealConfig:
    student_path: str = ""               # local HF folder of the student; "" = export the toy student of `toy`
    teacher_path: str = ""               # local HF folder of the teacher; "" = export the toy teacher of `toy`
    trust_remote_code: bool = False      # run a model folder's own Python code: only for folders you trust
    dtype: str = "bfloat16"              # vLLM weights and compute: auto | bfloat16 | float16 | float32
    rollout_gpu_memory: float = 0.3      # fraction of the GPU the rollout engine may take, in (0, 1); GPU only
    teacher_gpu_memory: float = 0.3      # fraction the teacher engine may take; the learner keeps the rest
    cpu_kv_cache_gib: float = 1.0        # KV cache of each vLLM engine on a CPU, in GiB, > 0; CPU only
    max_model_len: int = 0               # prompt + response tokens per sequence, >= 0; 0 = the model's positions
    enforce_eager: bool = True           # no CUDA graphs: slower decode, faster start (short runs)
    mixed_precision: str = "bf16"        # learner: bf16 compute on fp32 master weights | fp32 (needs a GPU for bf16 speed)
    head_chunk_tokens: int = 2048        # learner: lm-head rows per chunk, >= 1 (peak logits: chunk × vocab)

    def __post_init__(self):
        check_finite(self, "vllm_fsdp.")
        if self.dtype not in DTYPES:
            raise ValueError(f"vllm_fsdp.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"vllm_fsdp.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        for name in ("rollout_gpu_memory", "teacher_gpu_memory"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"vllm_fsdp.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.rollout_gpu_memory + self.teacher_gpu_memory >= 1:
            raise ValueError(f"vllm_fsdp.rollout_gpu_memory + teacher_gpu_memory must be < 1 (the learner shares the "
                             f"GPU), got {self.rollout_gpu_memory} + {self.teacher_gpu_memory}")
        if not self.cpu_kv_cache_gib > 0:
            raise ValueError(f"vllm_fsdp.cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if self.max_model_len < 0:
            raise ValueError(f"vllm_fsdp.max_model_len must be >= 0 (0 = the model's), got {self.max_model_len}")
        if self.head_chunk_tokens < 1:
            raise ValueError(f"vllm_fsdp.head_chunk_tokens must be >= 1, got {self.head_chunk_tokens}")
        for name in ("student_path", "teacher_path"):
            path = getattr(self, name)
            if path and not (Path(path) / "config.json").is_file():
                raise ValueError(f"vllm_fsdp.{name}={path!r} is not a local Hugging Face folder (no config.json)")
