"""Studies: kl_direction end to end at scale=smoke (CLI), reuse of finished cells, honest verdicts, validation."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from studies import cells as cells_lib, kl_direction
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
    assert str(out) in first.stdout and "## Claims" in first.stdout
    for name in ("results.csv", "report.md", *FIGURES):
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

    metrics = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.csv")}
    assert len(metrics) == len(last)
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.csv")} == metrics   # no cell ran again
    assert "kl_direction cells" not in second.stderr                                       # nor did the pool start
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)


def fake_cells(cfg: Config) -> None:
    """Mark every cell of cfg finished with a two-row metrics.csv, as run_cell would leave it."""
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
    assert list(df.columns[:4]) == ["estimator", "staleness", "seed", "step"] and set(df.objective) == {"label"}
    assert "run_staleness" not in df and {c["run"].staleness for c in kl_direction.cells(cfg)} == {"fixed:0", "fixed:2"}
    assert sorted(df.staleness.unique()) == [0, 2] and set(df.estimator) == {"forward_kl_topk", "reverse_kl_stale"}
    with pytest.raises(RuntimeError, match="about to run"):                 # steps changed: not the same cells
        kl_direction.run(Config(**{**cfg.__dict__, "steps": 6}))


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


def results(final: dict[str, list[list[float]]], initial=0.5, prompts=512, final_kl=1.0) -> pd.DataFrame:
    """A results table with the given final accuracies: final[estimator] = per staleness k in (0, 8), per seed.
    The held-out KLs start at 1.0 and end at final_kl (1.0: the student did not move in KL)."""
    rows = [dict(estimator=e, staleness=k, seed=s, step=step, accuracy=acc, eval_prompts=prompts,
                 eval_forward_kl=kl, eval_reverse_kl=kl)
            for e, per_k in final.items() for k, seeds in zip((0, 8), per_k) for s, a in enumerate(seeds)
            for step, acc, kl in ((0, initial, 1.0), (100, a, final_kl))]
    return pd.DataFrame(rows)


def test_verdicts_follow_the_numbers():
    clear = kl_direction.verdicts(results({
        "forward_kl_topk": [[0.80, 0.81], [0.80, 0.79]], "reverse_kl_stale": [[0.85, 0.86], [0.60, 0.62]],
        "reverse_kl_stale_tis": [[0.85, 0.85], [0.66, 0.68]], "reverse_kl_stale_clip": [[0.84, 0.85], [0.70, 0.71]],
        "reverse_kl_recompute_tis": [[0.85, 0.86], [0.84, 0.86]]}))
    assert [v.split(":")[1].split(";")[0].strip() for v in clear] == ["reproduced"] * 3
    noisy = kl_direction.verdicts(results({                                 # wide seed spread swallows every gap
        "forward_kl_topk": [[0.70, 0.90], [0.65, 0.85]], "reverse_kl_stale": [[0.70, 0.90], [0.62, 0.88]],
        "reverse_kl_recompute_tis": [[0.70, 0.90], [0.70, 0.90]]}))
    assert noisy[0].startswith("Forward KL is robust to staleness: inconclusive")
    assert "not reproduced (within seed spread)" in noisy[1] and ": inconclusive (nothing to restore" in noisy[2]
    flat = kl_direction.verdicts(results({"forward_kl_topk": [[0.5, 0.5], [0.4, 0.4]]}))   # never learned
    assert "did not move the student" in flat[0] and "not tested" in flat[1]
    # accuracy flat at k=0 but the held-out KL fell: the student moved, so the claims are judged on the numbers
    kl_moved = kl_direction.verdicts(results({"forward_kl_topk": [[0.5, 0.5], [0.5, 0.5]],
                                              "reverse_kl_stale": [[0.5, 0.5], [0.3, 0.31]]}, final_kl=0.8))
    assert kl_moved[0].startswith("Forward KL is robust to staleness: reproduced")
    assert kl_moved[1].startswith("Stale reverse KL degrades as staleness grows: reproduced")


@pytest.mark.parametrize("override, field", [
    ("estimators=[forward_kl_topk,no_such_preset]", "estimators"), ("staleness=[0,-1]", "staleness"),
    ("seeds=[]", "seeds"), ("workers=0", "workers"), ("scale=huge", "scale"), ("toy.lr=0", "lr"),
])
def test_invalid_settings_rejected_naming_field(override, field):
    with pytest.raises(Exception, match=field):
        composed(override)


def test_unknown_estimator_is_a_value_error_and_the_config_stays_readable():
    with pytest.raises(ValueError, match="estimators must be distinct names from conf/estimator/"):
        Config(estimators=["reverse_kl_stale", "nope"])
    assert isinstance(composed(), Config) and composed("scale=smoke").scale == "smoke"
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
    for name in ("report.md", "comparison.png", "calibration/cluster/calibrated.yaml"):
        assert (out / name).stat().st_size > 0
