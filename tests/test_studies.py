"""Studies: kl_direction end to end at scale=smoke (CLI) and with an lr sweep, reuse of finished cells, the gap
closed and k½ on hand-built numbers, honest verdicts, validation."""

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from studies import cells as cells_lib, kl_direction, kl_direction_report as kd_report
from studies.kl_direction import Config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "studies" / "kl_direction"
FIGURES = ("accuracy_vs_staleness.png", "reverse_kl_vs_staleness.png", "learning_curves.png")


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("kl_direction", overrides=["cells_dir=unused", *overrides]))


@pytest.mark.slow
def test_kl_direction_smoke_end_to_end_then_rerun_reuses_every_cell(tmp_path):
    out, cfg = tmp_path / "out", composed("scale=smoke")
    cmd = [sys.executable, "-m", "studies.kl_direction", "scale=smoke", f"hydra.run.dir={out}"]
    env = {**os.environ, "ASYNCOPD_CACHE": str(tmp_path / "cache")}        # fresh cache: trains the tiny models
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert str(out) in first.stdout and "## Claims" in first.stdout and "- OPD works at k=0: " in first.stdout
    assert "kl_direction cells" in first.stderr                                            # the progress bar
    for name in ("results.csv", "report.md", "cells/teacher.json", *FIGURES):
        assert (out / name).stat().st_size > 0, name

    df = pd.read_csv(out / "results.csv")
    assert {"estimator", "staleness", "seed", "step", "accuracy", "kl", "eval_reverse_kl", "eval_forward_kl",
            "response_len_mean", "truncation_rate", "repetition_rate", "grad_norm", "ess"} <= set(df.columns)
    last = df.groupby(["estimator", "staleness", "seed"]).step.max()
    assert set(last.index) == set(itertools.product(cfg.estimators, cfg.staleness, cfg.seeds))
    assert (last == cfg.steps).all() and sorted(df.staleness.unique()) == sorted(cfg.staleness)
    evals = df.dropna(subset=["accuracy"])
    assert evals.accuracy.between(0, 1).all() and evals.eval_reverse_kl.ge(0).all()
    assert len(evals) == len(last) * (cfg.steps // cfg.toy.eval_every + 1)          # step 0, every eval_every, the end
    report = (out / "report.md").read_text()
    assert all(f"| {e} | {k} |" in report for e, k in itertools.product(cfg.estimators, cfg.staleness))
    assert (df.lr == cfg.toy.lr).all() and all(p.name.endswith(f"_s{s}") for p in out.glob("cells/*_k*")
                                               for s in [p.name.rsplit("_s", 1)[1]])   # no lr in the names

    # the gap closed at k=0, recomputed from results.csv and the teacher's file
    teacher = json.loads((out / "cells" / "teacher.json").read_text())["accuracy"]
    initial = df[df.step == 0].groupby("seed").accuracy.first()
    assert (df.teacher_accuracy == teacher).all() and (initial < teacher).all() and teacher <= 1
    at_k0 = df[(df.step == cfg.steps) & (df.staleness == min(cfg.staleness))]
    assert len(at_k0) == len(cfg.estimators) * len(cfg.seeds)
    for r in at_k0.itertuples():
        i = initial[r.seed]
        assert (f"| {r.estimator} | {r.seed} | {i:.4g} | {r.accuracy:.4g} | {teacher:.4g} | "
                f"{100 * (r.accuracy - i) / (teacher - i):.1f}% |") in report
    assert "## k½" in report and all(f"| {e} | +" in report or f"| {e} | -" in report for e in cfg.estimators)

    teacher_mtime = (out / "cells" / "teacher.json").stat().st_mtime_ns
    metrics = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.csv")}
    assert len(metrics) == len(last)
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.csv")} == metrics   # no cell ran again
    assert "kl_direction cells" not in second.stderr                                       # nor did the pool start
    assert (out / "cells" / "teacher.json").stat().st_mtime_ns == teacher_mtime             # nor the teacher's eval
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)


