"""ToyRolloutEngine: parity with the HF model's own forward pass, batching invariance, slot reuse, in-flight
weight updates, truncation, captures, and a smoke run of benchmarks/rollout_speed.py."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from backends.toy_engine import ToyRolloutEngine

EOS, V = 19, 20
ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2(seed: int = 0, scale: float = 1.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=17, eos_token_id=EOS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.02 * scale)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(scale=10.0)  # peaked logits: some EOS, and distributions far from uniform


def prompts(n: int, seed: int = 1, max_len: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 16, (int(torch.randint(1, max_len, (1,), generator=g)),), generator=g) for _ in range(n)]


def model_logp(model, traj) -> torch.Tensor:
    """log π(· | s_t) from one full forward over prompt + response: [L, V]."""
    full = torch.cat([traj.prompt_ids, traj.response_ids])
    with torch.no_grad():
        logits = model(full[None]).logits[0]
    P = len(traj.prompt_ids)
    return torch.log_softmax(logits[P - 1:-1], -1)


def test_logp_matches_model_forward_with_mixed_prompts_and_refills(model):
    engine = ToyRolloutEngine(model, max_batch=5, max_new_tokens=12, eos_id=EOS, seed=7)
    trajs = engine.generate(prompts(14), list(range(14)))
    assert engine.stats.finished == 14 and engine.stats.steps < sum(t.n_tokens for t in trajs)  # slots were refilled
    assert {t.finish_reason for t in trajs} == {"stop", "length"}
    for t in trajs:
        ref = model_logp(model, t).gather(1, t.response_ids[:, None]).squeeze(1)
        torch.testing.assert_close(t.behav_logp, ref, atol=1e-5, rtol=0)
        assert t.token_versions.tolist() == [0] * t.n_tokens and t.behav_version == 0


def test_large_admission_spans_several_prefill_chunks(model):
    ps = prompts(40, seed=8, max_len=40)                       # ~760 prompt tokens: several 256-row attention chunks
    engine = ToyRolloutEngine(model, max_batch=40, max_new_tokens=3, seed=2)
    trajs = engine.generate(ps, list(range(40)))
    assert engine.stats.prefill_tokens > 2 * 256
    for t in trajs:
        ref = model_logp(model, t).gather(1, t.response_ids[:, None]).squeeze(1)
        torch.testing.assert_close(t.behav_logp, ref, atol=1e-5, rtol=0)


def test_continuous_batching_equals_one_at_a_time(model):
    ps, uids = prompts(12, seed=2), [5, 3, 11, 0, 7, 1, 2, 9, 4, 6, 8, 10]  # results come back in uids order
    batched = ToyRolloutEngine(model, max_batch=8, max_new_tokens=16, eos_id=EOS, seed=3).generate(ps, uids)
    single = ToyRolloutEngine(model, max_batch=1, max_new_tokens=16, eos_id=EOS, seed=3).generate(ps, uids)
    assert [t.uid for t in batched] == uids
    for a, b in zip(batched, single):
        assert torch.equal(a.response_ids, b.response_ids)
        torch.testing.assert_close(a.behav_logp, b.behav_logp, atol=1e-5, rtol=0)
    other_seed = ToyRolloutEngine(model, max_batch=4, max_new_tokens=16, eos_id=EOS, seed=4).generate(ps, uids)
    assert any(not torch.equal(a.response_ids, c.response_ids) for a, c in zip(batched, other_seed))


def test_greedy_equals_full_recompute_loop(model):
    ps = prompts(6, seed=3)
    engine = ToyRolloutEngine(model, max_batch=4, max_new_tokens=10, temperature=0, eos_id=EOS)
    trajs = engine.generate(ps, list(range(6)))
    for p, t in zip(ps, trajs):
        seq = p.clone()
        with torch.no_grad():
            for _ in range(10):
                y = model(seq[None]).logits[0, -1].argmax()
                seq = torch.cat([seq, y[None]])
                if y == EOS:
                    break
        assert torch.equal(t.response_ids, seq[len(p):])
        ref = model_logp(model, t).gather(1, t.response_ids[:, None]).squeeze(1)  # T = 0 records the T = 1 log-prob
        torch.testing.assert_close(t.behav_logp, ref, atol=1e-5, rtol=0)


def test_refilled_slot_does_not_leak_state(model):
    long_p, short_p = torch.randint(0, 16, (20,)), torch.tensor([3, 1, 4])
    reused = ToyRolloutEngine(model, max_batch=1, max_new_tokens=30, seed=5)
    reused.add(long_p, uid=100)                     # fills slot 0's cache up to position 49
    reused.add(short_p, uid=1, max_new_tokens=8)    # then reuses slot 0 with a 3-token prompt
    out = []
    while reused.n_waiting or reused.n_running:
        out += reused.step()
    assert [t.uid for t in out] == [100, 1]
    fresh = ToyRolloutEngine(model, max_batch=1, max_new_tokens=8, seed=5).generate([short_p], [1])[0]
    assert torch.equal(out[1].response_ids, fresh.response_ids)
    torch.testing.assert_close(out[1].behav_logp, fresh.behav_logp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kv_on_update", ["keep", "recompute"])
def test_load_weights_mid_generation(model, kv_on_update):
    """Tokens sampled after the update carry the new version. "recompute": they are exact samples of the new
    model given the prefix. "keep": the prefix fed before the update keeps the old model's K/V, so the reference
    is the old model's KV cache for those positions continued by the new model."""
    new = tiny_gpt2(seed=1, scale=10.0)
    engine = ToyRolloutEngine(model, max_batch=2, max_new_tokens=10, seed=1, kv_on_update=kv_on_update)
    for uid, p in enumerate(prompts(2, seed=4)):
        engine.add(p, uid)
    n_before = 4
    for _ in range(n_before):
        assert engine.step() == []
    engine.load_weights(new.state_dict(), version=1)
    trajs = []
    while engine.n_running:
        trajs += engine.step()
    for t in trajs:
        assert t.token_versions.tolist() == [0] * n_before + [1] * (10 - n_before) and t.behav_version == 0
        old_ref = model_logp(model, t).gather(1, t.response_ids[:, None]).squeeze(1)
        torch.testing.assert_close(t.behav_logp[:n_before], old_ref[:n_before], atol=1e-5, rtol=0)
        if kv_on_update == "recompute":
            ref = model_logp(new, t)[n_before:]
        else:
            full, P = torch.cat([t.prompt_ids, t.response_ids]), len(t.prompt_ids)
            cut = P + n_before - 1                      # tokens fed through the model before the update
            with torch.no_grad():
                past = model(full[None, :cut], use_cache=True).past_key_values
                ref = torch.log_softmax(new(full[None, cut:-1], past_key_values=past).logits[0], -1)
        got = ref.gather(1, t.response_ids[n_before:, None]).squeeze(1)
        torch.testing.assert_close(t.behav_logp[n_before:], got, atol=1e-5, rtol=0)
        assert not torch.allclose(t.behav_logp[n_before:], old_ref[n_before:])  # the update really changed π_β


