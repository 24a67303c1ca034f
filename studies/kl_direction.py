"""The headline study: how do the KL direction and the estimator change what staleness costs in OPD?

Question
    The AsyncOPD seeds claim (1) forward KL (teacher-weighted) is robust to staleness, (2) reverse KL with the
    stale behaviour signal log π_T − log π_β degrades as staleness grows, and (3) recomputing log π_θ at
    learner time restores it and beats the usual async-RL stabilisers (TIS, PPO clip). This measures them.
Covers
    estimator presets (conf/estimator/) × fixed staleness k (every batch from weights exactly k versions old)
    × seeds, on the toy backend's lockstep run. Every cell shares the teacher, the warmed-up student, lr and
    steps; all are judged on held-out greedy accuracy and exact held-out reverse KL to the teacher. Left out:
    wall-clock async (lockstep staleness is exact, not timed) and lr tuning per estimator.
How to run
    python -m studies.kl_direction                  # ~13 min on 2 CPU cores (+~3.5 min to train the teacher once)
    python -m studies.kl_direction scale=smoke      # the same pipeline, tiny task and models, < 1 min
    python -m studies.kl_direction hydra.run.dir=outputs/kl_direction/<run>   # resume: finished cells reused
    python -m studies.kl_direction toy.lr=3e-5 'staleness=[0,4,8,16]'        # lr × k is the knob
    → Hydra's run folder: results.csv (cell × step), accuracy_vs_staleness.png, reverse_kl_vs_staleness.png,
      learning_curves.png, report.md; each cell's run in cells/<estimator>_k<k>_s<seed>/ (done.json when finished).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd.scheduler import SchedulerConfig
from backends import toy
from backends.run import RunConfig
from studies import cells as cells_lib
from studies.cells import PRESETS, compare, markdown, preset

plt.switch_backend("Agg")

FORWARD, STALE, STABILISERS = "forward_kl_topk", "reverse_kl_stale", ("reverse_kl_stale_tis", "reverse_kl_stale_clip")
RECOMPUTE = ("reverse_kl_recompute_tis", "reverse_kl_recompute")   # the seeds' surrogate, then the no-ratio ablation


@dataclass
class Config:
    estimators: list[str] = field(default_factory=lambda: [FORWARD, STALE, *STABILISERS, *RECOMPUTE, "reverse_kl_mc"])
    staleness: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])   # fixed k per cell, >= 0
    seeds: list[int] = field(default_factory=lambda: [0, 1])   # prompts and sampling; the models are shared
    steps: int = 150                     # learner steps per cell, the same for every cell
    workers: int = 2                     # cells run in parallel, one single-threaded process each
    scale: str = "default"               # default | smoke (set by the `scale` config group)
    cells_dir: str = "cells"             # one folder per cell; the YAML puts it in Hydra's run folder
    toy: toy.ToyConfig = field(default_factory=toy.ToyConfig)   # task, models, batch, lr, evals: every cell's

    def __post_init__(self):
        e = list(self.estimators)
        if not e or len(set(e)) < len(e) or set(e) - set(PRESETS):
            raise ValueError(f"estimators must be distinct names from conf/estimator/ {PRESETS}, got {e!r}")
        cells_lib.check_distinct_ints(self, ("staleness", "seeds"))
        for name, ok, rule in (("steps", self.steps >= 1, ">= 1"), ("workers", self.workers >= 1, ">= 1"),
                               ("scale", self.scale in ("default", "smoke"), "default or smoke")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


ConfigStore.instance().store(name="kl_direction_schema", node=Config)


def cells(cfg: Config) -> list[dict]:
    """The sweep, one dict per cell: its labels, its RunConfig, its folder and the digest its done.json must hold."""
    out = []
    for e, k, s in itertools.product(cfg.estimators, cfg.staleness, cfg.seeds):
        rc = RunConfig(staleness=SchedulerConfig(fixed_staleness=k).spec, steps=cfg.steps, seed=s, toy=cfg.toy,
                       objective=preset(e))
        out.append(cells_lib.cell(rc, Path(cfg.cells_dir) / f"{e}_k{k}_s{s}", estimator=e, staleness=k, seed=s))
    return out


def run(cfg: Config) -> pd.DataFrame:
    """Run the cells not yet done (in parallel), then return every cell's metrics as one tidy table."""
    df = cells_lib.run_all(cells(cfg), cfg.toy, workers=cfg.workers, desc="kl_direction cells")
    df = df.drop(columns="run_staleness").assign(eval_prompts=cfg.toy.eval_prompts)   # run_staleness: "fixed:k"
    first = ["estimator", "staleness", "seed", "step"]
    return df[first + [c for c in df.columns if c not in first]]


