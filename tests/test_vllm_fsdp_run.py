"""backend=vllm_fsdp end to end on CPU: the lockstep loop on the vLLM adapters (over tests/fake_vllm.py) and the
FSDP2 learner (gloo, world size 1), with the models exported to local HF folders; then exact resume."""

from functools import partial

import pandas as pd
import pytest
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import fake_vllm  # tests/ is on sys.path (pytest prepend import mode)
from asyncopd import trace
from asyncopd.objective import ObjectiveConfig
from backends import lockstep
from backends.run import RunConfig
from backends.session import WALL_CLOCK_COLUMNS
from backends.toy import ToyConfig
from backends.vllm_fsdp.config import RealConfig
from backends.vllm_fsdp.fsdp_learner import FSDPLearner
from backends.vllm_fsdp.parts import lockstep_parts
from fake_vllm import FakeLLMEngine

SMOKE = dict(n_symbols=4, max_len=4, teacher_layers=1, teacher_width=32, teacher_steps=60, student_layers=1,
             student_width=16, student_warmup_steps=5, head_dim=8, sft_batch_size=32, batch_size=8, eval_every=2,
             eval_prompts=32, ckpt_every=1, lr=3e-3, device="cpu")
built: list[tuple[str, str]] = []                     # (model folder, logprobs_mode) of every engine built


def fake_engine(vcfg, *, logprobs_mode):
    """build_llm_engine's stand-in: the fake engine over the model folder vLLM would have loaded."""
    built.append((vcfg.model_path, logprobs_mode))
    model = AutoModelForCausalLM.from_pretrained(vcfg.model_path, local_files_only=True)
    return FakeLLMEngine(model, logprobs_mode=logprobs_mode, max_logprobs=vcfg.max_logprobs), fake_vllm


@pytest.fixture
def process_group():
    yield
    if dist.is_initialized():                          # the run made a world of one; later tests expect none
        dist.destroy_process_group()


def config(model_cache, steps, **kw) -> RunConfig:
    return RunConfig(backend="vllm_fsdp", staleness="fixed:1", steps=steps, seed=3,
                     toy=ToyConfig(**SMOKE, cache_dir=model_cache),
                     objective=ObjectiveConfig(estimator="forward_kl_topk", topk=3),
                     vllm_fsdp=RealConfig(mixed_precision="fp32"), **kw)


@pytest.mark.slow
def test_vllm_fsdp_lockstep_runs_trains_and_resumes_exactly(model_cache, tmp_path, process_group, monkeypatch):
    parts = partial(lockstep_parts, build_engine=fake_engine)
    steps, fsdp_step = [], FSDPLearner.step
    monkeypatch.setattr(FSDPLearner, "step", lambda self, *a: steps.append(a[0].version) or fsdp_step(self, *a))
    straight = lockstep.run(config(model_cache, 3), tmp_path / "straight", parts=parts)
    (teacher_dir, teacher_mode), (student_dir, student_mode) = sorted(built[:2], key=lambda b: "student" in b[0])
    assert "teacher-" in teacher_dir and "student-" in student_dir and teacher_mode == student_mode == "raw_logprobs"

    assert straight.step.tolist() == [0, 1, 2, 3] and straight.accuracy.notna().tolist() == [True, False, True, True]
    assert (straight.staleness_max.iloc[1:] <= 1).all() and straight.staleness_max.iloc[2:].tolist() == [1, 1]
    assert straight.loss.iloc[1:].notna().all() and (straight.n_tokens.iloc[1:] > 0).all()
    events = trace.read(tmp_path / "straight" / "trace.csv")
    assert events.query("kind == 'learner_step'").version.tolist() == [1, 2, 3]
    assert (events.query("kind == 'rollout'").tokens > 0).all()
    sync = events.query("kind == 'weight_sync'")
    assert len(sync) >= 1 and (sync.bytes > 0).all()

    lockstep.run(config(model_cache, 2), tmp_path / "resumed", parts=parts)
    steps.clear()
    resumed = lockstep.run(config(model_cache, 3, resume=True), tmp_path / "resumed", parts=parts)
    assert steps == [2]                                 # only the third step ran: the rest came from the checkpoint
    keep = [c for c in straight.columns if c not in WALL_CLOCK_COLUMNS]
    pd.testing.assert_frame_equal(resumed[keep].reset_index(drop=True), straight[keep], check_exact=True)


def test_vllm_fsdp_config_refuses_what_vllm_rollouts_cannot_do(model_cache, tmp_path):
    mc = RunConfig(backend="vllm_fsdp", toy=ToyConfig(**SMOKE, cache_dir=model_cache),
                   objective=ObjectiveConfig(estimator="reverse_kl_mc"))
    with pytest.raises(ValueError, match="extra draws per position"):
        lockstep_parts(mc, build_engine=fake_engine)
    with pytest.raises(ValueError, match="exec=ray runs the toy engines only"):
        RunConfig(backend="vllm_fsdp", exec="ray", staleness="1")
    assert RunConfig(backend="vllm_fsdp", exec="concurrent", staleness="1").exec == "concurrent"
    with pytest.raises(ValueError, match="teacher_path.*config.json"):
        RealConfig(teacher_path=str(tmp_path))
    with pytest.raises(ValueError, match="rollout_gpu_memory \\+ teacher_gpu_memory must be < 1"):
        RealConfig(rollout_gpu_memory=0.5, teacher_gpu_memory=0.5)
