"""sim.specs: parameter counts against the models' published figures, the roofline on a hand-computed case,
HF config.json parsing, feasibility errors, and the planner deriving its costs from specs alone."""

import json
from dataclasses import replace

import pytest

from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from sim.planner import PlanConfig, enumerate_splits, learner_costs
from sim.specs import (GPU, GPUS, MODELS, Assumptions, Model, Specs, costs_for, costs_from_specs, derivation,
                       learner_state_fits, load_model)

ONES = Assumptions(mem_eff=1, mfu_decode=1, mfu_prefill=1, mfu_train=1, decode_overhead_s=0, bytes_per_param=2,
                   optimizer_bytes=32, kv_mem_fraction=1, max_num_seqs=1000, teacher_max_batch=3,
                   learner_fixed_s=0, reload_fixed_s=0)


@pytest.mark.parametrize("name, total, active", [
    ("qwen3-1.7b", 1.72e9, 1.72e9), ("qwen3-8b", 8.19e9, 7.57e9), ("qwen3-30b-a3b", 30.5e9, 3.04e9),
    ("qwen3-235b-a22b", 235.1e9, 21.6e9), ("llama-3.1-8b", 8.03e9, 7.50e9), ("llama-3.1-70b", 70.55e9, 69.5e9)])
def test_parameter_counts_match_the_published_sizes(name, total, active):
    # published: Qwen3 1.7B (1.7B), 8B (8.2B), 30B-A3B (30.5B, 3.3B activated incl. the 0.3B input embedding),
    # 235B-A22B (235B, 22B activated), Llama 3.1 8B (8.03B) and 70B (70.6B)
    m = MODELS[name]
    assert m.params == pytest.approx(total, rel=0.005) and m.compute_params == pytest.approx(active, rel=0.005)


@pytest.fixture
def toy(monkeypatch):
    """A GPU and two models small enough to compute every cost by hand."""
    monkeypatch.setitem(GPUS, "toy-gpu", GPU(flops=1e3, hbm_bytes_s=100.0, hbm_bytes=1e4, link_bytes_s=50.0,
                                             network_bytes_s=10.0, gpus_per_node=8))
    # student: attention 4·4·(2+2) = 64, MLP 3·4·8 = 96, tied embedding 8·4 = 32: 192 parameters, all compute
    monkeypatch.setitem(MODELS, "toy-s", Model(1, 4, 1, 1, 4, 8, 8, tied_embeddings=True))
    # teacher: 2 layers of (64 + 3·4·16 = 256), embedding and head 2·32: 576 parameters, 544 compute
    monkeypatch.setitem(MODELS, "toy-t", Model(2, 4, 1, 1, 4, 8, 16))
    return Specs("toy-gpu", "toy-s", "toy-t", ONES)


def test_roofline_hand_computed(toy):
    cluster = ClusterShape(rollout_replicas=2, teacher_replicas=1, gpus_per_teacher_replica=2, learner_gpus=2)
    w = Workload(batch_size=4, prompt_len=4, length=LengthDist("fixed", 8, max=8))
    c = costs_from_specs(toy, cluster, w)
    assert MODELS["toy-s"].params == 192 and MODELS["toy-t"].params == 576 and MODELS["toy-t"].compute_params == 544
    # κ = 2·1·1·4·2 = 16 bytes/token, a = 2·1·1·4 = 8 (student), 16 (teacher)
    assert c.decode_step_s == pytest.approx(384 / 100)                          # 192·2 bytes / 100 B/s
    assert c.decode_step_s_per_seq == pytest.approx(16 * (4 + 4) / 100 + 2 * 192 / 1e3)
    assert c.prefill_s_per_token == pytest.approx((2 * 192 + 8 * 4) / 1e3)
    assert c.max_batch == int((1e4 - 384) // (16 * 12))                         # 50 sequences of P + ℓ = 12
    assert c.teacher_s_per_token == pytest.approx((2 * 544 + 16 * 12) / (2 * 1e3))
    assert c.teacher_max_batch == 3 and c.teacher_call_s == 0 and c.teacher_s_per_seq == 0
    assert c.learner_s_per_token == pytest.approx((6 * 192 + 3 * 8 * 12) * 12 / 8 / (2 * 1e3))
    ring = 2 * 384 * (1 / 2) / 50                                               # 5 GPUs ≤ 8: NVLink
    assert c.learner_step_s == pytest.approx(32 * 192 / (2 * 100) + ring)
    assert c.publish_s == pytest.approx(384 / 50) and c.weight_sync_s == pytest.approx(384 / 50 + 384 / 100)
    big = ClusterShape(rollout_replicas=7, teacher_replicas=1, gpus_per_teacher_replica=2, learner_gpus=2)
    assert costs_from_specs(toy, big, w).publish_s == pytest.approx(384 / 10)    # 11 GPUs: over the network
    table = derivation(toy, cluster, w)
    assert list(table.cost) == list(c.__dataclass_fields__) and (table.derived.to_numpy() > -1).all()


def test_assumptions_scale_the_costs(toy):
    cluster, w = ClusterShape(), Workload(batch_size=4, prompt_len=4, length=LengthDist("fixed", 8, max=8))
    base = costs_from_specs(toy, cluster, w)
    half = costs_from_specs(Specs("toy-gpu", "toy-s", "toy-t", Assumptions(**{**ONES.__dict__, "mfu_train": 0.5})),
                            cluster, w)
    assert half.learner_s_per_token == pytest.approx(2 * base.learner_s_per_token)
    assert half.prefill_s_per_token == base.prefill_s_per_token


def test_hf_config_json_gives_the_preset(tmp_path):
    cfg = {"num_hidden_layers": 48, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
           "head_dim": 128, "vocab_size": 151936, "intermediate_size": 6144, "num_experts": 128,
           "num_experts_per_tok": 8, "moe_intermediate_size": 768, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))                    # Qwen3-30B-A3B's fields
    assert load_model(str(tmp_path)) == MODELS["qwen3-30b-a3b"]
    assert load_model(str(tmp_path / "config.json")) == MODELS["qwen3-30b-a3b"]
    with pytest.raises(ValueError, match="neither a preset"):
        load_model(str(tmp_path / "missing.json"))


