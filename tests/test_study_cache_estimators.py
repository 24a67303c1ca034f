"""studies.cache_estimators: the smoke run end to end (CLI), exact gradient identities on hand-built distributions,
the error statistics, the byte arithmetic, and config validation."""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from studies import cache_estimators as ce
from studies import cache_estimators_grads as grads
from studies.cache_estimators_grads import Layout, Positions, SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "studies" / "cache_estimators"


def composed(*overrides: str) -> ce.Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("cache_estimators", overrides=["cells_dir=unused", *overrides]))


def positions(stale: bool, N=3, V=4, seed=0) -> Positions:
    """Hand-built small distributions; stale: the behaviour logits differ from the student's."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(N, V, generator=g), 2 * torch.randn(N, V, generator=g)
    behav = student + torch.randn(N, V, generator=g) if stale else student.clone()
    return Positions(student, teacher, behav, behav.topk(V, -1).indices)


def expectation(layout: Layout, pos: Positions, M: int) -> torch.Tensor:
    """E over draws y_1..y_M ~ π_β (independent per row) of the layout's gradient, by enumerating all V^M tuples."""
    N, V = pos.student_logits.shape
    beta = pos.behav_logp.double().exp()                                     # [N, V]
    total = torch.zeros(N, V, dtype=torch.float64)
    for ys in itertools.product(range(V), repeat=M):
        draws = torch.tensor(ys).expand(N, M).contiguous()
        prob = torch.stack([beta[:, y] for y in ys]).prod(0)                 # [N]
        total += prob[:, None] * grads.layout_gradient(layout, pos, draws).double()
    return total


# --- exact identities ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", grads.DIRECTIONS)
def test_top_k_at_full_vocabulary_is_the_exact_gradient(direction):
    pos = positions(stale=True)
    exact = grads.exact_gradient(direction, pos)
    for family, tail in [("teacher top-k", t) for t in ("bucket", "renorm", "none")] + [("student top-k", "bucket")]:
        got = grads.layout_gradient(Layout(direction, family, tail, k=4), pos, None)
        torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-5)
    one = grads.layout_gradient(Layout(direction, "teacher top-k", "bucket", k=1), pos, None)
    assert (one - exact).norm() > 0.05 * exact.norm()                        # k = 1 < V truncates


def test_importance_weighted_one_draw_layouts_are_unbiased_under_staleness_and_the_others_are_not():
    pos = positions(stale=True)
    g_f, g_r = grads.exact_gradient("forward", pos), grads.exact_gradient("reverse", pos)
    unbiased = ((Layout("forward", "sampled", "is"), g_f), (Layout("reverse", "sampled", "recompute+is"), g_r),
                (Layout("reverse", "mc", "is", M=1, sampler_logp=True), g_r))
    for layout, exact in unbiased:
        torch.testing.assert_close(expectation(layout, pos, 1), exact.double(), atol=1e-6, rtol=1e-5)
    for variant in ("recompute", "stale"):                                   # samples from π_β, no ratio
        assert (expectation(Layout("reverse", "sampled", variant), pos, 1) - g_r).norm() > 0.05 * g_r.norm()


def test_fresh_mc_expectations_loo_exact_and_snis_shrunk_by_one_over_m():
    pos = positions(stale=False)
    g = grads.exact_gradient("reverse", pos).double()
    torch.testing.assert_close(expectation(Layout("reverse", "mc", "loo", M=2), pos, 2), g, atol=1e-6, rtol=1e-5)
    snis = expectation(Layout("reverse", "mc", "snis", M=2, sampler_logp=True), pos, 2)
    torch.testing.assert_close(snis, (1 - 1 / 2) * g, atol=1e-6, rtol=1e-4)


def test_forward_kl_is_gradient_on_a_hand_built_row():
    z = torch.zeros(1, 2, requires_grad=True)                                # π_θ = (0.5, 0.5)
    out = grads.forward_kl_is(z, torch.tensor([[0]]), torch.tensor([[math.log(0.8)]]), torch.tensor([[math.log(0.5)]]),
                              torch.ones(1, dtype=torch.bool))
    (grad,) = torch.autograd.grad(out.loss, z)                               # π_θ − w e_y, w = 0.8 / 0.5
    torch.testing.assert_close(grad, torch.tensor([[0.5 - 1.6, 0.5]]))
    assert out.metrics["kl"] == pytest.approx(1.6 * (math.log(0.8) - math.log(0.5)))


