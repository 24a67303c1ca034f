"""Study length_inflation: smoke end to end (CLI), the monitors in every toy run, the collapse rules and the
verdicts on hand-built numbers, config validation."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from asyncopd import trace
from backends.run import run as run_backend
from studies import length_inflation as li
from studies.length_inflation import Config
from test_toy_concurrent import tiny as tiny_concurrent
from test_toy_run import tiny as tiny_lockstep

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "studies" / "length_inflation"


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("length_inflation", overrides=["cells_dir=unused", *overrides]))


@pytest.mark.slow
def test_smoke_end_to_end_then_rerun_reuses_every_cell(tmp_path):
    out, cfg = tmp_path / "out", composed("scale=smoke")
    cmd = [sys.executable, "-m", "studies.length_inflation", "scale=smoke", f"hydra.run.dir={out}"]
    env = {**os.environ, "ASYNCOPD_CACHE": str(tmp_path / "cache")}        # fresh cache: trains the tiny models
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert str(out) in first.stdout and "## Claims" in first.stdout
    for name in ("results.csv", "runs.csv", "report.md", "length_inflation_monitors.png", "length_inflation_final.png"):
        assert (out / name).stat().st_size > 0, name
    df = pd.read_csv(out / "results.csv")
    assert {"arm", "seed", "step", "accuracy", "response_len_mean", "truncation_rate", "repetition_rate",
            "mixture_frac", "eval_reverse_kl"} <= set(df.columns)
    last = df.groupby(["arm", "seed"]).step.max()
    assert set(last.index) == {(a, s) for a in li.ARMS for s in cfg.seeds} and (last == cfg.steps).all()
    trained = df[df.step > 0]
    assert (trained.groupby("arm").mixture_frac.unique().map(tuple).to_dict()
            == {"plain": (0.0,), "ref_kl": (0.0,), "mixture": (0.25,), "both": (0.25,)})
    assert trained[trained.arm.isin(["plain", "mixture"])].ref_kl.isna().all()
    assert trained[trained.arm.isin(["ref_kl", "both"])].ref_kl.notna().all()
    assert trained.truncation_rate.between(0, 1).all() and trained.repetition_rate.between(0, 1).all()
    runs = pd.read_csv(out / "runs.csv")
    assert runs.arm.tolist() == list(li.ARMS) and runs.teacher_sample_accuracy.notna().tolist() == [0, 0, 1, 1]
    report = (out / "report.md").read_text()
    assert all(f"| {a} |" in report for a in li.ARMS)

    metrics = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.csv")}
    assert len(metrics) == len(last)
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.csv")} == metrics   # no cell ran again
    assert "length_inflation cells" not in second.stderr                                   # nor did the pool start
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)


def check_monitors(metrics: pd.DataFrame, out_dir: Path) -> None:
    """Each trained step's mean response length is its learner_step event's tokens / n_seqs (the trace records
    the batch the learner took); the two StableOPD rates are present and are rates."""
    steps = trace.read(out_dir / "trace.csv").query("kind == 'learner_step'").set_index("version")
    trained = metrics[metrics.step > 0].set_index("step")
    assert len(trained) == len(steps) > 0
    np.testing.assert_allclose(trained.response_len_mean, steps.tokens / steps.n_seqs)
    for col in ("truncation_rate", "repetition_rate"):
        assert trained[col].between(0, 1).all(), col


def test_monitors_are_metrics_of_a_lockstep_run(model_cache, tmp_path):
    check_monitors(run_backend(tiny_lockstep(model_cache, steps=3), tmp_path), tmp_path)


@pytest.mark.slow
def test_monitors_are_metrics_of_a_concurrent_run(model_cache, tmp_path):
    check_monitors(run_backend(tiny_concurrent(model_cache, eta=1, steps=3), tmp_path), tmp_path)


def test_cells_set_ref_kl_and_mixture_per_arm():
    cfg = composed()                                                        # seeds [0, 1, 2, 3]
    got = {(c["arm"], c["seed"]): c["run"] for c in li.cells(cfg)}
    assert sorted(got) == sorted((a, s) for a in li.ARMS for s in (0, 1, 2, 3))
    for (a, s), rc in got.items():
        assert rc.objective.ref_kl_coef == (1.0 if a in ("ref_kl", "both") else 0.0)
        assert rc.toy.mixture_frac == (0.25 if a in ("mixture", "both") else 0.0)
        assert (rc.objective.estimator, rc.objective.signal, rc.objective.correction) == (
            "reverse_kl_sampled", "recompute", "none")
        assert rc.staleness == "fixed:0" and rc.seed == s and rc.toy.lr == 5e-3               # the high lr of the YAML
        assert rc.toy.teacher_steps == 150                                  # the weak teacher of the YAML


def metrics_table() -> pd.DataFrame:
    """Two hand-built runs, window 2: plain collapses, mixture does not."""
    steps = np.arange(7)
    nan = np.nan
    runs = {"plain": dict(trunc=[nan, 0, .2, .6, 1, 1, 1], rep=[nan, 0, 0, .3, .9, .95, .95],
                          length=[nan, 5, 5, 8, 20, 25, 25], acc=[.7, nan, .6, nan, .4, nan, 0]),
            "mixture": dict(trunc=[nan, 0, .2, .4, .2, 0, 0], rep=[nan, 0, 0, .1, 0, 0, 0],
                            length=[nan, 5, 5, 6, 5, 4, 6], acc=[.7, nan, .7, nan, .65, nan, .72])}
    frames = [pd.DataFrame(dict(arm=a, seed=0, step=steps, truncation_rate=r["trunc"], repetition_rate=r["rep"],
                                response_len_mean=r["length"], accuracy=r["acc"], eval_reverse_kl=[1, nan] * 3 + [2],
                                mixture_accuracy=[nan] + [0.9] * 6 if a == "mixture" else nan))
              for a, r in runs.items()]
    return pd.concat(frames).assign(eval_prompts=256, window=2, collapse_truncation=0.5, accuracy_drop=0.2)


def test_summarise_collapse_steps_peaks_and_finals_exact():
    runs = li.summarise(metrics_table()).set_index("arm")
    p, m = runs.loc["plain"], runs.loc["mixture"]
    # plain: 2-step mean truncation 0.1, 0.4, 0.8 (step 4) ...; accuracy 0.4 < 0.7 − 0.2 first at step 4
    assert (p.truncation_collapse_step, p.accuracy_collapse_step, p.collapsed) == (4, 4, True)
    assert (p.peak_truncation_rate, p.final_truncation_rate, p.peak_response_len_mean) == (1.0, 1.0, 25.0)
    assert p.final_repetition_rate == pytest.approx(0.95) and p.peak_repetition_rate == pytest.approx(0.95)
    assert (p.initial_accuracy, p.final_accuracy, p.min_accuracy, p.final_reverse_kl, p.eval_every) == (.7, 0, 0, 2, 2)
    assert np.isnan(p.teacher_sample_accuracy) and m.teacher_sample_accuracy == pytest.approx(0.9)
    assert np.isnan(m.truncation_collapse_step) and np.isnan(m.accuracy_collapse_step) and not m.collapsed
    assert m.peak_truncation_rate == pytest.approx(0.3) and m.final_response_len_mean == 5.0
    assert li.first_step(pd.Series([3, 5, 7]), pd.Series([False, True, True])) == 5


def runs_table(rows: dict[str, list[tuple]]) -> pd.DataFrame:
    """rows[arm] = per seed (final accuracy, truncation collapse step, accuracy collapse step); nan = never."""
    return pd.DataFrame([dict(arm=a, seed=s, final_accuracy=acc, truncation_collapse_step=t, accuracy_collapse_step=d,
                              collapsed=not np.isnan(t), initial_accuracy=0.7, min_accuracy=min(acc, 0.4),
                              final_truncation_rate=0.9 if t == t else 0.05 * (s + 1), final_repetition_rate=0.8,
                              final_response_len_mean=20.0, eval_prompts=256, eval_every=10, window=5)
                         for a, per_seed in rows.items() for s, (acc, t, d) in enumerate(per_seed)])


def test_verdicts_follow_the_numbers():
    nan = np.nan
    clear = li.verdicts(runs_table({"plain": [(0.0, 100, 20), (0.0, 40, 10)],
                                    "ref_kl": [(0.05, nan, nan), (0.0, nan, nan)],
                                    "mixture": [(0.60, nan, nan), (0.61, nan, nan)],
                                    "both": [(0.62, nan, nan), (0.62, nan, nan)]}))
    assert [v.split(":")[1].split(";")[0].strip() for v in clear] == [
        "reproduced", "accuracy collapsed first, lengths inflated later (not the paper's order)",
        "partly reproduced (truncation lower, accuracy within noise)", "reproduced", "reproduced",
        "plain -70.0 points (band ±6.0), ref_kl -67.5 points (band ±6.0), mixture -9.5 points (band ±6.0), both -8.0 "
        "points (band ±5.9).", "inconclusive (within noise)"]   # plain's band: 2·sqrt(0.35·0.65/256) = 0.0596
    assert clear[1].endswith("s0 (20, 100), s1 (10, 40).")        # ref_kl never fell: no high-lr note
    assert "final truncation 0.08 vs plain 0.90" in clear[3] and "collapse level 0/2 vs plain 2/2" in clear[3]
    calm = li.verdicts(runs_table({"plain": [(0.7, nan, nan)] * 2, "mixture": [(0.7, nan, nan)] * 2}))
    assert calm[0].split(":")[1].startswith(" not reproduced") and len(calm) == 3
    assert "inconclusive (nothing to prevent" in calm[1]
    assert calm[2] == ("Final accuracy vs the initial student (0.700): plain +0.0 points (band ±5.7), "
                       "mixture +0.0 points (band ±5.7).")
    worse = li.verdicts(runs_table({"plain": [(0.3, 50, nan)] * 2, "ref_kl": [(0.3, 60, nan), (0.5, nan, nan)]}))
    assert "partly reproduced" in worse[0] and ": not reproduced;" in worse[1] and len(worse) == 3
    shock = li.verdicts(runs_table({"plain": [(0.3, 11, 5)] * 2, "mixture": [(0.6, nan, 5)] * 2}))
    assert shock[1].startswith("Order of the two collapses in plain OPD: together (within 14 steps")
    assert shock[1].endswith("(first at step 5, lowest 0.400, final >= 0.600): part of the early drop is the high "
                             "lr itself.")
    assert li.verdicts(runs_table({"mixture": [(0.7, nan, nan)]})) == [
        "All claims: not tested (arm plain is not in the sweep)."]


@pytest.mark.parametrize("override, field", [
    ("arms=[plain,nope]", "arms"), ("estimator=nope", "estimator"), ("seeds=[]", "seeds"),
    ("ref_kl_coef=0", "ref_kl_coef"), ("mixture_frac=0", "mixture_frac"), ("mixture_frac=1.0", "mixture_frac"),
    ("mixture_frac=0.001", "toy.mixture_frac"), ("collapse_truncation=0", "collapse_truncation"),
    ("accuracy_drop=1", "accuracy_drop"), ("toy.lr=0", "lr"), ("toy.mixture_frac=0.25", "toy.mixture_frac"),
    ("scale=huge", "scale"), ("workers=0", "workers"), ("window=0", "window"),
])
def test_invalid_settings_rejected_naming_field(override, field):
    with pytest.raises(Exception, match=field):
        composed(override)


def test_config_composes_and_stays_readable():
    assert isinstance(composed(), Config) and composed("scale=smoke").toy.batch_size == 8
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert len(OmegaConf.to_yaml(compose("length_inflation")).splitlines()) <= 80   # what --cfg job prints
