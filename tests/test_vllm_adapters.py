"""vLLM adapters (backends/vllm_fsdp/vllm_engine.py, vllm_teacher.py) against tests/fake_vllm.py, a stand-in for
the subset of vLLM's V1 LLMEngine the adapters call, whose distributions come from a real tiny GPT-2. A fake
because it records what the adapters send (request shapes, prefix-cache flags, the MC pass's requests) and runs
where vllm is not installed (`pytest` in the main environment); the values themselves (log-probs, top-k, tempered
log-probs, teacher scores, an in-flight load on the old KV cache) are tested against the real vLLM in
test_vllm_real.py. Also: the protocol contract on the toy engine, lazy vllm import, config validation."""

import math
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fake_vllm  # tests/ is on sys.path (pytest prepend import mode)
from asyncopd.rollout import FINISH_REASONS, Trajectory
from backends.toy_engine import ToyRolloutEngine
from backends.toy_teacher import ToyTeacher
from backends.vllm_fsdp.vllm_engine import VLLMConfig, VLLMRolloutEngine, logprobs_mode_for
from backends.vllm_fsdp.vllm_teacher import VLLMTeacher
from fake_vllm import FakeLLMEngine

EOS, V = 19, 20


def tiny_gpt2(seed: int, n_embd: int = 32, n_head: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=n_embd, n_layer=2, n_head=n_head, bos_token_id=17,
                     eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()   # initializer_range 0.2: peaked logits, some EOS


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(2)


@pytest.fixture(scope="module")
def model2():
    return tiny_gpt2(3)


def prompts(n: int, seed: int = 1, max_len: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 16, (int(torch.randint(1, max_len, (1,), generator=g)),), generator=g) for _ in range(n)]


def make_trajs(n: int, M: int = 3, seed: int = 0) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for uid in range(n):
        P, L = (int(torch.randint(1, 12, (1,), generator=g)) for _ in range(2))
        trajs.append(Trajectory.from_tokens(
            uid, torch.randint(0, V, (P,), generator=g), torch.randint(0, V, (L,), generator=g),
            -torch.rand(L, generator=g), torch.zeros(L, dtype=torch.long), "stop",
            sample_ids=torch.randint(0, V, (L, M), generator=g), sample_behav_logp=-torch.rand(L, M, generator=g)))
    return trajs


def full_logits(model, traj) -> torch.Tensor:
    """Logits predicting each response token from one HF forward over prompt + response: [L, V]."""
    with torch.no_grad():
        logits = model(torch.cat([traj.prompt_ids, traj.response_ids])[None]).logits[0]
    P = len(traj.prompt_ids)
    return logits[P - 1:-1]


def vllm_engine(model, **kwargs) -> VLLMRolloutEngine:
    fake_kwargs = {k: kwargs.pop(k) for k in ("max_num_seqs", "logprobs_mode") if k in kwargs}
    return VLLMRolloutEngine(FakeLLMEngine(model, **fake_kwargs), fake_vllm, **kwargs)


# --- teacher ------------------------------------------------------------------------------------------------

def test_teacher_matches_toy_teacher_including_mc_samples_via_alternate_prompts(model):
    trajs = make_trajs(7)
    engine = FakeLLMEngine(model)
    got = VLLMTeacher(engine, fake_vllm, batch_size=3, version=4).score(trajs, topk=4, n_samples=2)
    ref = ToyTeacher(model, batch_size=7, version=4).score(trajs, topk=4, n_samples=2)
    assert len(got) == len(trajs)
    for s, r, t in zip(got, ref, trajs):
        assert s.teacher_version == 4 and s.n_tokens == t.n_tokens
        torch.testing.assert_close(s.sampled_logp, r.sampled_logp, atol=1e-5, rtol=0)
        assert torch.equal(s.topk_ids, r.topk_ids)
        torch.testing.assert_close(s.topk_logp, r.topk_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.tail_mass, r.tail_mass, atol=1e-5, rtol=0)
        assert torch.equal(s.sample_ids, r.sample_ids) and torch.equal(s.sampler_logp, r.sampler_logp)
        torch.testing.assert_close(s.sample_logp, r.sample_logp, atol=1e-5, rtol=0)
    # the MC pass: one request per response position over prompt + response[:j], without prompt log-probs
    # (so vLLM may read the prefix cache), asking for exactly that position's samples
    mc = [(n, p) for _, n, p in engine.history if p.logprob_token_ids is not None]
    assert [n for n, _ in mc] == [len(t.prompt_ids) + j for t in trajs for j in range(t.n_tokens)]
    assert all(p.prompt_logprobs is None and not p.skip_reading_prefix_cache for _, p in mc)
    assert [p.logprob_token_ids for _, p in mc] == [sorted(set(t.sample_ids[j, :2].tolist()))
                                                    for t in trajs for j in range(t.n_tokens)]