@pytest.mark.slow
def test_kl_direction_lr_sweep_names_its_cells_and_reports_k_half_per_lr(tmp_path):
    cfg = composed("scale=smoke", "estimators=[reverse_kl_stale]", "lrs=[0.003,0.001]", "steps=4",
                   f"toy.cache_dir={tmp_path / 'cache'}")
    cfg.cells_dir = str(tmp_path / "cells")
    df = kl_direction.run(cfg)
    names = sorted(p.name for p in (tmp_path / "cells").iterdir() if p.is_dir())
    assert names == sorted(f"reverse_kl_stale_k{k}_s0_lr{lr}" for k in (0, 2) for lr in ("0.003", "0.001"))
    trained = df.dropna(subset=["run_lr"])                                  # the optimiser's lr, logged per step
    assert sorted(df.lr.unique()) == [0.001, 0.003] and (trained.run_lr == trained.lr).all()
    report = kd_report.report(df)
    assert "lr ∈ {0.001, 0.003}" in report and "| estimator | lr | k=0 gain | k½ |" in report
    assert all(f"| reverse_kl_stale | {lr} | " in report for lr in ("0.001", "0.003"))
    assert "- lr 0.001: OPD works at k=0: " in report and "- lr 0.003: Stale reverse KL degrades" in report
    claim = [line for line in report.splitlines() if line.startswith("- Bias from stale data scales")]
    assert len(claim) == 1 and "for reverse_kl_stale (lr 0.001: " in claim[0]


def fake_cells(cfg: Config) -> None:
    """Mark every cell of cfg finished with a two-row metrics.csv, as run_cell would leave it, and the teacher
    measured."""
    Path(cfg.cells_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.cells_dir) / "teacher.json").write_text(json.dumps({"digest": kl_direction.toy_digest(cfg.toy),
                                                                   "accuracy": 0.9}))
    for c in kl_direction.cells(cfg):
        c["dir"].mkdir(parents=True)
        pd.DataFrame({"step": [0, cfg.steps], "objective": "label", "staleness": c["run"].staleness,
                      "accuracy": [0.5, 0.75]}).to_csv(c["dir"] / "metrics.csv", index=False)
        (c["dir"] / "done.json").write_text(json.dumps({"digest": c["digest"]}))


def test_finished_cells_are_reused_and_a_changed_config_reruns_them(tmp_path, monkeypatch):
    def no_training(toy_cfg):
        raise RuntimeError("a cell was about to run")
    monkeypatch.setattr(cells_lib.toy, "build_models", no_training)
    cfg = Config(estimators=["forward_kl_topk", "reverse_kl_stale"], staleness=[0, 2], seeds=[0, 1], steps=5,
                 cells_dir=str(tmp_path))
    fake_cells(cfg)
    df = kl_direction.run(cfg)
    assert len(df) == 8 * 2 and df.accuracy.tolist() == [0.5, 0.75] * 8
    assert list(df.columns[:5]) == ["estimator", "staleness", "seed", "lr", "step"] and set(df.objective) == {"label"}
    assert (df.teacher_accuracy == 0.9).all() and (df.lr == cfg.toy.lr).all()
    assert "run_staleness" not in df and {c["run"].staleness for c in kl_direction.cells(cfg)} == {"fixed:0", "fixed:2"}
    assert sorted(df.staleness.unique()) == [0, 2] and set(df.estimator) == {"forward_kl_topk", "reverse_kl_stale"}
    with pytest.raises(RuntimeError, match="about to run"):                 # steps changed: not the same cells
        kl_direction.run(Config(**{**cfg.__dict__, "steps": 6}))
    with pytest.raises(RuntimeError, match="about to run"):                 # another toy: measure the teacher again
        kl_direction.run(Config(**{**cfg.__dict__, "toy": replace(cfg.toy, eval_prompts=64)}))
    lr_cfg = Config(**{**cfg.__dict__, "lrs": [1e-4, 3e-4]})               # an lr sweep: its own folders
    assert [c["dir"].name for c in kl_direction.cells(lr_cfg)][:2] == ["forward_kl_topk_k0_s0_lr0.0001",
                                                                      "forward_kl_topk_k0_s0_lr0.0003"]
    assert [c["run"].toy.lr for c in kl_direction.cells(lr_cfg)][:2] == [1e-4, 3e-4]


