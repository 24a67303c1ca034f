"""sim.plan: split enumeration on a hand-counted budget, learner scaling, KL advice, ranking, parity with
simulate(), the analytic bound, validation, and the Hydra entry (plan.csv, plan.png, exit codes)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from asyncopd.scheduler import SchedulerConfig
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from sim.model import simulate
from sim.plan import binding, explain, frontier_lines, recommend
from sim.planner import (MAX_ETA, PlanConfig, advise, bound, enumerate_splits, frontier, learner_costs, rank,
                         role_rates, run, select_splits)


MACHINERY_ETA = {"forward_kl_topk": 8, "reverse_kl_stale": 4}   # fixed bounds: these tests check the search,
                                                                # not the study's numbers (MAX_ETA)


def small(**kw) -> PlanConfig:
    """8 GPUs, 1 GPU per replica, fixed 8-token responses, B=4: each candidate simulates in milliseconds. The
    KL bounds are MACHINERY_ETA unless given."""
    costs = kw.pop("costs", CostModel(decode_step_s=0.01, decode_step_s_per_seq=0.001, prefill_s_per_token=0.001,
                                      max_batch=8, teacher_s_per_token=0.002, teacher_s_per_seq=0.001,
                                      teacher_call_s=0.004, teacher_max_batch=2, learner_s_per_token=0.01,
                                      learner_step_s=0.05, publish_s=0.02, weight_sync_s=0.03))
    return PlanConfig(cluster=kw.pop("cluster", ClusterShape(1, 1)), costs=costs,
                      workload=kw.pop("workload", Workload(batch_size=4, prompt_len=4, length=LengthDist("fixed", 8, max=8))),
                      **{"gpus": 8, "etas": [0, 1, 2, 8], "learner_gpus": [1, 4], "max_splits": 20, "steps": 8,
                         "max_eta": dict(MACHINERY_ETA), **kw})


def test_splits_fill_the_budget_hand_counted():
    # 6 GPUs, teacher replicas of 2: L=1 → t=1, r=3 or t=2, r=1; L=2 → t=1, r=2; L=4 leaves no room for both
    cfg = small(gpus=6, cluster=ClusterShape(1, 1, gpus_per_teacher_replica=2), learner_gpus=[1, 2, 4])
    assert sorted(enumerate_splits(cfg)) == [(1, 2, 1), (2, 1, 2), (3, 1, 1)]
    # 7 GPUs, rollout replicas of 2, teachers of 1: a split with a spare GPU (room for one more teacher) is dropped
    cfg = small(gpus=7, cluster=ClusterShape(1, 1, gpus_per_rollout_replica=2), learner_gpus=[1, 2])
    assert sorted(enumerate_splits(cfg)) == [(1, 3, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1)]
    assert all(2 * r + t + L == 7 for r, t, L in enumerate_splits(cfg))
    # colocated: no teacher replicas, rollout takes everything the learner leaves
    cfg = small(gpus=5, cluster=ClusterShape(1, 0, placement="teacher_with_learner"), learner_gpus=[1, 2])
    assert sorted(enumerate_splits(cfg)) == [(3, 0, 2), (4, 0, 1)]


def test_learner_scaling():
    cfg = small(cluster=ClusterShape(1, 1, learner_gpus=2), learner_scaling_efficiency=0.9)
    s = cfg.costs.learner_s_per_token
    assert learner_costs(cfg, 2).learner_s_per_token == pytest.approx(s)
    assert learner_costs(cfg, 4).learner_s_per_token == pytest.approx(s / 1.8)          # one doubling: 2e faster
    assert learner_costs(cfg, 8).learner_s_per_token == pytest.approx(s / 1.8 ** 2)
    assert learner_costs(cfg, 1).learner_s_per_token == pytest.approx(s * 1.8)
    assert learner_costs(cfg, 8).learner_step_s == cfg.costs.learner_step_s             # fixed cost kept
    linear = small(cluster=ClusterShape(1, 1, learner_gpus=2), learner_scaling_efficiency=1.0)
    assert learner_costs(linear, 16).learner_s_per_token == pytest.approx(s / 8)


def test_selection_keeps_every_learner_size():
    # learner-bound costs: every L=4 split has a higher bound than every L=1 split, yet L=1 keeps its best
    c = CostModel(decode_step_s=0.001, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=8,
                  teacher_s_per_token=0.0, learner_s_per_token=0.05, learner_step_s=0.0, weight_sync_s=0.0)
    cfg = small(costs=c, max_splits=3)
    chosen = select_splits(cfg, 8.0)
    assert len(chosen) == 3 and [L for _, _, L in chosen].count(1) == 1 and chosen[0][2] == 4
    assert len(select_splits(small(costs=c, max_splits=1), 8.0)) == 1


def test_kl_advice_follows_the_estimator_bound():
    stale, fwd = small(estimator="reverse_kl_stale"), small(estimator="forward_kl_topk")
    assert [advise(stale, e)[0] for e in (0, 1, 2, 4, 8)] == [True, True, True, True, False]
    assert [advise(fwd, e)[0] for e in (0, 1, 2, 4, 8, 16)] == [True] * 5 + [False]
    assert "forward KL tolerates η ≤ 8" in advise(stale, 8)[1] and "beyond" in advise(fwd, 16)[1]
    strict = small(estimator="reverse_kl_stale", max_eta={"forward_kl_topk": 8, "reverse_kl_stale": 1})
    assert [advise(strict, e)[0] for e in (1, 2)] == [True, False]


def test_ranking_kl_ok_first_then_samples_per_s():
    df = run(small(estimator="reverse_kl_stale", tie_band=0.0))
    assert len(df) == len(enumerate_splits(small())) * 4 and list(df["rank"]) == list(range(1, len(df) + 1))
    assert list(df.kl_ok) == sorted(df.kl_ok, reverse=True)              # every kl_ok row before the others
    assert (df.kl_ok == (df.eta <= 4)).all()
    for _, part in df.groupby("kl_ok"):
        assert part.samples_per_s.is_monotonic_decreasing
    assert (df.gpus_used <= 8).all() and (df.staleness_max <= df.eta).all()
    assert ((df.idle_rollout >= 0) & (df.idle_rollout <= 1)).all()
    assert df.iloc[0].eta == 2                     # the largest tolerated η of [0, 1, 2, 8] is fastest here


def test_top_row_matches_a_direct_simulation():
    cfg = small(cluster=ClusterShape(1, 1, learner_gpus=1), learner_scaling_efficiency=0.9)
    top = run(cfg).iloc[0]
    L = int(top.learner_gpus)
    costs = CostModel(**{**cfg.costs.__dict__, "learner_s_per_token": 0.01 / L / 0.9 ** math.log2(L)})
    _, s = simulate(ClusterShape(int(top.rollout_replicas), int(top.teacher_replicas), learner_gpus=L), costs,
                    cfg.workload, SchedulerConfig(max_staleness=int(top.eta)), cfg.steps, cfg.seed)
    assert top.samples_per_s == pytest.approx(s["samples_per_s"], rel=1e-12)
    assert top.idle_learner == pytest.approx(1 - s["util_learner"], rel=1e-12)


@pytest.mark.parametrize("learner_bound", [True, False])
def test_the_bottleneck_decides_the_learner_size(learner_bound):
    # learner-bound: 0.05 s/token · 32 tokens on 1 GPU ≫ rollout; rollout-bound: slow decode, cheap learner
    c = (CostModel(decode_step_s=0.001, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=8,
                   teacher_s_per_token=0.0, learner_s_per_token=0.05, learner_step_s=0.0, weight_sync_s=0.0)
         if learner_bound else
         CostModel(decode_step_s=0.1, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=1,
                   teacher_s_per_token=0.0, learner_s_per_token=1e-4, learner_step_s=0.0, weight_sync_s=0.0))
    df = run(small(costs=c, estimator="forward_kl_topk"))
    best = df.groupby(["eta", "learner_gpus"]).samples_per_s.max().unstack()
    if learner_bound:
        assert df.iloc[0].learner_gpus == 4 and (best[4] > 2 * best[1]).all()
    else:
        assert df.iloc[0].learner_gpus == 1 and (best[1] > best[4]).all()


def test_bound_closed_form_and_upper_bounds_the_simulation():
    cfg = small()
    c = cfg.costs
    # r=5, t=2, L=1, η=1: n = min(8, ⌈2·4/5⌉) = 2; per trajectory 8·step_s(2)/2 + 4·0.001 = 0.048 s of a
    # replica; a teacher scores one in 0.001 + 0.002·12 + 0.004/2 (calls of 2) = 0.027 s; the learner's step
    # publishes for 0.02 s (the 0.03 s weight transfer does not hold it)
    R_r, R_t = 5 / (8 * c.step_s(2) / 2 + 0.004), 2 / 0.027
    R_L = 4 / (0.05 + 0.01 * 4 * 8 + 0.02)
    b, serial = bound(cfg, 5, 2, 1, 1, 8.0)
    assert b == pytest.approx(min(R_r, R_t, R_L)) and serial == pytest.approx(1 / (1 / R_r + 1 / R_t + 1 / R_L))
    df = run(cfg)
    assert (df.samples_per_s <= df.bound_samples_per_s * (1 + 1e-9)).all()


LATENCY_BOUND = CostModel(decode_step_s=0.1, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=64,
                          teacher_s_per_token=0.0, learner_s_per_token=1e-4, learner_step_s=0.0, weight_sync_s=0.0)


def test_recommendation_names_the_split_and_forward_kl():
    # rollouts take 0.8 s whatever the batch, so samples/s grow with the (η+1)·B in flight: η = 8 beats η = 1
    cfg = small(costs=LATENCY_BOUND, estimator="reverse_kl_stale", etas=[0, 1, 8])
    line = recommend(run(cfg), cfg)
    assert line.startswith("Recommendation for reverse_kl_stale (η ≤ 4)") and "η = 1" in line
    assert "Forward KL (η ≤ 8) would allow" in line and "η = 8" in line
    none_ok = small(costs=LATENCY_BOUND, estimator="reverse_kl_stale", etas=[8])
    assert "No candidate" in recommend(run(none_ok), none_ok)


@pytest.mark.parametrize("kw, field", [
    (dict(gpus=2), "gpus"), (dict(gpus=0), "gpus"), (dict(learner_gpus=[8]), "gpus"),
    (dict(etas=[0, -1]), "etas"), (dict(etas=[]), "etas"), (dict(etas=[1, 1]), "etas"),
    (dict(learner_gpus=[0, 2]), "learner_gpus"), (dict(on_stale="skip"), "on_stale"),
    (dict(learner_scaling_efficiency=0.0), "learner_scaling_efficiency"),
    (dict(learner_scaling_efficiency=1.5), "learner_scaling_efficiency"),
    (dict(estimator="reverse_kl_topk"), "estimator"), (dict(max_eta={"reverse_kl_stale": 1}), "max_eta"),
    (dict(steps=0), "steps"), (dict(max_splits=0), "max_splits"), (dict(top=0), "top"), (dict(seed=-1), "seed"),
    (dict(pipeline_depth=-1), "pipeline_depth"), (dict(pipeline_depth=1.5), "pipeline_depth"),
])
def test_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        small(**kw)


def test_smallest_budget_is_allowed():
    # one rollout (1), one teacher (1) and the smallest learner (1)
    assert enumerate_splits(small(gpus=3, learner_gpus=[1, 4])) == [(1, 1, 1)]


CLUSTER = """# @package _global_
cluster: {rollout_replicas: 1, teacher_replicas: 1, placement: separate, gpus_per_rollout_replica: 1,
          gpus_per_teacher_replica: 1, learner_gpus: 1}