def test_teacher_topk_zero_errors_and_mode_check(model):
    trajs = make_trajs(3, seed=1)
    bare = VLLMTeacher(FakeLLMEngine(model), fake_vllm).score(trajs, topk=0, n_samples=0)
    ref = ToyTeacher(model).score(trajs, topk=0, n_samples=0)
    for s, r in zip(bare, ref):
        assert s.topk_ids is None and s.tail_mass is None and s.sample_ids is None
        torch.testing.assert_close(s.sampled_logp, r.sampled_logp, atol=1e-5, rtol=0)
    teacher = VLLMTeacher(FakeLLMEngine(model), fake_vllm)
    with pytest.raises(ValueError, match="capture_samples"):
        teacher.score(make_trajs(1, M=2), topk=2, n_samples=3)
    with pytest.raises(ValueError, match="Trajectory.fake"):
        teacher.score([Trajectory.fake(0, 3, 0)], topk=1, n_samples=0)
    with pytest.raises(ValueError, match="n_samples"):
        teacher.score(trajs, topk=1, n_samples=129)
    with pytest.raises(ValueError, match="logprobs_mode"):
        VLLMTeacher(FakeLLMEngine(model, logprobs_mode="processed_logprobs"), fake_vllm)


# --- rollout engine -----------------------------------------------------------------------------------------

def test_rollout_logp_topk_finish_reasons_and_uid_order(model):
    engine = vllm_engine(model, max_num_seqs=5, max_new_tokens=8, eos_id=EOS, capture_topk=3, seed=7)
    uids = [13, 2, 7, 0, 11, 5, 9, 1, 4, 12, 3, 8, 10, 6]
    ps = prompts(14)
    trajs = engine.generate(ps, uids)
    assert [t.uid for t in trajs] == uids and engine.n_unfinished == 0
    assert engine.engine.steps < sum(t.n_tokens for t in trajs)          # continuous batching: requests overlap
    assert {t.finish_reason for t in trajs} == set(FINISH_REASONS)
    for t, p in zip(trajs, ps):
        assert torch.equal(t.prompt_ids, p) and t.token_versions.tolist() == [0] * t.n_tokens
        logp = torch.log_softmax(full_logits(model, t), -1)
        torch.testing.assert_close(t.behav_logp, logp.gather(1, t.response_ids[:, None]).squeeze(1), atol=1e-5, rtol=0)
        top = logp.topk(3, -1)
        assert torch.equal(t.student_topk_ids, top.indices)
        torch.testing.assert_close(t.student_topk_logp, top.values, atol=1e-5, rtol=0)
        assert EOS not in t.response_ids[:-1].tolist()
        if t.finish_reason == "stop":
            assert t.response_ids[-1] == EOS and t.n_tokens <= 8
        else:
            assert t.n_tokens == 8 and t.response_ids[-1] != EOS


def test_rollout_temperature_needs_processed_logprobs(model):
    assert (logprobs_mode_for(1.0), logprobs_mode_for(0), logprobs_mode_for(0.7)) == \
        ("raw_logprobs", "raw_logprobs", "processed_logprobs")
    with pytest.raises(ValueError, match="logprobs_mode"):
        vllm_engine(model, temperature=0.7)
    vllm_engine(model, temperature=0.7, logprobs_mode="processed_logprobs")   # the values: test_vllm_real.py