def test_presets_and_the_table_writer():
    assert {"forward_kl_topk", "reverse_kl_stale", "reverse_kl_stale_tis_vcpo"} <= set(cells_lib.PRESETS)
    tis = cells_lib.preset("reverse_kl_stale_tis")
    assert (tis.estimator, tis.signal, tis.correction, tis.is_cap) == ("reverse_kl_sampled", "stale", "tis", 2.0)
    assert all(cells_lib.preset(p) for p in cells_lib.PRESETS)
    with pytest.raises(ValueError, match="not a preset of conf/estimator/"):
        cells_lib.preset("nope")
    table = pd.DataFrame({"arm": ["a", "b"], "acc": [0.123456, float("nan")], "n": [1, 2], "ok": [True, False]})
    assert cells_lib.markdown(table, ".3g").splitlines() == [
        "| arm | acc | n | ok |", "| --- | --- | --- | --- |", "| a | 0.123 | 1 | True |", "| b | nan | 2 | False |"]


def results(final: dict[str, list[list[float]]], initial=0.5, prompts=512, final_kl=1.0, ks=(0, 8), lr=1e-4,
            teacher=0.9) -> pd.DataFrame:
    """A results table with the given final accuracies: final[estimator] = per staleness k in ks, per seed.
    The held-out KLs start at 1.0 and end at final_kl (1.0: the student did not move in KL)."""
    rows = [dict(estimator=e, staleness=k, seed=s, lr=lr, step=step, accuracy=acc, eval_prompts=prompts,
                 eval_forward_kl=kl, eval_reverse_kl=kl, response_len_mean=3.0, truncation_rate=0.0,
                 teacher_accuracy=teacher)
            for e, per_k in final.items() for k, seeds in zip(ks, per_k) for s, a in enumerate(seeds)
            for step, acc, kl in ((0, initial, 1.0), (100, a, final_kl))]
    return pd.DataFrame(rows)


def test_k_half_interpolates_the_first_crossing_of_half_the_gain():
    assert kd_report.k_half([0, 2, 4], [0.9, 0.8, 0.7], initial=0.7) == pytest.approx(2.0)   # gain 0.2, half at 0.8
    assert kd_report.k_half([0, 2], [0.9, 0.7], initial=0.7) == pytest.approx(1.0)           # halfway from 0 to 2
    assert kd_report.k_half([0, 2, 8], [0.9, 0.8, 0.5], initial=0.5) == pytest.approx(4.0)   # 2 + 0.1/0.3 × 6
    assert kd_report.k_half([0, 1, 4], [0.9, 0.5, 0.9], initial=0.5) == pytest.approx(0.5)   # the first crossing counts
    assert kd_report.k_half([0, 2, 4], [0.9, 0.85, 0.81], initial=0.7) == math.inf            # never half lost
    assert math.isnan(kd_report.k_half([0, 2], [0.7, 0.5], initial=0.7))                      # no gain at k0
    assert [kd_report.k_half_label(v, 0, 16) for v in (2.0, math.inf, math.nan)] == [
        "2.0", "> 16", "n/a (no gain at k=0)"]


def test_k_half_trend_over_lr():
    inf, nan = math.inf, math.nan
    assert kd_report.lr_trend([5.0, 2.0, 1.0]) == kd_report.lr_trend([inf, 3.0, 1.0]) == "reproduced"
    assert kd_report.lr_trend([1.0, 3.0]) == kd_report.lr_trend([nan, 1.0, 3.0]) == "not reproduced"
    assert kd_report.lr_trend([5.0, inf]) == "not reproduced"
    assert kd_report.lr_trend([inf, inf, 1.0]) == kd_report.lr_trend([nan, 3.0, 1.0]) == "inconclusive"
    assert kd_report.lr_trend([2.0, 2.0]) == "inconclusive"