# --- statistics and wiring -------------------------------------------------------------------------------------

def test_error_stats_exact_values():
    two = grads.error_stats([torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])], torch.tensor([1.0, 0.0]))
    # mean (2, 0); ‖mean − g‖² = 1 equals tr Σ̂ / R = 2 / 2, so the debiased bias is 0 and its floor 1
    assert two == pytest.approx({"bias_rel": 0.0, "bias_floor_rel": 1.0, "cos_mean": 1.0, "cos_draw": 1.0,
                                 "std_rel": math.sqrt(2), "rmse_rel": math.sqrt(2), "n_draws": 2})
    one = grads.error_stats([torch.tensor([0.0, 2.0])], torch.tensor([2.0, 0.0]))
    assert one == pytest.approx({"bias_rel": math.sqrt(2), "bias_floor_rel": 0.0, "cos_mean": 0.0, "cos_draw": 0.0,
                                 "std_rel": 0.0, "rmse_rel": math.sqrt(2), "n_draws": 1})
    with pytest.raises(ValueError, match="at least one"):
        grads.error_stats([], torch.ones(2))


def test_layouts_cap_k_at_the_vocabulary_and_take_bytes_from_the_cache_module():
    lays = grads.layouts([1, 4, 16, 64], [1, 4], ["bucket", "none"], vocab_size=20)
    top = [lay for lay in lays if (lay.direction, lay.family, lay.variant) == ("forward", "teacher top-k", "none")]
    assert [(lay.k, lay.k_requested) for lay in top] == [(1, 1), (4, 4), (16, 16), (20, 64)]
    by_name = {(lay.direction, lay.name): lay.bytes_per_token for lay in lays}
    assert by_name[("forward", "teacher top-4 / bucket")] == 4 + 8 * 4 + 4
    assert by_name[("reverse", "sampled / stale")] == 4
    assert by_name[("reverse", "mc-4 / loo")] == 4 + 8 * 4 and by_name[("reverse", "mc-4 / snis")] == 4 + 12 * 4
    assert by_name[("forward", "mc-1 / is")] == 16 and ("reverse", "mc-1 / is") in by_name
    assert len(lays) == 2 * (4 * 2 + 4) + (1 + 2) + (4 + 2 * 2)


def test_compare_fresh_every_one_draw_reverse_layout_gives_the_same_numbers():
    pos = positions(stale=False, N=5, V=6)
    lays = grads.layouts([2], [1, 2], ["bucket"], 6)
    rows = pd.DataFrame(grads.compare(pos, lays, n_draws=5, seed=3))
    one = rows[(rows.direction == "reverse") & ((rows.family == "sampled") | (rows.M == 1))]
    assert len(one) == 6 and one.rmse_rel.iloc[0] > 0
    for col in ("rmse_rel", "std_rel", "cos_draw", "cos_mean"):                # same draws, same maths: to rounding
        assert one[col].max() - one[col].min() < 1e-5 * max(1.0, abs(one[col].iloc[0]))
    det = rows[rows.family.str.contains("top-k")]
    assert (det.n_draws == 1).all() and (det.std_rel == 0).all()
    assert (rows.n_draws[~rows.index.isin(det.index)] == 5).all()


def test_synthetic_staleness_moves_only_the_behaviour_student():
    cfg = SyntheticConfig(vocab=512, positions=8, stale_shift=[0.0, 0.5])
    fresh, stale = (grads.synthetic_positions(cfg, lam, k_max=16, seed=1) for lam in cfg.stale_shift)
    assert torch.equal(fresh.behav_logits, fresh.student_logits) and fresh.behav_topk_ids.shape == (8, 16)
    assert torch.equal(fresh.student_logits, stale.student_logits)
    assert torch.equal(fresh.teacher_logits, stale.teacher_logits)
    torch.testing.assert_close(stale.behav_logits, 1.5 * stale.student_logits - 0.5 * stale.teacher_logits)
    assert grads.describe(fresh)["drift_kl"] == pytest.approx(0, abs=1e-6)
    assert grads.describe(stale)["drift_kl"] > 0.01
    with pytest.raises(ValueError, match="stale_shift"):
        SyntheticConfig(stale_shift=[0.0, 1.5])