def uniform_state(model) -> dict[str, torch.Tensor]:
    """model's weights with a zero (tied) embedding / LM head: every logit is 0, every log-prob −log V."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.wte.weight"].zero_()
    state["lm_head.weight"].zero_()
    return state


def test_in_flight_update_tags_later_tokens_with_the_new_version(model):
    engine = vllm_engine(model, max_num_seqs=4, max_new_tokens=10, capture_topk=2)
    for uid, p in enumerate(prompts(6, seed=3)):
        engine.add(p, uid)
    trajs = [t for _ in range(3) for t in engine.step()]
    engine.load_weights(uniform_state(model), version=1)               # 4 requests are running
    engine.add(torch.tensor([1, 2, 3]), 100)                           # added while the prefix cache is stale
    while engine.n_unfinished:
        trajs += engine.step()
    assert sorted(t.uid for t in trajs) == [0, 1, 2, 3, 4, 5, 100]
    mixed = [t for t in trajs if t.token_versions.unique().tolist() == [0, 1]]
    assert mixed and all(t.behav_version == 0 and t.newest_version == 1 for t in mixed)
    assert [t.behav_version for t in trajs if t.uid in (4, 5, 100)] == [1, 1, 1]   # admitted after the load
    for t in trajs:
        v = t.token_versions
        assert (v.diff() >= 0).all() if t.n_tokens > 1 else True
        new = v == 1
        torch.testing.assert_close(t.behav_logp[new], torch.full((int(new.sum()),), -math.log(V)), atol=1e-6, rtol=0)
        old = torch.log_softmax(full_logits(model, t), -1).gather(1, t.response_ids[:, None]).squeeze(1)
        torch.testing.assert_close(t.behav_logp[~new], old[~new], atol=1e-5, rtol=0)
    skip = {rid: p.skip_reading_prefix_cache for rid, _, p in engine.engine.history}
    assert skip["rollout-100"] and not any(skip[f"rollout-{u}"] for u in range(6))
    engine.add(torch.tensor([4, 5]), 101)                              # idle again: the reset succeeds
    assert not engine.engine.history[-1][2].skip_reading_prefix_cache


# --- the protocol contract the vLLM adapters follow, held against the toy engine and teacher ----------------
# (the real vLLM adapters are held to the same values in test_vllm_real.py)

def test_rollout_engine_contract(model, model2):
    engine = ToyRolloutEngine(model, max_batch=4, max_new_tokens=6, eos_id=EOS, capture_topk=2, seed=3)
    ps, uids = prompts(6, seed=5), [5, 3, 1, 0, 2, 4]
    for version, weights in ((0, model), (5, model2)):
        if version:
            engine.load_weights(model2.state_dict(), version)
        trajs = engine.generate(ps, uids)
        assert [t.uid for t in trajs] == uids
        for t, p in zip(trajs, ps):
            assert torch.equal(t.prompt_ids, p) and 1 <= t.n_tokens <= 6
            assert t.behav_version == version and t.token_versions.tolist() == [version] * t.n_tokens
            assert (t.finish_reason == "stop") == (t.response_ids[-1].item() == EOS)
            logp = torch.log_softmax(full_logits(weights, t), -1)
            torch.testing.assert_close(t.behav_logp, logp.gather(1, t.response_ids[:, None]).squeeze(1),
                                       atol=1e-5, rtol=0)
            assert torch.equal(t.student_topk_ids, logp.topk(2, -1).indices)


def test_teacher_contract(model):
    trajs = make_trajs(5, M=3, seed=2)
    teacher = ToyTeacher(model, batch_size=2, version=2)
    scores = teacher.score(trajs, topk=3, n_samples=2)
    assert len(scores) == len(trajs)
    for s, t in zip(scores, trajs):
        logp = torch.log_softmax(full_logits(model, t), -1)
        assert s.teacher_version == 2 and s.n_tokens == t.n_tokens and (s.k, s.M) == (3, 2)
        torch.testing.assert_close(s.sampled_logp, logp.gather(1, t.response_ids[:, None]).squeeze(1),
                                   atol=1e-5, rtol=0)
        assert torch.equal(s.topk_ids, logp.topk(3, -1).indices) and (s.topk_logp.diff(dim=-1) <= 0).all()
        torch.testing.assert_close(s.tail_mass, 1 - logp.topk(3, -1).values.exp().sum(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(s.sample_logp, logp.gather(1, t.sample_ids[:, :2]), atol=1e-5, rtol=0)
        assert torch.equal(s.sampler_logp, t.sample_behav_logp[:, :2])


# --- import boundary and configuration ----------------------------------------------------------------------

def test_adapter_modules_do_not_import_vllm():
    code = ("import sys, backends.vllm_fsdp.vllm_engine, backends.vllm_fsdp.vllm_teacher; "
            "print('vllm' in sys.modules, 'backends.vllm_fsdp.vllm_teacher' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


@pytest.mark.parametrize("cls", [VLLMRolloutEngine, VLLMTeacher])
def test_from_config_without_vllm_names_the_extra(cls, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)     # `import vllm` fails even where vllm is installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[gpu\]"'):
        cls.from_config(VLLMConfig(model_path=str(tmp_path)))


@pytest.mark.parametrize("field,value", [
    ("model_path", ""), ("dtype", "int8"), ("tensor_parallel_size", 0), ("gpu_memory_utilization", 0.0),
    ("gpu_memory_utilization", 1.5), ("max_model_len", -1), ("max_num_seqs", 0), ("max_logprobs", -1), ("seed", -1),
    ("cpu_kv_cache_gib", 0.0)])
def test_config_validation_names_the_field(field, value):
    kwargs = {"model_path": "/models/student", field: value}
    with pytest.raises(ValueError, match=f"VLLMConfig.{field}"):
        VLLMConfig(**kwargs)
    assert VLLMConfig(model_path="/models/student").trust_remote_code is False