def test_gap_closed_and_the_opd_works_claim():
    df = results({"forward_kl_topk": [[0.8, 0.7], [0.8, 0.7]], "reverse_kl_recompute_tis": [[0.6, 0.8], [0.6, 0.8]]})
    gaps = kd_report.gap_closed(df)                   # initial 0.5, teacher 0.9: gap 0.4
    assert gaps["gap closed"].tolist() == pytest.approx([0.75, 0.5, 0.25, 0.75])
    assert gaps[["initial", "teacher"]].drop_duplicates().values.tolist() == [[0.5, 0.9]]
    claim = kd_report.opd_works(df)
    assert claim.startswith("OPD works at k=0: no; forward_kl_topk closes 50–75% of the gap "
                            "(every seed ≥ 40%: yes; accuracy +25.0 points, noise band ±")
    assert "reverse_kl_recompute_tis closes 25–75% of the gap (every seed ≥ 40%: no;" in claim
    works = kd_report.opd_works(results({"forward_kl_topk": [[0.8, 0.7]], "reverse_kl_recompute_tis": [[0.8, 0.8]]}))
    assert works.startswith("OPD works at k=0: yes;")
    half = kd_report.opd_works(results({"forward_kl_topk": [[0.8, 0.7]]}))
    assert half.startswith("OPD works at k=0: not tested;") and "reverse_kl_recompute_tis not in the sweep" in half
    with_topk = kd_report.opd_works(results({"forward_kl_topk": [[0.8, 0.7]], "reverse_kl_topk": [[0.9, 0.9]]}))
    assert with_topk.startswith("OPD works at k=0: not tested;")     # the top-k reverse KL does not stand in
    assert "; reverse_kl_topk (not required) closes 100% of the gap (every seed ≥ 40%: yes;" in with_topk
    report = kd_report.report(df)
    assert "| forward_kl_topk | 1 | 0.5 | 0.7 | 0.9 | 50.0% |" in report and "teacher 0.900" in report


def test_plots_of_a_single_estimator_sweep(tmp_path):
    """One estimator (seaborn's dodge divides by the number of hue levels − 1) and one staleness value."""
    df = results({"reverse_kl_topk": [[0.8, 0.7]]}, ks=(0,))
    kl_direction.plot(df, tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in FIGURES)


def test_k_half_table_and_the_lr_claim():
    stale = {3e-5: [[0.9, 0.9], [0.9, 0.9], [0.85, 0.85]],               # k½ > 8
             1e-4: [[0.9, 0.9], [0.8, 0.8], [0.5, 0.5]],                  # 2 + 0.1/0.3 × 6 = 4.0
             3e-4: [[0.9, 0.9], [0.5, 0.5], [0.5, 0.5]]}                  # 0.2/0.4 × 2 = 1.0
    df = pd.concat([results({"reverse_kl_stale": v, "forward_kl_topk": [[0.52, 0.5]] * 3}, ks=(0, 2, 8), lr=lr)
                    for lr, v in stale.items()])
    hl = kd_report.half_lives(df).set_index(["estimator", "lr"]).k_half
    assert [hl["reverse_kl_stale", lr] for lr in stale] == pytest.approx([math.inf, 4.0, 1.0])
    assert math.isnan(hl["forward_kl_topk", 1e-4])                          # +1 point is inside the noise band
    report = kd_report.report(df)
    assert "| reverse_kl_stale | 3e-05 | +40.0 points (noise band ±" in report and "| > 8 |" in report
    assert "| forward_kl_topk | 0.0001 | +1.0 points (noise band ±" in report and "| n/a (no gain at k=0) |" in report
    assert ("- Bias from stale data scales with staleness × lr (k½ falls as lr rises): reproduced for "
            "reverse_kl_stale (lr 3e-05: > 8, lr 0.0001: 4.0, lr 0.0003: 1.0).") in report
    flipped = pd.concat([results({"reverse_kl_stale": v}, ks=(0, 2, 8), lr=lr)
                         for lr, v in zip(stale, reversed(stale.values()))])
    assert "k½ falls as lr rises): not reproduced" in kd_report.report(flipped)
    single = kd_report.report(results({"forward_kl_topk": [[0.8, 0.7], [0.8, 0.7]]}))
    assert "Bias from stale data" not in single and "| estimator | k=0 gain | k½ |" in single


