"""backends/toy_models.py: model construction, SFT determinism, the cache, the reference greedy decoder."""

import logging

import pytest
import torch

from backends import toy_models
from backends.toy_models import (STUDENT_SPEC, TEACHER_SPEC, TINY_SFT, TINY_SPEC, TINY_TASK, ModelSpec,
                                 build_model, greedy_accuracy, greedy_decode, load_or_train_teacher,
                                 load_or_warmup_student, n_params, response_nll, sequence_batch, sft)
from backends.toy_task import SortTask


@pytest.fixture(scope="module")
def tiny_trained():
    """A tiny model after TINY_SFT: right on some prompts, wrong (and of varied lengths) on others."""
    model = build_model(TINY_SPEC, TINY_TASK, seed=0)
    sft(model, TINY_TASK, seed=0, **TINY_SFT)
    return model


def test_build_model_config_and_param_counts():
    task = SortTask()
    teacher, student = build_model(TEACHER_SPEC, task, 0), build_model(STUDENT_SPEC, task, 0)
    for m in (teacher, student):
        c = m.config
        assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)
        assert all(mod.p == 0.0 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))
        assert (c.vocab_size, c.bos_token_id, c.eos_token_id, c.pad_token_id) == (20, 17, 19, 16)
        assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()   # tied, counted once
    # per block 12·d² weights + 13·d biases and layer norms; embeddings (vocab + positions)·d; final norm 2·d
    def expected(spec, V):
        d = spec.n_embd
        return spec.n_layer * (12 * d * d + 13 * d) + (V + spec.n_positions) * d + 2 * d
    assert n_params(teacher) == expected(TEACHER_SPEC, 20) == 804_096
    assert n_params(student) == expected(STUDENT_SPEC, 20) == 105_472
    assert n_params(build_model(TINY_SPEC, TINY_TASK, 0)) == expected(TINY_SPEC, 8) == 15_072


def test_build_model_seeded_and_leaves_global_rng_alone():
    task = SortTask()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(STUDENT_SPEC, task, seed=1)
    assert torch.equal(torch.rand(3), expected)
    b, c = build_model(STUDENT_SPEC, task, seed=1), build_model(STUDENT_SPEC, task, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.h.0.attn.c_attn.weight"], sc["transformer.h.0.attn.c_attn.weight"])


def test_train_mode_is_deterministic_without_dropout():
    task = SortTask()
    model = build_model(STUDENT_SPEC, task, 0).train()
    ids, attn, _ = sequence_batch(task, task.make_prompts(4, seed=0))
    assert torch.equal(model(input_ids=ids, attention_mask=attn).logits,
                       model(input_ids=ids, attention_mask=attn).logits)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_layer=0), "n_layer"), (dict(n_embd=0), "n_embd"), (dict(n_embd=30, n_head=4), "n_head"),
])
def test_model_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelSpec.{field}"):
        ModelSpec(**kwargs)


def test_build_model_rejects_short_context():
    with pytest.raises(ValueError, match="n_positions"):
        build_model(ModelSpec(n_positions=50), SortTask(), 0)     # needs 2*24 + 3 = 51


def test_sequence_batch_masks_the_response():
    task = SortTask()
    prompts = [torch.tensor([17, 3, 1, 18]), torch.tensor([17, 2, 18])]
    ids, attn, resp = sequence_batch(task, prompts)
    assert ids.tolist() == [[17, 3, 1, 18, 1, 3, 19], [17, 2, 18, 2, 19, 16, 16]]
    assert attn.tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    assert resp.int().tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]


def test_sft_lowers_loss_and_is_bit_identical():
    held = sequence_batch(TINY_TASK, TINY_TASK.make_prompts(256, seed=99))
    n_resp = int(held[2][:, 1:].sum())
    runs = []
    for _ in range(2):
        model = build_model(TINY_SPEC, TINY_TASK, seed=0)
        with torch.no_grad():
            before = float(response_nll(model, *held)) / n_resp
        losses = sft(model, TINY_TASK, seed=0, **TINY_SFT)
        with torch.no_grad():
            after = float(response_nll(model, *held)) / n_resp
        runs.append((before, after, losses, model.state_dict()))
    (before, after, losses, sd), (_, after2, losses2, sd2) = runs
    assert before > 1.9 and after < 0.7 * before       # ln(8) = 2.08 at init
    assert losses[-1] < 0.7 * losses[0]
    assert losses == losses2 and after == after2
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_greedy_decode_padding_sides_match_one_at_a_time(tiny_trained):
    prompts = TINY_TASK.make_prompts(48, seed=5)
    single = [greedy_decode(tiny_trained, TINY_TASK, [p])[0] for p in prompts]
    left = greedy_decode(tiny_trained, TINY_TASK, prompts, batch_size=16, padding_side="left")
    right = greedy_decode(tiny_trained, TINY_TASK, prompts, batch_size=16, padding_side="right")
    assert len({len(p) for p in prompts}) >= 3 and len({len(r) for r in single}) >= 3   # mixed lengths
    for s, l, r in zip(single, left, right):
        assert torch.equal(s, l) and torch.equal(s, r)
    eos, cap = TINY_TASK.eos_id, TINY_TASK.max_response_len
    for r in single:                    # ends at its first EOS, or is truncated at the cap without one
        n_eos = int((r == eos).sum())
        assert (n_eos == 1 and r[-1] == eos) or (n_eos == 0 and len(r) == cap)
    ok = [TINY_TASK.verify(p, r) for p, r in zip(prompts, single)]
    assert 0 < sum(ok) < len(ok)
    assert greedy_accuracy(tiny_trained, TINY_TASK, prompts, batch_size=7) == sum(ok) / len(ok)