def test_what_does_not_fit_is_refused():
    w = Workload(batch_size=64, prompt_len=256, length=LengthDist("fixed", 1024, max=1024))
    with pytest.raises(ValueError, match="gpus_per_teacher_replica=1"):   # 141 GB of 70B weights on one A100
        costs_from_specs(Specs("a100-80gb", "llama-3.1-8b", "llama-3.1-70b"), ClusterShape(), w)
    specs = Specs("a100-80gb", "llama-3.1-8b", "llama-3.1-70b")                # 16 B/param: 128.5 GB of state
    assert not learner_state_fits(specs, 2) and learner_state_fits(specs, 4)      # 0.8 · 2 · 80 GB = 128 GB
    with pytest.raises(ValueError, match="specs.gpu must be one of"):
        Specs("tpu-v5", "qwen3-8b", "qwen3-8b")
    with pytest.raises(ValueError, match="specs.student and specs.teacher"):
        Specs("h100-sxm")
    with pytest.raises(ValueError, match="mfu_train"):
        Assumptions(mfu_train=0)


def test_planner_derives_costs_per_learner_size():
    specs = Specs("a100-80gb", "llama-3.1-8b", "llama-3.1-70b")
    cfg = PlanConfig(cluster=ClusterShape(1, 1, gpus_per_teacher_replica=4, learner_gpus=4), specs=specs, gpus=32,
                     workload=Workload(batch_size=64, prompt_len=256, length=LengthDist("fixed", 1024, max=1024)),
                     learner_gpus=[2, 4, 8])
    assert learner_costs(cfg, 4) == costs_from_specs(specs, cfg.cluster, cfg.workload)   # derived, not defaults
    at4, at8 = learner_costs(cfg, 4), learner_costs(cfg, 8)
    assert at8.learner_s_per_token == pytest.approx(at4.learner_s_per_token / 2)  # FLOPs spread over 2x the GPUs
    w, params = 2 * MODELS["llama-3.1-8b"].params, MODELS["llama-3.1-8b"].params   # bf16 bytes; > 8 GPUs: network
    opt = {L: 32 * params / (L * 2.039e12 * 0.7) for L in (4, 8)}                # AdamW shrinks with L ...
    ring = {L: 2 * w * (L - 1) / L / 25e9 for L in (4, 8)}                       # ... the ring all-reduce grows
    assert at8.learner_step_s - at4.learner_step_s == pytest.approx(opt[8] - opt[4] + ring[8] - ring[4])
    assert {L for _, _, L in enumerate_splits(cfg)} == {4, 8}                    # 2 A100s cannot hold 8B's state


def test_costs_typed_by_hand_override_the_derived_ones():
    specs, cluster = Specs("h100-sxm", "qwen3-8b", "qwen3-235b-a22b"), ClusterShape(gpus_per_teacher_replica=8)
    w = Workload(batch_size=64, prompt_len=256, length=LengthDist("fixed", 1024, max=1024))
    derived = costs_from_specs(specs, cluster, w)
    got = costs_for(specs, cluster, w, CostModel(max_batch=8, weight_sync_s=3.0))
    assert got == replace(derived, max_batch=8, weight_sync_s=3.0)
    assert costs_for(Specs(), cluster, w, CostModel(max_batch=8)) == CostModel(max_batch=8)   # no specs: typed
