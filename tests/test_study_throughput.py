"""studies.throughput: the smoke run end to end (CLI), exact rates and speedups on hand-built inputs, the sweep's
cells and the config's validation."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from asyncopd.scheduler import SchedulerConfig
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from studies import throughput
from studies.throughput import Config, Shape, ToyPoint

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "studies" / "throughput"
FIGURES = ("speedup_vs_sigma.png", "speedup_vs_split.png", "speedup_vs_eta.png", "staleness.png")


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("throughput", overrides=list(overrides)))


@pytest.mark.slow
def test_throughput_smoke_end_to_end(tmp_path):
    out, cfg = tmp_path / "out", composed("scale=smoke")
    cmd = [sys.executable, "-m", "studies.throughput", "scale=smoke", f"hydra.run.dir={out}"]
    env = {**os.environ, "ASYNCOPD_CACHE": str(tmp_path / "cache")}        # fresh cache: trains the tiny models
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "## Claims" in p.stdout and str(out) in p.stdout
    for name in ("results.csv", "staleness_hist.csv", "toy_point.csv", "report.md", "toy_point/comparison.csv",
                 *FIGURES):
        assert (out / name).stat().st_size > 0, name
    df = pd.read_csv(out / "results.csv")
    # 2 shapes × 2 splits (learner 2 or 4 GPUs) × σ ∈ {0.25, 0.8 (the workload's), 1.5} × (sync + 2 modes at η=2)
    assert len(df) == 2 * 2 * 3 * 3 and sorted(df.sigma.unique()) == [0.25, 0.8, 1.5]
    sync = df[df.eta == 0]
    assert (sync.on_stale == "sync").all() and (sync.speedup == 1).all() and (sync.staleness_max == 0).all()
    assert (df.staleness_max <= df.eta).all() and (df[df.on_stale == "wait"].drop_fraction == 0).all()
    assert (df.speedup_vs_best_sync <= df.speedup + 1e-12).all() and (df.samples_per_s > 0).all()
    assert df.default_split.sum() == len(df) // 2
    hists = pd.read_csv(out / "staleness_hist.csv")
    assert (hists.groupby(["shape", "sigma", "learner_gpus", "eta", "on_stale"]).fraction.sum().round(12) == 1).all()
    toy = pd.read_csv(out / "toy_point.csv")
    assert toy.eta.tolist() == [0, cfg.toy_point.eta] and toy.measured_speedup.iloc[0] == 1
    assert toy.measured_staleness_mean.iloc[0] == 0 and (toy.measured_samples_per_s > 0).all()
    report = (out / "report.md").read_text()
    assert "η=1): measured" in report and "Seeds' 1.6–3.8× range" in report


def hand_cell(eta: int) -> dict:
    """1 replica decoding 4 sequences of exactly 10 tokens at 0.01 s per iteration, a free teacher, a 1 s learner
    step and weights that reach the replica 0.5 s after it. Sync: 0.1 + 1 + 0.5 s per batch of 4 = 2.5 samples/s.
    Async: the learner is the bottleneck, 4 samples/s, and the batch after the first is exactly η old (wait)."""
    costs = CostModel(decode_step_s=0.01, decode_step_s_per_seq=0.0, prefill_s_per_token=0.0, max_batch=8,
                      teacher_s_per_token=0.0, learner_s_per_token=0.0, learner_step_s=1.0, weight_sync_s=0.5)
    workload = Workload(batch_size=4, prompt_len=0, length=LengthDist("fixed", mean=10, max=10))
    sched = SchedulerConfig(max_staleness=eta, on_stale="wait")
    return dict(shape="hand", eta=eta, sim=(ClusterShape(), costs, workload, sched, 12, 0), warmup=3)


def test_simulate_cell_exact_rates_and_staleness():
    (sync, h0), (async1, h1), (async2, h2) = (throughput.simulate_cell(hand_cell(eta)) for eta in (0, 1, 2))
    assert sync["samples_per_s"] == pytest.approx(2.5, rel=1e-12) and sync["tokens_per_s"] == pytest.approx(25)
    assert async1["samples_per_s"] == pytest.approx(4.0, rel=1e-12) == async2["samples_per_s"]
    assert sync["mean_length"] == async1["mean_length"] == 10 and sync["shape"] == "hand" and "sim" not in sync
    assert h0 == {0: 48} and h1 == {0: 4, 1: 44} and h2 == {0: 4, 1: 4, 2: 40}
    assert async2["staleness_max"] == 2 and async2["drop_fraction"] == 0


def test_add_speedups_exact_on_a_hand_built_table():
    rows = [  # shape, σ, seed, learner GPUs, η, samples/s, tokens/s
        ("a", 0.5, 0, 2, 0, 10.0, 1000.0), ("a", 0.5, 0, 4, 0, 12.0, 1100.0),
        ("a", 0.5, 0, 2, 2, 30.0, 2000.0), ("a", 0.5, 0, 4, 2, 24.0, 2200.0),
        ("a", 1.0, 0, 2, 0, 5.0, 500.0), ("a", 1.0, 0, 2, 2, 20.0, 1000.0),
        ("b", 0.5, 0, 2, 0, 8.0, 800.0), ("b", 0.5, 0, 2, 2, 8.0, 400.0)]
    df = pd.DataFrame(rows, columns=["shape", "sigma", "seed", "learner_gpus", "eta", "samples_per_s", "tokens_per_s"])
    out = throughput.add_speedups(df)
    assert out.speedup.tolist() == [1.0, 1.0, 3.0, 2.0, 1.0, 4.0, 1.0, 1.0]
    assert out.token_speedup.tolist() == [1.0, 1.0, 2.0, 2.0, 1.0, 2.0, 1.0, 0.5]
    assert out.speedup_vs_best_sync.tolist() == [10 / 12, 1.0, 2.5, 2.0, 1.0, 4.0, 1.0, 1.0]
    assert out.best_sync_learner_gpus.tolist() == [4, 4, 4, 4, 2, 2, 2, 2]
    assert len(out) == len(df) and out[list(df.columns)].equals(df)


def test_verdicts_follow_the_numbers():
    rows = []   # one shape: default split 4 rollout / 2 learner GPUs, another 2 / 4; σ 0.25 and 1.5 (the workload's)
    for sigma, r, L, eta, mode, rate, speedup, tokens in [
            (0.25, 4, 2, 0, "sync", 10.0, 1.0, 1.0), (1.5, 4, 2, 0, "sync", 10.0, 1.0, 1.0),
            (1.5, 2, 4, 0, "sync", 12.0, 1.0, 1.0),
            (0.25, 4, 2, 1, "wait", 20.0, 2.0, 2.0), (1.5, 4, 2, 1, "wait", 20.0, 2.0, 2.0),
            (0.25, 4, 2, 1, "drop", 20.0, 2.0, 2.0), (1.5, 4, 2, 1, "drop", 50.0, 5.0, 2.5)]:
        rows.append(dict(shape="s", sigma=sigma, workload_sigma=sigma == 1.5, rollout_replicas=r, learner_gpus=L,
                         default_split=L == 2, eta=eta, on_stale=mode, samples_per_s=rate, speedup=speedup,
                         token_speedup=tokens, weight_sync_s=6.0, learner_period_s=5.0))
    toy = pd.DataFrame(dict(eta=[0, 2], measured_speedup=[1.0, 1.5], predicted_speedup=[1.0, 1.8], cpus=2,
                            load_1min=0.5))
    v = throughput.verdicts(pd.DataFrame(rows), toy, Config(measure_toy=False))
    assert v[0] == ("Seeds' 1.6–3.8× range: 75% of the async cells fall in it; drop η=1: 2.00–5.00× (50% in); "
                    "wait η=1: 2.00–2.00× (100% in).")
    assert v[1].startswith("drop: the speedup grows with the tail") and v[1].endswith(
        "= 2.50–2.50 in samples/s, 1.25–1.25 in trained tokens/s.")
    assert v[2].startswith("wait: the speedup is flat in the tail")
    assert v[3].startswith("wait: speedup / (η+1) = 1.00–1.00 (100% of cells within 0.9–1.15)")
    assert v[4].startswith("s: weight_sync_s 6 s exceeds a learner step + publish (5 s)")
    assert v[5] == "Best synchronous split (workload σ): s 2 rollout / 4 learner GPUs, 1.20× the default split."
    assert v[6] == ("Toy point (this CPU, 2 cores, 1-min load 0.5; η=2): measured 1.50×, predicted 1.80× from the "
                    "η=0 calibration (+20%); outside the seeds' range.")
    fast_sync = [{**r, "weight_sync_s": 1.0} for r in rows]
    assert not any("weight_sync_s" in line for line in throughput.verdicts(pd.DataFrame(fast_sync), None, Config()))


def test_cells_cover_the_splits_sigmas_and_modes():
    cfg = Config(shapes=[Shape(), Shape("h100x8_teacher_on_learner", "math_1p7b")], sigmas=[0.25, 1.5],
                 etas=[0, 2], learner_gpus=[1, 2, 4], measure_toy=False)
    cells = pd.DataFrame([{k: v for k, v in c.items() if k != "sim"} for c in throughput.cells(cfg)])
    # 8 GPUs; separate: teacher 1×2 GPUs, L ∈ {1, 2, 4} -> 5, 4, 2 rollout; with the teacher on the learner L ≥ 2
    splits = cells.groupby("shape")[["rollout_replicas", "learner_gpus"]].apply(
        lambda d: sorted(set(map(tuple, d.to_numpy().tolist()))))
    assert splits.to_dict() == {"h100x8_qwen3_1p7b_30b / math_1p7b": [(2, 4), (4, 2), (5, 1)],
                                "h100x8_teacher_on_learner / math_1p7b": [(4, 4), (6, 2)]}
    assert len(cells) == 5 * 3 * (1 + 2)        # splits × σ ∈ {0.25, 0.8 (the workload's), 1.5} × (sync, 2 modes)
    assert set(cells[cells.eta == 0].on_stale) == {"sync"} and set(cells[cells.eta == 2].on_stale) == {"wait", "drop"}
    assert set(cells[cells.default_split].learner_gpus) == {2} and set(cells[cells.workload_sigma].sigma) == {0.8}
    cell = throughput.cells(cfg)[0]
    cluster, costs, workload, sched, steps, seed = cell["sim"]
    assert workload.length.dist == "lognormal" and workload.length.sigma == cell["sigma"]
    assert cluster.rollout_replicas == cell["rollout_replicas"] and costs.learner_s_per_token > 0   # L scaled


@pytest.mark.parametrize("override, field", [
    ("etas=[1,2]", "etas"), ("on_stale=[keep]", "on_stale"), ("band=[3.8,1.6]", "band"), ("steps=5", "steps"),
    ("workers=0", "workers"), ("sigmas=[0.5,-1.0]", "sigmas"), ("learner_scaling_efficiency=0", "learner_scaling"),
    ("shapes=[{cluster: nope, workload: math_1p7b}]", "cluster='nope'"), ("toy_point.eta=0", "toy_point.eta"),
    ("toy_point.steps=4", "toy_point.steps"),
])
def test_invalid_settings_rejected_naming_field(override, field):
    with pytest.raises(Exception, match=field):
        composed(override)


def test_config_composes_at_both_scales_and_stays_readable():
    default, smoke = composed(), composed("scale=smoke")
    assert isinstance(default, Config) and isinstance(default.toy_point, ToyPoint)
    assert [s.cluster for s in default.shapes] == [s.cluster for s in Config().shapes]
    assert default.etas == [0, 1, 2, 4, 8] and default.sigmas == Config().sigmas
    assert smoke.scale == "smoke" and smoke.toy_point.toy.batch_size == 8 and smoke.steps == 10
    with pytest.raises(ValueError, match="etas must be a list with 0"):
        Config(etas=[2, 4])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert len(OmegaConf.to_yaml(compose("throughput")).splitlines()) <= 80