costs: {decode_step_s: 0.01, decode_step_s_per_seq: 0.001, prefill_s_per_token: 0.001, max_batch: 8,
        teacher_s_per_token: 0.002, learner_s_per_token: 0.01, learner_step_s: 0.05, weight_sync_s: 0.02}
"""
WORKLOAD = "batch_size: 4\nprompt_len: 4\nlength: {dist: fixed, mean: 8, max: 8}\n"


def plan_cli(tmp_path, *overrides):
    """Run `python -m sim.plan` on a tiny cluster and workload written to tmp_path (not the shipped files)."""
    conf = tmp_path / "conf"
    (conf / "cluster").mkdir(parents=True)
    (conf / "workload").mkdir()
    (conf / "cluster" / "test_tiny.yaml").write_text(CLUSTER)
    (conf / "workload" / "test_tiny.yaml").write_text(WORKLOAD)
    return subprocess.run([sys.executable, "-m", "sim.plan", f"hydra.searchpath=[file://{conf}]",
                           "cluster=test_tiny", "workload=test_tiny", f"hydra.run.dir={tmp_path / 'out'}",
                           "steps=6", "learner_gpus=[1,2]", *overrides], capture_output=True, text=True)


def test_cli_writes_plan_csv_and_png(tmp_path):
    p = plan_cli(tmp_path, "gpus=6", "etas=[0,2,8]", "estimator=reverse_kl_stale", "top=3")
    assert p.returncode == 0, p.stderr
    df = pd.read_csv(tmp_path / "out" / "plan.csv")
    assert {"rollout_replicas", "teacher_replicas", "learner_gpus", "gpus_used", "eta", "samples_per_s",
            "tokens_per_s", "staleness_mean", "staleness_max", "idle_rollout", "idle_teacher", "idle_learner",
            "latency_mean_s", "n_dropped", "kl_ok", "advice"} <= set(df.columns)
    assert sorted(map(tuple, df[["rollout_replicas", "teacher_replicas", "learner_gpus"]].drop_duplicates()
                      .to_numpy())) == [(1, 3, 2), (1, 4, 1), (2, 2, 2), (2, 3, 1), (3, 1, 2), (3, 2, 1), (4, 1, 1)]
    assert (df.gpus_used == 6).all() and (df.kl_ok == (df.eta <= MAX_ETA["reverse_kl_stale"])).all()
    assert (tmp_path / "out" / "plan.png").stat().st_size > 10_000
    assert f"Recommendation for reverse_kl_stale (η ≤ {MAX_ETA['reverse_kl_stale']})" in p.stdout
    assert len([ln for ln in p.stdout.splitlines() if ln.strip()[:1].isdigit()]) == 3   # top=3 table rows


def test_cli_exits_non_zero_naming_the_field(tmp_path):
    p = plan_cli(tmp_path, "gpus=0")
    assert p.returncode != 0 and "gpus must be an int >= 3" in p.stderr


def test_ties_inside_the_band_go_to_the_busiest_gpus():
    rows = pd.DataFrame(dict(samples_per_s=[100.0, 99.0, 90.0, 200.0], busy_gpu_frac=[0.5, 0.8, 0.9, 1.0],
                             kl_ok=[True, True, True, False], name=list("ABCD")))
    assert list(rank(rows, 0.02).name) == ["B", "A", "C", "D"]          # 99 is within 2% of 100, and busier
    assert list(rank(rows, 0.0).name) == ["A", "B", "C", "D"]           # no band: samples/s alone
    assert list(rank(rows, 0.2).name) == ["C", "B", "A", "D"]           # a 20% band takes 90 in too
    assert list(rank(rows, 0.02).in_band) == [True, True, False, False]


def test_planner_finds_the_analytically_best_split():
    """Teacher and learner cost nothing, so samples/s is r / (rollout time per trajectory): the split with the
    most rollout replicas (L = 1, t = 1: r = 6 of 8 GPUs) is best at every η, and the explanation names the
    rollout as binding with the teacher and learner idle."""
    c = CostModel(decode_step_s=0.01, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=1,
                  teacher_s_per_token=0.0, learner_s_per_token=0.0, learner_step_s=0.0, weight_sync_s=0.0)
    cfg = small(costs=c, estimator="forward_kl_topk", etas=[0, 2])
    df = run(cfg)
    top = df.iloc[0]
    assert (top.rollout_replicas, top.teacher_replicas, top.learner_gpus) == (6, 1, 1)
    # at η = 2 all 6 replicas run (12 may be in flight), one 80-ms trajectory each at a time (max_batch = 1):
    # 8 steps × 4 samples take ⌈32 / 6⌉ = 6 waves of 80 ms
    assert top.eta == 2 and top.samples_per_s == pytest.approx(32 / (6 * 0.08), rel=1e-9)
    text = binding(top, cfg)
    assert text.startswith("Binding: the rollout (") and "the teacher and learner have spare capacity" in text


def test_learner_bound_mean_staleness_matches_the_closed_form():
    """With the learner the only cost (rollouts and scoring instant, on_stale=wait), the scheduler keeps
    (η+1)·B finished trajectories queued: after the first η steps every batch is exactly η versions old, so over
    S steps the mean staleness is (S·η − η(η+1)/2) / S = η − η(η+1)/(2S) exactly."""
    c = CostModel(decode_step_s=1e-4, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=64,
                  teacher_s_per_token=0.0, learner_s_per_token=0.0, learner_step_s=1.0, weight_sync_s=0.0)
    w = Workload(batch_size=4, prompt_len=4, length=LengthDist("fixed", 8, max=8))
    for eta, S in [(1, 10), (2, 40), (4, 40)]:
        _, s = simulate(ClusterShape(4, 1), c, w, SchedulerConfig(batch_size=4, max_staleness=eta, on_stale="wait"),
                        S, 0)
        assert s["staleness_mean"] == pytest.approx(eta - eta * (eta + 1) / (2 * S), abs=1e-12)
        assert s["util_learner"] > 0.999


def test_explanation_states_the_tie_the_frontier_and_the_drop_bias():
    cfg = small(costs=LATENCY_BOUND, estimator="forward_kl_topk", etas=[1], on_stale="drop",
                workload=Workload(batch_size=4, prompt_len=4, length=LengthDist("lognormal", 8, sigma=1.0, max=64)))
    df = run(cfg)
    front = frontier(cfg, 1)
    assert sorted(front.gpus_used) == [4, 6] and (front.eta == 1).all()     # 0.25·8 = 2 GPUs cannot hold 3 roles
    lines = explain(df, front, cfg)
    best = df.iloc[0]
    assert lines[1].startswith("Binding:") and lines[2].startswith("Utilisation:")
    caveat = next(ln for ln in lines if ln.startswith("Caveat (on_stale=drop)"))
    assert f"{best.n_dropped} of {best.n_dropped + cfg.steps * 4} finished" in caveat
    assert f"trained responses average {best.len_trained_mean:.0f} tokens against {best.len_generated_mean:.0f}" in caveat
    assert best.length_bias < 0 and f"{best.wasted_token_frac:.0%} of the generated tokens" in caveat
    flat = frontier_lines(pd.DataFrame(dict(gpus_used=[4], samples_per_s=[best.samples_per_s * 0.995])), best, cfg)
    assert "less than the 2% tie band: 4 GPUs do the same work" in flat[0]
    steep = frontier_lines(pd.DataFrame(dict(gpus_used=[4], samples_per_s=[best.samples_per_s / 2])), best, cfg)
    assert "tie band" not in steep[0] and "buy +100%" in steep[0]


def test_max_length_bias_sets_skewed_rows_aside():
    """Drop mode on long-tailed lengths trains on shorter answers; with max_length_bias=0 only rows whose
    trained lengths match the generated ones may be recommended, and the rows set aside are reported."""
    w = Workload(batch_size=4, prompt_len=4, length=LengthDist("lognormal", 8, sigma=1.0, max=64))
    free = run(small(costs=LATENCY_BOUND, estimator="forward_kl_topk", etas=[0, 1, 2], on_stale="drop", workload=w))
    assert free.bias_ok.all() and (free[free.eta == 0].length_bias == 0).all() and (free.length_bias < 0).any()
    cfg = small(costs=LATENCY_BOUND, estimator="forward_kl_topk", etas=[0, 1, 2], on_stale="drop", workload=w,
                max_length_bias=0.0)
    df = run(cfg)
    assert list(df.bias_ok) == sorted(df.bias_ok, reverse=True) and df.iloc[0].length_bias == 0
    assert (df.bias_ok == (df.length_bias.abs() <= 0)).all()
    lines = explain(df, pd.DataFrame(), cfg)
    assert any(ln.startswith(f"{(~df.bias_ok).sum()} rows within the η bound were set aside") for ln in lines)
    with pytest.raises(ValueError, match="max_length_bias"):
        small(max_length_bias=-0.1)


def test_pacing_plans_drop_nothing_and_admit_min_depth_eta_ahead():
    """on_stale=deadline with pipeline_depth=1 on long-tailed lengths: each row runs the scheduler at depth min(1, η)
    (the same samples/s as a direct simulation with it), nothing is dropped and the length bias is 0, while drop at
    the same η skews lengths; the analytic rollout rate uses the (D+1)·B window."""
    w = Workload(batch_size=4, prompt_len=4, length=LengthDist("lognormal", 8, sigma=1.0, max=64))
    cfg = small(costs=LATENCY_BOUND, estimator="forward_kl_topk", etas=[0, 1, 2, 8], on_stale="deadline",
                pipeline_depth=1, workload=w)
    df = run(cfg)
    assert (df.pipeline_depth == df.eta.clip(upper=1)).all()
    assert (df.n_dropped == 0).all() and (df.length_bias == 0).all() and (df.staleness_max <= df.eta).all()
    top = df.iloc[0]
    shape = ClusterShape(int(top.rollout_replicas), int(top.teacher_replicas), learner_gpus=int(top.learner_gpus))
    _, s = simulate(shape, learner_costs(cfg, int(top.learner_gpus)), w,
                    SchedulerConfig(max_staleness=int(top.eta), on_stale="deadline",
                                    pipeline_depth=int(top.pipeline_depth)), cfg.steps, cfg.seed)
    assert top.samples_per_s == pytest.approx(s["samples_per_s"], rel=1e-12)
    rates = {d: role_rates(small(costs=LATENCY_BOUND, pipeline_depth=d, workload=w), 1, 1, 1, 8, 8.0)["rollout"]
             for d in (0, 1, None)}
    assert rates[0] < rates[1] < rates[None]            # n = min(max_batch, (D+1)·B/r) = 4, 8, 36 sequences
    paced = df[df.eta > 1].iloc[0]                      # the window binds: advice is a deeper pipeline, not η
    assert "(D+1)·B = 8 sequences are in flight (D = 1" in binding(paced, cfg)
    assert f"a deeper pipeline (pipeline_depth up to η = {paced.eta})" in binding(paced, cfg)


def test_max_eta_matches_the_kl_direction_report():
    """The planner's default bounds are the shipped study's: for each estimator, the largest k of the report's
    dose-response table up to which no k shows a loss under studies.cells.compare's rule (seed ranges apart and
    the gap beyond two binomial standard errors of one evaluation). A re-run study that moves a bound fails here
    until MAX_ETA follows it."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "kl_direction_report.md").read_text()
    n_prompts = int(re.search(r"held-out greedy accuracy on (\d+) prompts", text).group(1))
    table = text.split("## Dose–response")[1].split("\n## ")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 5 and cells[1].isdigit():
            rows.setdefault(cells[0], []).append((int(cells[1]), *map(float, cells[2:5])))   # k, mean, min, max
    derived = {}
    for est, by_k in rows.items():
        (k0, m0, lo0, hi0), *rest = sorted(by_k)
        bound_k = k0
        for k, m, lo, hi in rest:
            p = (m0 + m) / 2
            if (hi < lo0 or lo > hi0) and m0 - m > 2 * math.sqrt(p * (1 - p) / n_prompts):
                break
            bound_k = k
        derived[est] = bound_k
    assert {e: derived[e] for e in MAX_ETA} == MAX_ETA
