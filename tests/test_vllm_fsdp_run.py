"""backend=vllm_fsdp's run config: what vLLM rollouts cannot do is refused before anything starts, and the
real-engine config checks. (The runs themselves, lockstep, concurrent and Ray, are tested on the real vLLM in
test_vllm_real.py.)"""

import pytest

from asyncopd.objective import ObjectiveConfig
from backends.run import RunConfig
from backends.toy import ToyConfig
from backends.vllm_fsdp.config import RealConfig
from backends.vllm_fsdp.parts import lockstep_parts

SMOKE = dict(n_symbols=4, max_len=4, teacher_layers=1, teacher_width=32, teacher_steps=60, student_layers=1,
             student_width=16, student_warmup_steps=5, head_dim=8, sft_batch_size=32, batch_size=8, device="cpu")


def never_built(vcfg, *, logprobs_mode):
    raise AssertionError("the config check should have refused before an engine is built")


def test_vllm_fsdp_config_refuses_what_vllm_rollouts_cannot_do(model_cache, tmp_path):
    mc = RunConfig(backend="vllm_fsdp", toy=ToyConfig(**SMOKE, cache_dir=model_cache),
                   objective=ObjectiveConfig(estimator="reverse_kl_mc"))
    with pytest.raises(ValueError, match="extra draws per position"):
        lockstep_parts(mc, build_engine=never_built)
    with pytest.raises(ValueError, match="schedule on the toy backend only"):
        RunConfig(backend="vllm_fsdp", staleness=f"schedule:{tmp_path / 'schedule.csv'}")
    assert RunConfig(backend="vllm_fsdp", exec="concurrent", staleness="1").exec == "concurrent"
    assert RunConfig(backend="vllm_fsdp", exec="ray", staleness="1").exec == "ray"
    with pytest.raises(ValueError, match="teacher_path.*config.json"):
        RealConfig(teacher_path=str(tmp_path))
    with pytest.raises(ValueError, match="rollout_gpu_memory \\+ teacher_gpu_memory must be < 1"):
        RealConfig(rollout_gpu_memory=0.5, teacher_gpu_memory=0.5)