def plot(df: pd.DataFrame, out_dir: Path) -> None:
    """Final accuracy and final held-out reverse KL vs k (bars: min–max over seeds), and learning curves."""
    sns.set_theme(style="whitegrid")
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)   # quiet: integer k on a categorical axis
    final, initial = df[df.step == df.step.max()], df[df.step == 0].accuracy.mean()
    for y, name, label in (("accuracy", "accuracy_vs_staleness.png", "final held-out greedy accuracy"),
                           ("eval_reverse_kl", "reverse_kl_vs_staleness.png", "final held-out KL(π_θ‖π_T)/token")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        sns.pointplot(final, x="staleness", y=y, hue="estimator", errorbar=("pi", 100), dodge=0.4, ax=ax)
        if y == "accuracy":
            ax.axhline(initial, ls="--", c="gray", label="initial student")
        ax.set(xlabel="staleness k (weight versions)", ylabel=label)
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
    curves = df[df.accuracy.notna()]
    g = sns.relplot(curves, x="step", y="accuracy", hue="estimator", col="staleness", kind="line",
                    errorbar=("pi", 100), col_wrap=min(3, curves.staleness.nunique()), height=3, aspect=1.2)
    g.set_titles("k = {col_name}").set_axis_labels("learner step", "held-out accuracy")
    g.savefig(out_dir / "learning_curves.png", dpi=120)
    plt.close(g.figure)


def moved(df: pd.DataFrame, e: str, k) -> bool:
    """Did estimator e at staleness k move the student toward the teacher? Held-out forward or reverse KL of
    every seed below every seed's initial value (accuracy alone can stay flat in a short run)."""
    final, init = df[df.step == df.step.max()], df[df.step == 0].groupby("seed").first()
    cell = final[(final.estimator == e) & (final.staleness == k)]
    return any(cell[c].max() < init[c].min() for c in ("eval_forward_kl", "eval_reverse_kl"))


def verdicts(df: pd.DataFrame) -> list[str]:
    """One line per claim, each decided from the numbers: a gap inside its noise band never counts as an effect."""
    final, n = df[df.step == df.step.max()], int(df.eval_prompts.iloc[0])
    k0, kmax, ests = df.staleness.min(), df.staleness.max(), set(df.estimator)
    acc = lambda e, k: final[(final.estimator == e) & (final.staleness == k)].accuracy.to_numpy()  # noqa: E731
    pts = lambda c: f"{100 * c[0]:+.1f} points (noise band ±{100 * c[1]:.1f})"  # noqa: E731
    if k0 == kmax:
        return ["All claims: not tested (the sweep has a single staleness value)."]
    init = df[df.step == 0].groupby("seed").accuracy.first().to_numpy()
    learned = {e: compare(acc(e, k0), init, n)[2] > 0 or moved(df, e, k0) for e in ests}
    drop = {e: compare(acc(e, kmax), acc(e, k0), n) for e in ests}        # accuracy change from k0 to kmax
    untestable = lambda e: (f"not tested ({e} is not in the sweep)" if e not in ests else  # noqa: E731
                            "" if learned[e] else f"inconclusive ({e} did not move the student at k={k0})")
    stale_degrades = not untestable(STALE) and drop[STALE][2] < 0
    out = ["Forward KL is robust to staleness: " + (untestable(FORWARD) or (
        "not reproduced" if drop[FORWARD][2] < 0 else "reproduced" if stale_degrades else
        f"inconclusive (flat, but the positive control {STALE} did not degrade or was not run)")
        + f"; k={k0}→{kmax} changes accuracy {pts(drop[FORWARD])}")]
    word = {-1: "reproduced", 0: "not reproduced (within seed spread)", 1: "not reproduced (it improves)"}
    per_k = ", ".join(f"k={k}: {acc(STALE, k).mean():.3f}" for k in sorted(df.staleness.unique()) if STALE in ests)
    out.append("Stale reverse KL degrades as staleness grows: " + (untestable(STALE) or (
        f"{word[drop[STALE][2]]}; k={k0}→{kmax} changes accuracy {pts(drop[STALE])} ({per_k})")))
    for r in [e for e in RECOMPUTE if e in ests]:
        claim = f"Recompute ({r}) restores stale reverse KL and beats TIS/clip"
        if not stale_degrades:
            out.append(f"{claim}: inconclusive (nothing to restore: {STALE} did not measurably degrade)")
            continue
        restores = learned[r] and drop[r][2] >= 0 and compare(acc(r, kmax), acc(STALE, kmax), n)[2] > 0
        vs = {s: compare(acc(r, kmax), acc(s, kmax), n) for s in STABILISERS if s in ests}
        signs = [v[2] for v in vs.values()]
        word = ("not reproduced" if not restores or -1 in signs else
                "restoring reproduced, beating the stabilisers not tested" if not signs else
                "reproduced" if all(s > 0 for s in signs) else "inconclusive (within seed spread)")
        out.append(f"{claim}: {word}; restores at k={kmax}: {'yes' if restores else 'no'} (k={k0}→{kmax} "
                   f"{pts(drop[r])})" + "".join(f"; vs {s} at k={kmax}: {pts(v)}" for s, v in vs.items()))
    return [line + "." for line in out]


def report(df: pd.DataFrame) -> str:
    """report.md: the findings table, a fairness check at the lowest k, and the claims in plain language."""
    final, n, k0, steps = df[df.step == df.step.max()], int(df.eval_prompts.iloc[0]), df.staleness.min(), df.step.max()
    t = final.groupby(["estimator", "staleness"], sort=False).agg(**{
        "final accuracy": ("accuracy", "mean"), "seed min": ("accuracy", "min"), "seed max": ("accuracy", "max"),
        "reverse KL": ("eval_reverse_kl", "mean"), "forward KL": ("eval_forward_kl", "mean"),
        "train resp. len": ("response_len_mean", "mean"), "truncation": ("truncation_rate", "mean")}).reset_index()
    at_k0 = t[t.staleness == k0].set_index("estimator")["final accuracy"]
    t.insert(5, f"Δ vs k={k0}", t["final accuracy"] - t.estimator.map(at_k0))
    init = df[df.step == 0].groupby("seed").accuracy.first()
    fair = [(e, a.to_numpy()) for e, a in final[final.staleness == k0].groupby("estimator", sort=False).accuracy]
    kl0 = df[df.step == 0].groupby("seed")[["eval_forward_kl", "eval_reverse_kl"]].first().mean()
    klk = final[final.staleness == k0].groupby("estimator", sort=False)[["eval_forward_kl", "eval_reverse_kl"]].mean()
    fairness = pd.DataFrame([(e, init.mean(), a.mean(), {1: "yes", 0: "within noise", -1: "no, worse"}[c[2]] +
                              f" ({100 * c[0]:+.1f} points, band ±{100 * c[1]:.1f})",
                              f"{kl0.eval_forward_kl:.3f} → {klk.loc[e].eval_forward_kl:.3f}",
                              f"{kl0.eval_reverse_kl:.3f} → {klk.loc[e].eval_reverse_kl:.3f}",
                              "yes" if moved(df, e, k0) else "no")
                             for e, a in fair for c in [compare(a, init.to_numpy(), n)]],
                            columns=["estimator", "initial accuracy", "final accuracy", "accuracy improved",
                                     "forward KL", "reverse KL", "moved toward teacher"])
    return "\n".join([
        "# kl_direction: what staleness costs per KL direction and estimator", "",
        f"{df.estimator.nunique()} estimators × k ∈ {sorted(df.staleness.unique().tolist())} × seeds "
        f"{sorted(df.seed.unique().tolist())}, {steps} learner steps, lr {df.lr.iloc[-1]:g}; held-out greedy accuracy "
        f"on {n} prompts, exact per-token KL to the teacher at step {steps}. Initial accuracy {init.mean():.3f}.", "",
        "## Findings (final step; mean over seeds)", "", markdown(t), "",
        f"## Fairness: does k={k0} move the student for every estimator?", "",
        "The student must actually move within k steps, or staleness could not matter. Moving means its held-out "
        "KL to the teacher (either direction) ends below its initial value for every seed; accuracy is shown beside it.", "",
        markdown(fairness), "",
        "## Claims", "", *[f"- {v}" for v in verdicts(df)], "",
        "A gap counts only when the seed ranges do not overlap and it exceeds two binomial standard errors of one "
        "held-out evaluation (the band). With two seeds this is a rough test; more seeds sharpen it.", ""])


@hydra.main(version_base="1.3", config_path="../conf/studies/kl_direction", config_name="kl_direction")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    df = run(cfg)
    df.to_csv(out_dir / "results.csv", index=False)
    plot(df, out_dir)
    (out_dir / "report.md").write_text(text := report(df))
    print(text)
    print(f"results.csv, report.md and figures in {out_dir}")


if __name__ == "__main__":
    main()