def test_pareto_keeps_the_non_dominated_layouts():
    df = pd.DataFrame({"layout": list("abcde"), "bytes_per_token": [4, 16, 16, 40, 136],
                       "rmse_rel": [2.0, 0.5, 0.7, 0.9, 0.1]})
    assert ce.pareto(df).layout.tolist() == ["a", "b", "e"]


def test_network_table_bytes_at_a_real_vocabulary():
    cfg = composed("ks=[1,64]", "ms=[4]", "real_response_len=1000", "real_batch=10", "link_gbit_s=8")
    net = ce.network(cfg).set_index("layout")
    assert net.bytes_per_token.to_dict() == {"sampled": 4, "top-1": 16, "top-64": 520, "mc-4": 36,
                                             "mc-4 + sampler logp": 52, "full logits (bf16)": 2 * 151936}
    assert net.loc["top-64"].gb_per_batch == pytest.approx(520 * 1e4 / 1e9)
    assert net.loc["sampled"].seconds_per_batch == pytest.approx(4 * 1e4 * 8 / 8e9)


# --- config --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ("ks=[0,4]", "ks"), ("tails=[bucket,tail]", "tails"), ("draws=1", "draws"),
    ("train_layouts=[nope]", "train_layouts"), ("toy_staleness=[]", "toy_staleness"),
    ("drift_estimator=nope", "drift_estimator"), ("toy.temperature=0.5", "temperature"),
    ("synthetic.vocab=1", "vocab"), ("toy.lr=0", "lr"), ("link_gbit_s=0", "link_gbit_s"),
])
def test_invalid_settings_rejected_naming_field(override, field):
    with pytest.raises(Exception, match=field):
        composed(override)


def test_train_layouts_must_fit_the_toy_vocabulary_and_the_config_stays_readable():
    with pytest.raises(Exception, match="train_layouts"):
        composed("scale=smoke", "train_layouts=[teacher_top16_bucket]")      # smoke vocabulary: 8
    assert composed("scale=smoke").scale == "smoke" and composed().synthetic.vocab == 32768
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert len(OmegaConf.to_yaml(compose("cache_estimators")).splitlines()) <= 80   # what --cfg job prints


# --- end to end ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cache_estimators_smoke_end_to_end(tmp_path):
    out, cfg = tmp_path / "out", composed("scale=smoke")
    env = {**os.environ, "ASYNCOPD_CACHE": str(tmp_path / "cache")}           # fresh cache: trains the tiny models
    p = subprocess.run([sys.executable, "-m", "studies.cache_estimators", "scale=smoke", f"hydra.run.dir={out}"],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "## Claims" in p.stdout
    for name in ("results.csv", "settings.csv", "network.csv", "training.csv", "report.md", "pareto_toy.png",
                 "pareto_synthetic.png", "training_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    df = pd.read_csv(out / "results.csv")
    V = cfg.toy.n_symbols + 4
    n_layouts = {s: len(grads.layouts(cfg.ks, cfg.ms, cfg.tails, v))
                 for s, v in (("toy", V), ("synthetic", cfg.synthetic.vocab))}
    assert df.groupby(["setting", "staleness"]).size().to_dict() == {
        **{("toy", "fresh" if k == 0 else f"k={k}"): n_layouts["toy"] for k in cfg.toy_staleness},
        **{("synthetic", "fresh" if x == 0 else f"λ={x:g}"): n_layouts["synthetic"] for x in cfg.synthetic.stale_shift}}
    toy = df[df.setting == "toy"]
    assert toy.k.max() == V and toy.k_requested.max() == 16 and toy.param_rmse_rel.notna().all()
    exact = df[(df.k == df.vocab) & (df.family == "teacher top-k")]             # k = V: every tail is exact
    assert len(exact) > 0 and (exact.rmse_rel < 1e-4).all()
    assert (df.cos_mean.between(-1 - 1e-6, 1 + 1e-6)).all() and (df.rmse_rel >= 0).all()
    tr = pd.read_csv(out / "training.csv")
    last = tr.groupby(["layout", "staleness", "seed"]).step.max()
    assert set(last.index) == set(itertools.product(cfg.train_layouts, cfg.train_staleness, cfg.train_seeds))
    assert (last == cfg.steps).all()
    settings = pd.read_csv(out / "settings.csv").set_index(["setting", "staleness"])
    assert settings.loc[("toy", "fresh"), "drift_kl"] == pytest.approx(0, abs=1e-6)