def test_max_new_tokens_truncation_and_stop(model):
    engine = ToyRolloutEngine(model, max_batch=4, max_new_tokens=5, eos_id=EOS, seed=1)
    trajs = engine.generate(prompts(16), list(range(16)))
    for t in trajs:
        eos_at = (t.response_ids == EOS).nonzero().flatten().tolist()
        if t.finish_reason == "stop":
            assert eos_at == [t.n_tokens - 1]
        else:
            assert t.n_tokens == 5 and eos_at == []
    assert {t.finish_reason for t in trajs} == {"stop", "length"}
    engine = ToyRolloutEngine(model, max_batch=4, max_new_tokens=5)
    with pytest.raises(ValueError, match="max_len"):
        engine.add(torch.zeros(60, dtype=torch.long), uid=0)
    engine.add(torch.tensor([1]), uid=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="already"):
        engine.add(torch.tensor([1]), uid=0)
    assert engine.step() == [] and engine.step()[0].n_tokens == 2


def test_captured_topk_and_samples_match_the_distribution(model):
    engine = ToyRolloutEngine(model, max_batch=3, max_new_tokens=6, temperature=1.5, eos_id=EOS,
                              capture_topk=4, capture_samples=3, seed=9)
    for t in engine.generate(prompts(5, seed=6), list(range(5))):
        logp = torch.log_softmax(torch.log_softmax(model_logp(model, t), -1) / 1.5, -1)  # tempered π_β
        assert t.student_topk_ids.shape == (t.n_tokens, 4) and t.sample_ids.shape == (t.n_tokens, 3)
        top = logp.topk(4, -1)
        assert torch.equal(t.student_topk_ids, top.indices)
        torch.testing.assert_close(t.student_topk_logp, top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(t.sample_behav_logp, logp.gather(1, t.sample_ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(t.behav_logp, logp.gather(1, t.response_ids[:, None]).squeeze(1), atol=1e-5, rtol=0)


def test_hash_gumbel_sampler_draws_from_the_distribution(model):
    """4096 extra samples at one position: empirical frequencies within 4σ of π_β."""
    engine = ToyRolloutEngine(model, max_batch=1, max_new_tokens=1, capture_samples=4096, seed=0)
    t = engine.generate([torch.tensor([1, 2, 3])], [0])[0]
    p = model_logp(model, t)[0].exp()
    freq = torch.bincount(t.sample_ids[0], minlength=V) / 4096
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / 4096).sqrt() + 1e-3).all()


def test_stats_count_slot_utilisation(model):
    engine = ToyRolloutEngine(model, max_batch=4, max_new_tokens=8)
    trajs = engine.generate(prompts(9), list(range(9)))
    s = engine.stats
    assert s.tokens == sum(t.n_tokens for t in trajs) == 72 and s.slot_steps == 4 * s.steps
    assert s.steps == 24 and s.slot_utilisation == 72 / 96  # 9 equal requests in 4 slots: 3 waves of 8 steps


def test_rollout_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.csv"
    args = ["--repeats", "1", "--n-requests", "6", "--models", "student", "--max-batch", "4", "--threads", "1"]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout_speed.py"), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "toy/hf_dynamic" in res.stdout
    table = pd.read_csv(out)
    timed = table[table.repeat == 0]
    assert set(timed.impl) >= {"toy_engine", "hf_dynamic", "hf_static"}
    assert (timed.tokens == timed.tokens.iloc[0]).all()           # every impl generated the same 6 lengths


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_forward(model):
    engine = ToyRolloutEngine(model, max_batch=4, max_new_tokens=10, eos_id=EOS, device="cuda")
    trajs = engine.generate(prompts(9), list(range(9)))
    for t in trajs:
        ref = model_logp(model, t).gather(1, t.response_ids[:, None]).squeeze(1)
        torch.testing.assert_close(t.behav_logp, ref, atol=1e-4, rtol=0)