def test_greedy_decode_matches_hf_generate(tiny_trained):
    for p in TINY_TASK.make_prompts(6, seed=6):
        ours = greedy_decode(tiny_trained, TINY_TASK, [p], max_new_tokens=3)[0]
        hf = tiny_trained.generate(p[None], attention_mask=torch.ones_like(p[None]), do_sample=False,
                                   max_new_tokens=3, eos_token_id=TINY_TASK.eos_id,
                                   pad_token_id=TINY_TASK.pad_id)[0, len(p):]
        hf = hf[:int((hf == TINY_TASK.eos_id).nonzero()[0]) + 1] if (hf == TINY_TASK.eos_id).any() else hf
        assert torch.equal(ours, hf)


def test_cache_round_trip(tmp_path, monkeypatch):
    kwargs = dict(task=TINY_TASK, spec=TINY_SPEC, seed=0, cache_dir=tmp_path, n_eval=64, **TINY_SFT)
    first, info = load_or_train_teacher(**kwargs)
    assert info["cached"] is False and 0 <= info["accuracy"] <= 1 and info["train_s"] > 0
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]   # no temp files left

    monkeypatch.setattr(toy_models, "sft", lambda *a, **k: pytest.fail("a cached model was retrained"))
    second, info2 = load_or_train_teacher(**kwargs)
    assert info2["cached"] is True and info2["accuracy"] == info["accuracy"]
    sd, sd2 = first.state_dict(), second.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)

    # the student is its own entry
    monkeypatch.undo()
    _, info3 = load_or_warmup_student(**kwargs)
    assert info3["cached"] is False and info3["key"] != info["key"]


def test_cache_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCOPD_CACHE", str(tmp_path / "env"))
    assert toy_models.cache_root() == tmp_path / "env"
    assert toy_models.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_truncated_cache_file_is_retrained(tmp_path, caplog):
    kwargs = dict(task=TINY_TASK, spec=TINY_SPEC, seed=0, cache_dir=tmp_path, n_eval=64, **TINY_SFT)
    first, info = load_or_train_teacher(**kwargs)
    weights = tmp_path / f"teacher-{info['key']}.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="backends.toy_models"):
        again, info2 = load_or_train_teacher(**kwargs)
    assert "unreadable" in caplog.text and "retraining" in caplog.text
    assert info2["cached"] is False
    assert weights.read_bytes() == data                         # deterministic retrain rewrote the same file
    sd, sd2 = first.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_sft_horizon_stops_a_longer_schedule_partway():
    """steps=k of a horizon-2k schedule is the first k steps of the 2k-step run: the same losses bit for bit
    (same data, same lr per step), and a different model from the k-step run annealed over its own k steps."""
    k = TINY_SFT["steps"] // 2
    kw = {**TINY_SFT, "steps": k}
    partial, annealed, full = (build_model(TINY_SPEC, TINY_TASK, seed=0) for _ in range(3))
    losses_partial = sft(partial, TINY_TASK, seed=0, horizon=2 * k, **kw)
    losses_full = sft(full, TINY_TASK, seed=0, **{**kw, "steps": 2 * k})
    losses_annealed = sft(annealed, TINY_TASK, seed=0, **kw)
    assert losses_partial == losses_full[:k] and losses_annealed != losses_partial
    assert sft(build_model(TINY_SPEC, TINY_TASK, seed=0), TINY_TASK, seed=0, horizon=k, **kw) == losses_annealed
    with pytest.raises(ValueError, match="horizon=3 must be 0 or >= steps"):
        sft(annealed, TINY_TASK, seed=0, horizon=3, **kw)


def test_cache_key_of_a_partway_student():
    kw = dict(steps=800, seed=0, lr=3e-3, batch_size=128)
    key = toy_models.cache_key("student", TINY_TASK, TINY_SPEC, **kw)
    assert toy_models.cache_key("student", TINY_TASK, TINY_SPEC, horizon=0, **kw) == key     # annealed entries keep
    assert toy_models.cache_key("student", TINY_TASK, TINY_SPEC, horizon=800, **kw) == key   # their old keys
    assert toy_models.cache_key("student", TINY_TASK, TINY_SPEC, horizon=1500, **kw) != key