def test_verdicts_follow_the_numbers():
    clear = kd_report.verdicts(results({
        "forward_kl_topk": [[0.80, 0.81], [0.80, 0.79]], "reverse_kl_stale": [[0.85, 0.86], [0.60, 0.62]],
        "reverse_kl_stale_tis": [[0.85, 0.85], [0.66, 0.68]], "reverse_kl_stale_clip": [[0.84, 0.85], [0.70, 0.71]],
        "reverse_kl_recompute_tis": [[0.85, 0.86], [0.84, 0.86]]}))
    assert [v.split(":")[1].split(";")[0].strip() for v in clear] == ["reproduced"] * 3
    noisy = kd_report.verdicts(results({                                 # wide seed spread swallows every gap
        "forward_kl_topk": [[0.70, 0.90], [0.65, 0.85]], "reverse_kl_stale": [[0.70, 0.90], [0.62, 0.88]],
        "reverse_kl_recompute_tis": [[0.70, 0.90], [0.70, 0.90]]}))
    assert noisy[0].startswith("Forward KL is robust to staleness: inconclusive")
    assert "not reproduced (within seed spread)" in noisy[1] and ": inconclusive (nothing to restore" in noisy[2]
    flat = kd_report.verdicts(results({"forward_kl_topk": [[0.5, 0.5], [0.4, 0.4]]}))   # never learned
    assert "did not move the student" in flat[0] and "not tested" in flat[1]
    # accuracy flat at k=0 but the held-out KL fell: the student moved, so the claims are judged on the numbers
    kl_moved = kd_report.verdicts(results({"forward_kl_topk": [[0.5, 0.5], [0.5, 0.5]],
                                              "reverse_kl_stale": [[0.5, 0.5], [0.3, 0.31]]}, final_kl=0.8))
    assert kl_moved[0].startswith("Forward KL is robust to staleness: reproduced")
    assert kl_moved[1].startswith("Stale reverse KL degrades as staleness grows: reproduced")


@pytest.mark.parametrize("override, field", [
    ("estimators=[forward_kl_topk,no_such_preset]", "estimators"), ("staleness=[0,-1]", "staleness"),
    ("seeds=[]", "seeds"), ("workers=0", "workers"), ("scale=huge", "scale"), ("toy.lr=0", "lr"),
    ("lrs=[0.001,0.001]", "lrs"), ("lrs=[0]", "lrs"),
])
def test_invalid_settings_rejected_naming_field(override, field):
    with pytest.raises(Exception, match=field):
        composed(override)


def test_unknown_estimator_is_a_value_error_and_the_config_stays_readable():
    with pytest.raises(ValueError, match="estimators must be distinct names from conf/estimator/"):
        Config(estimators=["reverse_kl_stale", "nope"])
    assert isinstance(composed(), Config) and composed("scale=smoke").scale == "smoke"
    default, lr = composed(), composed("scale=lr")     # scale=lr: the default lr /3, ×1, ×3 (update with toy.lr)
    assert default.lrs == [] and lr.lrs == pytest.approx([default.toy.lr / 3, default.toy.lr, default.toy.lr * 3],
                                                         rel=0.02)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert len(OmegaConf.to_yaml(compose("kl_direction")).splitlines()) <= 80   # what --cfg job prints


