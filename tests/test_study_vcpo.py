"""studies.vcpo: smoke run end to end (CLI), the arms' wiring, the per-run summary, the verdicts, validation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from studies import vcpo
from studies.vcpo import Config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "studies" / "vcpo"


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("vcpo", overrides=["cells_dir=unused", *overrides]))


@pytest.mark.slow
def test_vcpo_smoke_end_to_end(tmp_path):
    out, cfg = tmp_path / "out", composed("scale=smoke")
    env = {**os.environ, "ASYNCOPD_CACHE": str(tmp_path / "cache")}        # fresh cache: trains the tiny models
    p = subprocess.run([sys.executable, "-m", "studies.vcpo", "scale=smoke", f"hydra.run.dir={out}"], env=env,
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("results.csv", "runs.csv", "report.md", "vcpo_training.png", "vcpo_final.png"):
        assert (out / name).stat().st_size > 0, name
    df, runs = pd.read_csv(out / "results.csv"), pd.read_csv(out / "runs.csv")
    assert {"arm", "staleness", "seed", "step", "accuracy", "eval_reverse_kl", "grad_norm", "ess_frac",
            "rho_ess_frac", "lr"} <= set(df.columns)
    assert sorted(zip(runs.arm, runs.seed)) == sorted((a, s) for a in cfg.arms for s in cfg.seeds)
    assert (df.groupby(["arm", "seed"]).step.max() == cfg.steps).all()
    trained = df[df.step > 0]
    none, both = trained[trained.arm == "none"], trained[trained.arm == "vcpo"]
    assert (none.lr == cfg.toy.lr).all() and none.baseline.isna().all()          # plain stale reverse KL
    assert np.allclose(both.lr, cfg.toy.lr * both.ess_frac) and both.baseline.notna().all()   # both VCPO parts on
    assert (both.ess_frac < 1).any() and both.rho_ess_frac.between(0, 1 + 1e-6).all()
    done = json.loads((out / "cells" / f"vcpo_k{cfg.staleness[0]}_s0" / "done.json").read_text())["config"]
    objective = done["objective"]
    assert done["toy"]["vcpo_lr"] and (objective["baseline"], objective["correction"]) == ("vcpo", "tis")
    report = (out / "report.md").read_text()
    assert "## Claims" in report and all(f"| {a} | {cfg.staleness[0]} |" in report for a in cfg.arms)


def test_arms_map_to_presets_and_learner_settings():
    cfg = Config(staleness=[8], seeds=[3], steps=5, cells_dir="c")
    by_arm = {c["arm"]: c["run"] for c in vcpo.cells(cfg)}
    assert list(by_arm) == list(vcpo.ARMS)
    got = {a: (r.objective.correction, r.objective.baseline, r.toy.vcpo_lr, r.objective.signal, r.staleness, r.seed)
           for a, r in by_arm.items()}
    assert got == {"none": ("none", "none", False, "stale", "fixed:8", 3),
                   "tis": ("tis", "none", False, "stale", "fixed:8", 3),
                   "clip": ("clip", "none", False, "stale", "fixed:8", 3),
                   "vcpo_lr": ("tis", "none", True, "stale", "fixed:8", 3),
                   "vcpo_baseline": ("tis", "vcpo", False, "stale", "fixed:8", 3),
                   "vcpo": ("tis", "vcpo", True, "stale", "fixed:8", 3)}
    assert by_arm["tis"].objective.is_cap == by_arm["vcpo"].objective.is_cap == 2.0   # the same TIS under VCPO
    assert len({c["digest"] for c in vcpo.cells(cfg)}) == 6


def metrics_table(acc, kl, ess, grad, arm="none", k=8, seed=0, drop=0.1, ratio=2.0):
    """Rows as run() returns them: evals (accuracy, reverse KL) at steps 0, 2, 4; training metrics at 1..4."""
    rows = [dict(step=t, accuracy=acc.get(t, np.nan), eval_reverse_kl=kl.get(t, np.nan),
                 rho_ess_frac=np.nan if t == 0 else ess[t - 1], ess_frac=np.nan if t == 0 else 1.0,
                 grad_norm=np.nan if t == 0 else grad[t - 1], lr=np.nan if t == 0 else 1e-4)
            for t in range(5)]
    return pd.DataFrame(rows).assign(arm=arm, staleness=k, seed=seed, eval_prompts=512,
                                     collapse_accuracy_drop=drop, collapse_kl_ratio=ratio)


def test_summarise_applies_the_collapse_rule_and_reduces_over_steps():
    df = pd.concat([
        metrics_table({0: 0.74, 2: 0.70, 4: 0.66}, {0: 2.0, 2: 2.5, 4: 3.9}, [1, 0.9, 0.8, 0.7], [1, 2, 3, 4]),
        metrics_table({0: 0.74, 4: 0.60}, {0: 2.0, 4: 2.0}, [1, 1, 1, 1], [2, 2, 2, 2], seed=1),   # −14 points
        metrics_table({0: 0.74, 4: 0.74}, {0: 2.0, 4: 4.0}, [1, 1, 1, 1], [2, 2, 2, 2], seed=2),   # KL doubled
        metrics_table({0: 0.74, 4: 0.60}, {0: 2.0, 4: 2.0}, [1, 1, 1, 1], [2, 2, 2, 2], seed=3, drop=0.2),
    ])
    runs = vcpo.summarise(df).set_index("seed")
    assert runs.collapsed.tolist() == [False, True, True, False]       # seed 0: −8 points, KL ×1.95
    r = runs.loc[0]
    assert (r.initial_accuracy, r.final_accuracy, r.initial_reverse_kl, r.final_reverse_kl) == (0.74, 0.66, 2.0, 3.9)
    assert r.rho_ess_mean == pytest.approx(0.85) and r.rho_ess_min == pytest.approx(0.7)
    assert r.rho_ess_early == pytest.approx(0.95)                          # steps 1 and 2 of 4
    assert r.grad_norm_var == pytest.approx(5 / 3) and r.grad_norm_cv == pytest.approx(np.sqrt(5 / 3) / 2.5)
    assert runs.loc[1].grad_norm_var == 0.0 and r.lr_mean == pytest.approx(1e-4)


ARMS4 = ("none", "tis", "clip", "vcpo")


def runs_table(final: dict[str, list[float]], collapsed: dict[str, list[bool]], ess=None, k=16) -> pd.DataFrame:
    """A runs table at one k: final accuracies and collapse flags per arm and seed; grad-norm variance 1 (vcpo 0.5)."""
    return pd.DataFrame([dict(arm=a, staleness=k, seed=s, final_accuracy=acc, collapsed=collapsed[a][s],
                              rho_ess_early=(ess or {}).get(a, [0.9] * 3)[s], ess_mean=0.95, eval_prompts=512,
                              grad_norm_var=0.5 if a == "vcpo" else 1.0)
                         for a, accs in final.items() for s, acc in enumerate(accs)])


def test_verdicts_follow_the_numbers():
    clear = vcpo.verdicts(pd.concat([runs_table(                        # k = 8: no separation; k = 16: clear win
        {a: [0.70, 0.72, 0.74] for a in ("none", "tis", "clip", "vcpo")}, {a: [False] * 3 for a in ARMS4}, k=8),
        runs_table({"none": [0.30, 0.35, 0.40], "tis": [0.60, 0.62, 0.64], "clip": [0.55, 0.58, 0.60],
                    "vcpo": [0.72, 0.73, 0.74]},
                   {"none": [True] * 3, "tis": [False] * 3, "clip": [True, False, False], "vcpo": [False] * 3},
                   ess={"none": [0.5, 0.6, 0.55], "clip": [0.7, 0.9, 0.9]})]))
    assert clear[0] == "No correction collapses at large staleness: reproduced; collapsed seeds k=8: 0/3, k=16: 3/3."
    assert clear[1].startswith("Runs that collapse had the lower ESS in the first half of training: reproduced "
                               "(no overlap); ESS/N of ρ 0.588 (collapsed, n=4) vs 0.900 (not, n=20)")   # 2.35/4
    assert clear[2].startswith("vcpo beats none/tis/clip (final accuracy, no more collapses): k=8 inconclusive "
                               "(within seed spread or noise band), k=16 reproduced; collapsed seeds k=8: 0/3, "
                               "k=16: 0/3")
    assert "vs none at k=16: +38.0 points (band ±" in clear[2]
    assert clear[2].endswith("at k=16: Var(grad norm) ×0.50 vs none, ×0.50 vs tis, ×0.50 vs clip; "
                             "lr × ESS/N of its weights = ×0.950 on average.")
    assert clear[3].endswith("not tested (arms missing).") and clear[4].endswith("not tested (arms missing).")
    noisy = vcpo.verdicts(runs_table(                                    # seed ranges overlap: no call
        {"none": [0.70, 0.72, 0.74], "tis": [0.60, 0.70, 0.75], "vcpo": [0.65, 0.72, 0.76]},
        {"none": [False] * 3, "tis": [False] * 3, "vcpo": [False] * 3}))
    assert noisy[0].startswith("No correction collapses at large staleness: not reproduced")
    assert noisy[1].startswith("Runs that collapse had the lower ESS in the first half of training: not tested")
    assert ": k=16 inconclusive (within seed spread or noise band)" in noisy[2]
    worse = vcpo.verdicts(runs_table(                                    # vcpo_lr collapses more often than tis
        {"tis": [0.70, 0.71, 0.72], "vcpo_lr": [0.70, 0.71, 0.72]},
        {"tis": [False] * 3, "vcpo_lr": [True, False, False]}))
    assert worse[3].startswith("vcpo_lr beats tis (final accuracy, no more collapses): k=16 not reproduced")
    assert worse[3].endswith("at k=16: Var(grad norm) ×1.00 vs tis; lr × ESS/N of its weights = ×0.950 on average.")


@pytest.mark.parametrize("override, field", [
    ("arms=[none,no_such_arm]", "arms"), ("staleness=[8,-1]", "staleness"), ("seeds=[]", "seeds"),
    ("collapse_accuracy_drop=0", "collapse_accuracy_drop"), ("collapse_kl_ratio=1.0", "collapse_kl_ratio"),
    ("workers=0", "workers"), ("toy.lr=0", "lr"), ("toy.vcpo_lr=true", "vcpo_lr"), ("scale=huge", "scale"),
])
def test_invalid_settings_rejected_naming_field(override, field):
    with pytest.raises(Exception, match=field):
        composed(override)


def test_config_composes_readably():
    assert composed().arms == list(vcpo.ARMS) and composed("scale=smoke").scale == "smoke"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert len(OmegaConf.to_yaml(compose("vcpo")).splitlines()) <= 80