@pytest.mark.slow
def test_sim_vs_real_smoke(tmp_path):
    """Calibrate on a tiny concurrent run, predict and run one held-out config: the files and columns are there,
    the calibration config's own prediction is sane, and the synchronous config's staleness is exactly 0 on both."""
    out = tmp_path / "out"
    tiny = ["toy.n_symbols=4", "toy.max_len=4", "toy.teacher_layers=1", "toy.teacher_width=32", "toy.teacher_steps=60",
            "toy.student_layers=1", "toy.student_width=16", "toy.student_warmup_steps=5", "toy.head_dim=8",
            "toy.sft_batch_size=32", "toy.engine_slots=16"]
    cmd = [sys.executable, "-m", "studies.sim_vs_real", "steps=12", "warmup=2", "sim_seeds=1",
           "calibration={name: cal, eta: 1, batch_size: 8, rollout_workers: 1, length_power: 1.3}",
           "configs=[{name: sync, eta: 0, batch_size: 8, rollout_workers: 1, length_power: 1.3}]",
           f"hydra.run.dir={out}", *tiny]
    env = {**os.environ, "ASYNCOPD_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    df = pd.read_csv(out / "comparison.csv")
    assert df.config.tolist() == ["cal", "sync"] and df.held_out.tolist() == [False, True]
    assert (df.measured_samples_per_s > 0).all() and (df.predicted_samples_per_s > 0).all()
    sync = df.set_index("config").loc["sync"]
    assert sync.measured_staleness_mean == sync.predicted_staleness_mean == 0 and sync.staleness_tv_distance == 0
    # synchronous: nothing dropped and the trained lengths are the generated ones, measured and predicted alike
    assert sync.measured_drop_rate == sync.predicted_drop_rate == 0
    assert sync.measured_length_bias == sync.predicted_length_bias == 0 and sync.measured_wasted_token_frac == 0
    assert set(df.columns) >= {f"{side}_{k}" for side in ("measured", "predicted")
                               for k in ("drop_rate", "length_bias", "wasted_token_frac")}
    for name in ("report.md", "comparison.png", "calibration/cluster/calibrated.yaml"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_length_bias_smoke(tmp_path):
    """One shape, η ∈ {1, 2}, drop, wait and pacing (D = 1 at η = 2), and a measured toy point per policy: wait and
    pacing never drop and show no length skew (simulated and measured), pacing's batches are fresher than wait's,
    drop never trains longer answers than it generates."""
    out = tmp_path / "out"
    env = {**os.environ, "ASYNCOPD_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "studies.length_bias", "scale=smoke", f"hydra.run.dir={out}"],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    sim = pd.read_csv(out / "results.csv")
    assert sorted(zip(sim.eta, sim.policy)) == [(1, "drop"), (1, "wait"), (2, "drop"), (2, "pace D=1"), (2, "wait")]
    keep, drop = sim[sim.policy != "drop"], sim[sim.policy == "drop"]
    assert (keep.drop_rate == 0).all() and (keep.length_bias == 0).all() and (keep.wasted_token_frac == 0).all()
    assert (drop.length_bias <= 0).all() and (drop.drop_rate > 0).all()
    assert (sim.staleness_max <= sim.eta).all()
    at2 = sim[sim.eta == 2].set_index("policy")
    assert at2.staleness_mean["pace D=1"] < at2.staleness_mean["wait"]
    toy = pd.read_csv(out / "toy" / "comparison.csv").set_index("config")
    assert list(toy.index) == ["calibration", "drop_eta2", "wait_eta2", "pace_D1_eta2"]
    for name in ("wait_eta2", "pace_D1_eta2"):
        assert toy.loc[name, "measured_drop_rate"] == toy.loc[name, "measured_length_bias"] == 0
    assert "## Claims" in (text := (out / "report.md").read_text()) and "pace D=1 at η = 2" in text
    assert (out / "length_bias.png").stat().st_size > 10_000
    train = pd.read_csv(out / "training.csv")
    assert list(zip(train.policy, train.seed)) == [("drop", 0), ("wait", 0), ("pace D=1", 0)]
    assert (train[train.policy != "drop"].wasted_token_frac == 0).all() and (train.wall_s > 0).all()
    assert (train.staleness_max <= 2).all()
