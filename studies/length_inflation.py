"""StableOPD's length inflation: does plain OPD fall into truncation collapse, and what stops it?

Question
    Luo et al. 2026 ("Demystifying OPD", arXiv 2604.08527, StableOPD) find that on-policy distillation can
    undergo abrupt length inflation: rollouts lengthen, truncated and repetitive trajectories dominate the
    batch, validation accuracy collapses. Their fixes are a divergence constraint to the reference (initial)
    student and rollout mixture distillation (non-student rollouts mixed into the batch). This runs plain
    OPD, each fix alone and both together, and monitors truncation rate, 3-gram repetition and mean length.
Covers
    arms (ARMS: objective.ref_kl_coef on or off × toy.mixture_frac on or off) × seeds, on the toy backend's
    lockstep run with no staleness and the 1-sample reverse-KL estimator (per-token advantage
    log π_T − log π_θ, the OPD objective of the paper). The collapse condition (YAML): a weak teacher
    (toy.teacher_steps = 150) that, like an LLM teacher, tends to keep repeating once a response repeats,
    and a high toy.lr (5e-3). The default 99%-accurate teacher stops such loops; with it plain OPD inflated only
    at lr 1e-2, after accuracy had already collapsed. The mixture rollouts are the teacher's own T = 1
    samples of the batch's last prompts, trained on with the same loss (the paper mixes in high-quality
    "golden" responses; its exact recipe was not available here, see docs/length_inflation_conditions.md).
    Per run: the truncation collapse (first step whose `window`-step mean truncation rate reaches
    `collapse_truncation`), the accuracy collapse (first evaluation more than `accuracy_drop` below the
    initial student), the monitors over the last `window` steps, and final held-out accuracy. Left out:
    staleness, lr tuning per arm, and the conditions search itself (docs/length_inflation_conditions.md).
How to run
    python -m studies.length_inflation               # 3 min on 2 idle CPU cores (+ ~20 s to train the weak teacher once)
    python -m studies.length_inflation scale=smoke   # tiny task and models, < 1 min with a fresh cache
    python -m studies.length_inflation hydra.run.dir=outputs/length_inflation/<run>   # finished cells reused
    python -m studies.length_inflation toy.lr=1e-2 toy.teacher_steps=1500 steps=150   # the strong teacher, lr 1e-2
    → results.csv (cell × step), runs.csv (one row per run), length_inflation_monitors.png,
      length_inflation_final.png, report.md; each cell in cells/<arm>_s<seed>/.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd.config import check_finite
from asyncopd.scheduler import SchedulerConfig
from backends import toy
from backends.run import RunConfig
from studies import cells as cells_lib
from studies.cells import PRESETS, compare, markdown, preset

plt.switch_backend("Agg")

ARMS = {"plain": (False, False), "ref_kl": (True, False), "mixture": (False, True), "both": (True, True)}
MONITORS = ("response_len_mean", "truncation_rate", "repetition_rate")


@dataclass
class Config:
    arms: list[str] = field(default_factory=lambda: list(ARMS))   # distinct keys of ARMS: (ref KL, mixture)
    estimator: str = "reverse_kl_recompute"   # preset of conf/estimator/ every arm trains with
    ref_kl_coef: float = 1.0             # objective.ref_kl_coef of the ref_kl and both arms, > 0
    mixture_frac: float = 0.25           # toy.mixture_frac of the mixture and both arms, in (0, 1)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])     # prompts and sampling; the models are shared
    steps: int = 100                     # learner steps per cell, >= 1
    window: int = 5                      # steps averaged by the collapse rule and the final monitors, >= 1
    collapse_truncation: float = 0.5     # truncation collapse: window-mean truncation rate >= this, in (0, 1]
    accuracy_drop: float = 0.2           # accuracy collapse: held-out accuracy < initial − this, in (0, 1)
    workers: int = 2                     # cells run in parallel, one single-threaded process each
    scale: str = "default"               # default | smoke (set by the `scale` config group)
    cells_dir: str = "cells"             # one folder per cell; the YAML puts it in Hydra's run folder
    toy: toy.ToyConfig = field(default_factory=toy.ToyConfig)   # task, models, batch, lr, evals; mixture_frac per arm

    def __post_init__(self):
        check_finite(self)
        a = list(self.arms)
        if not a or len(set(a)) < len(a) or set(a) - set(ARMS):
            raise ValueError(f"arms must be distinct names from {tuple(ARMS)}, got {a!r}")
        if self.estimator not in PRESETS:
            raise ValueError(f"estimator must name a preset of conf/estimator/, got {self.estimator!r}")
        cells_lib.check_distinct_ints(self, ("seeds",))
        for name, ok, rule in (("ref_kl_coef", self.ref_kl_coef > 0, "> 0"),
                               ("mixture_frac", 0 < self.mixture_frac < 1, "in (0, 1)"),
                               ("steps", self.steps >= 1, ">= 1"), ("window", self.window >= 1, ">= 1"),
                               ("collapse_truncation", 0 < self.collapse_truncation <= 1, "in (0, 1]"),
                               ("accuracy_drop", 0 < self.accuracy_drop < 1, "in (0, 1)"),
                               ("workers", self.workers >= 1, ">= 1"),
                               ("scale", self.scale in ("default", "smoke"), "default or smoke")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.toy.mixture_frac:
            raise ValueError("toy.mixture_frac must be 0: the mixture arms set it from mixture_frac (ARMS)")
        replace(self.toy, mixture_frac=self.mixture_frac)        # raises if it rounds to no teacher rollout


ConfigStore.instance().store(name="length_inflation_schema", node=Config)


def cells(cfg: Config) -> list[dict]:
    """One cell per arm × seed: the estimator preset, plus the arm's reference KL and rollout mixture."""
    out = []
    for a, s in itertools.product(cfg.arms, cfg.seeds):
        ref_kl, mixture = ARMS[a]
        objective = replace(preset(cfg.estimator), ref_kl_coef=cfg.ref_kl_coef if ref_kl else 0.0)
        rc = RunConfig(staleness=SchedulerConfig(fixed_staleness=0).spec, steps=cfg.steps, seed=s,
                       objective=objective, toy=replace(cfg.toy, mixture_frac=cfg.mixture_frac if mixture else 0.0))
        out.append(cells_lib.cell(rc, Path(cfg.cells_dir) / f"{a}_s{s}", arm=a, seed=s))
    return out


def run(cfg: Config) -> pd.DataFrame:
    """Run the cells not yet done (in parallel); every cell's metrics as one table, with the collapse rules."""
    df = cells_lib.run_all(cells(cfg), cfg.toy, workers=cfg.workers, desc="length_inflation cells")
    df = (df.drop(columns="staleness")                                   # "fixed:0" in every cell
          .assign(eval_prompts=cfg.toy.eval_prompts, window=cfg.window, collapse_truncation=cfg.collapse_truncation,
                  accuracy_drop=cfg.accuracy_drop))
    first = ["arm", "seed", "step"]
    return df[first + [c for c in df.columns if c not in first]]


def first_step(steps: pd.Series, hit: pd.Series) -> float:
    """The first step where `hit` is true, NaN if never (steps and hit aligned, in step order)."""
    return float(steps[hit.to_numpy()].iloc[0]) if hit.any() else float("nan")


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: initial and final held-out accuracy and reverse KL; truncation_collapse_step (first step
    whose rolling `window`-step mean truncation rate >= collapse_truncation) and accuracy_collapse_step (first
    evaluation below initial − accuracy_drop), NaN if none; the monitors' peak window mean and their mean over
    the last `window` steps; the teacher samples' accuracy (mixture arms)."""
    rows = []
    for (a, s), r in df.sort_values("step", kind="stable").groupby(["arm", "seed"], sort=False):
        ev, tr, c = r.dropna(subset=["accuracy"]), r[r.step > 0], r.iloc[0]
        w = int(c.window)
        rolled = tr[list(MONITORS)].rolling(w, min_periods=w).mean()
        acc0 = ev.accuracy.iloc[0]
        rows.append(dict(
            arm=a, seed=s, initial_accuracy=acc0, final_accuracy=ev.accuracy.iloc[-1],
            min_accuracy=ev.accuracy.min(), final_reverse_kl=ev.eval_reverse_kl.iloc[-1],
            truncation_collapse_step=first_step(tr.step, rolled.truncation_rate >= c.collapse_truncation),
            accuracy_collapse_step=first_step(ev.step, ev.accuracy < acc0 - c.accuracy_drop),
            **{f"peak_{m}": rolled[m].max() for m in MONITORS},
            **{f"final_{m}": tr[m].iloc[-w:].mean() for m in MONITORS},
            teacher_sample_accuracy=tr.mixture_accuracy.mean() if "mixture_accuracy" in tr else float("nan"),
            eval_prompts=c.eval_prompts, eval_every=int(ev.step.diff().min()) if len(ev) > 1 else 0, window=w))
    runs = pd.DataFrame(rows).assign(collapsed=lambda x: x.truncation_collapse_step.notna())
    return runs.sort_values("arm", key=lambda a: a.map(list(ARMS).index), kind="stable").reset_index(drop=True)


def verdicts(runs: pd.DataFrame) -> list[str]:
    """One line per claim, decided from the numbers: collapse counts over seeds, the order of the two collapses,
    and final-accuracy gaps against their noise band (seed ranges must not overlap either)."""
    n, arms = int(runs.eval_prompts.iloc[0]), set(runs.arm)
    get = lambda a, c: runs[runs.arm == a][c].to_numpy()  # noqa: E731
    count = lambda a: f"{int(get(a, 'collapsed').sum())}/{len(get(a, 'collapsed'))}"  # noqa: E731
    pts = lambda g: f"{100 * g[0]:+.1f} points (band ±{100 * g[1]:.1f})"  # noqa: E731
    if "plain" not in arms:
        return ["All claims: not tested (arm plain is not in the sweep)."]
    plain = runs[runs.arm == "plain"]
    fell = plain.accuracy_collapse_step.notna()
    word = ("reproduced" if plain.collapsed.all() and fell.all() else
            "partly reproduced" if plain.collapsed.any() else "not reproduced")
    out = [f"Plain OPD falls into truncation collapse (truncation and repetition saturate, accuracy collapses): "
           f"{word}; collapsed seeds {count('plain')}; final truncation {plain.final_truncation_rate.mean():.2f}, "
           f"repetition {plain.final_repetition_rate.mean():.2f}, length {plain.final_response_len_mean.mean():.1f}, "
           f"accuracy {plain.initial_accuracy.mean():.3f} → {plain.final_accuracy.mean():.3f}"]
    pairs, others = plain[plain.collapsed & fell], runs[runs.arm != "plain"]
    if len(pairs):
        lead = pairs.truncation_collapse_step - pairs.accuracy_collapse_step
        tol = int(pairs.eval_every.max() + pairs.window.max() - 1)   # evaluations are eval_every apart; a window lags
        order = ("accuracy collapsed first, lengths inflated later (not the paper's order)" if (lead > tol).all() else
                 "lengths inflated first, accuracy collapsed later" if (lead < -tol).all() else
                 f"together (within {tol} steps: one evaluation interval plus one window) or mixed across seeds")
        shock = (f"; every other arm's accuracy also fell that far (first at step "
                 f"{others.accuracy_collapse_step.min():.0f}, lowest {others.min_accuracy.min():.3f}, final >= "
                 f"{others.final_accuracy.min():.3f}): part of the early drop is the high lr itself"
                 if len(others) and others.accuracy_collapse_step.notna().all() else "")
        out.append(f"Order of the two collapses in plain OPD: {order}; per seed (accuracy step, truncation step): "
                   + ", ".join(f"s{int(r.seed)} ({r.accuracy_collapse_step:.0f}, {r.truncation_collapse_step:.0f})"
                               for r in pairs.itertuples()) + shock)
    for arm in [a for a in ("ref_kl", "mixture", "both") if a in arms]:
        claim = (f"{arm} prevents the truncation collapse (final truncation below plain's in every seed, "
                 f"higher accuracy)")
        g = compare(get(arm, "final_accuracy"), get("plain", "final_accuracy"), n)
        lower = get(arm, "final_truncation_rate").max() < get("plain", "final_truncation_rate").min()
        word = ("inconclusive (nothing to prevent: plain OPD did not collapse)" if not plain.collapsed.any() else
                "reproduced" if lower and g[2] > 0 else "not reproduced" if not lower or g[2] < 0 else
                "partly reproduced (truncation lower, accuracy within noise)")
        out.append(f"{claim}: {word}; final truncation {get(arm, 'final_truncation_rate').mean():.2f} vs plain "
                   f"{plain.final_truncation_rate.mean():.2f}; final accuracy vs plain {pts(g)}; seeds whose "
                   f"truncation ever reached the collapse level {count(arm)} vs plain {count('plain')}")
    out.append(f"Final accuracy vs the initial student ({runs.initial_accuracy.mean():.3f}): " + ", ".join(
        f"{a} {pts(compare(get(a, 'final_accuracy'), get(a, 'initial_accuracy'), n))}" for a in ARMS if a in arms))
    if {"both", "ref_kl", "mixture"} <= arms:
        gaps = {r: compare(get("both", "final_accuracy"), get(r, "final_accuracy"), n) for r in ("ref_kl", "mixture")}
        signs = [g[2] for g in gaps.values()]
        word = "reproduced" if min(signs) > 0 else "not reproduced" if -1 in signs else "inconclusive (within noise)"
        out.append("Both together beat either alone (final accuracy): " + word + "; "
                   + "; ".join(f"vs {r}: {pts(g)}" for r, g in gaps.items()))
    return [line + "." for line in out]


def plot(df: pd.DataFrame, runs: pd.DataFrame, out_dir: Path) -> None:
    """length_inflation_monitors.png: the three monitors (window-step rolling mean) and held-out accuracy over
    training, one line per run (arm = colour, seed = style), so an abrupt jump stays abrupt;
    length_inflation_final.png: final accuracy and final truncation rate per arm (seed min–max)."""
    sns.set_theme(style="whitegrid")
    w, order = int(df.window.iloc[0]), [a for a in ARMS if a in set(df.arm)]
    tr = df[df.step > 0].sort_values("step").copy()
    for m in MONITORS:
        tr[m] = tr.groupby(["arm", "seed"])[m].transform(lambda x: x.rolling(w, min_periods=1).mean())
    panels = ((tr, "response_len_mean", "response length (tokens)"), (tr, "truncation_rate", "truncation rate"),
              (tr, "repetition_rate", "3-gram repetition rate"),
              (df[df.accuracy.notna()], "accuracy", "held-out accuracy"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, (d, y, label) in zip(axes.flat, panels):
        sns.lineplot(d, x="step", y=y, hue="arm", hue_order=order, style="seed", units=None, errorbar=None, ax=ax,
                     legend=ax is axes[0, 0])
        ax.set(ylabel=label, xlabel="learner step")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"student rollouts ({w}-step rolling mean) and held-out greedy accuracy, per run")
    final, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (y, label) in zip(axes, (("final_accuracy", "final held-out accuracy"),
                                     ("final_truncation_rate", f"truncation rate, last {w} steps"))):
        sns.pointplot(runs, x="arm", y=y, order=order, errorbar=("pi", 100), ax=ax, linestyle="none")
        ax.set(xlabel="", ylabel=label)
    axes[0].axhline(runs.initial_accuracy.mean(), ls="--", c="gray", label="initial student")
    axes[0].legend()
    for f, name in ((fig, "length_inflation_monitors.png"), (final, "length_inflation_final.png")):
        f.tight_layout()
        f.savefig(out_dir / name, dpi=110)
        plt.close(f)


def report(runs: pd.DataFrame, cfg: Config) -> str:
    """report.md: the per-arm table (mean over seeds), the per-run collapse steps, and the claims."""
    t = runs.groupby("arm", sort=False).agg(**{
        "final accuracy": ("final_accuracy", "mean"), "seed min": ("final_accuracy", "min"),
        "seed max": ("final_accuracy", "max"), "collapsed": ("collapsed", "sum"), "runs": ("collapsed", "size"),
        "final trunc.": ("final_truncation_rate", "mean"), "peak trunc.": ("peak_truncation_rate", "mean"),
        "final rep.": ("final_repetition_rate", "mean"), "peak rep.": ("peak_repetition_rate", "mean"),
        "final len": ("final_response_len_mean", "mean"), "peak len": ("peak_response_len_mean", "mean"),
        "final rev. KL": ("final_reverse_kl", "mean"),
        "teacher-sample acc.": ("teacher_sample_accuracy", "mean")}).reset_index()
    per_run = runs[["arm", "seed", "initial_accuracy", "min_accuracy", "final_accuracy", "accuracy_collapse_step",
                    "truncation_collapse_step", "peak_truncation_rate", "final_truncation_rate"]]
    return "\n".join([
        "# length_inflation: StableOPD's truncation collapse and its two fixes on the toy backend", "",
        f"{runs.arm.nunique()} arms × seeds {sorted(runs.seed.unique().tolist())}, {cfg.steps} learner steps, "
        f"lr {cfg.toy.lr:g}, batch {cfg.toy.batch_size}, estimator preset {cfg.estimator}, no staleness, teacher SFT "
        f"{cfg.toy.teacher_steps} steps. ref_kl: "
        f"objective.ref_kl_coef = {cfg.ref_kl_coef:g} (k3 KL to the initial student on the sampled tokens); mixture: "
        f"toy.mixture_frac = {cfg.mixture_frac:g} ({round(cfg.mixture_frac * cfg.toy.batch_size)} of each batch's "
        f"rollouts are the teacher's own T = 1 samples, trained on with the same loss). Responses are cut at "
        f"max_len + 1 = {cfg.toy.max_len + 1} tokens. Held-out greedy accuracy on {cfg.toy.eval_prompts} prompts; "
        f"initial accuracy {runs.initial_accuracy.mean():.3f}. Truncation collapse: the {cfg.window}-step mean "
        f"truncation rate of the student's rollouts reaches {cfg.collapse_truncation:g}; accuracy collapse: an "
        f"evaluation more than {cfg.accuracy_drop:g} below the initial accuracy.", "",
        f"## Per arm (mean over seeds; final = last {cfg.window} steps, peak = highest {cfg.window}-step mean)", "",
        markdown(t), "", "## Per run (steps: first collapse of each kind; nan = never)", "", markdown(per_run), "",
        "## Claims", "", *[f"- {v}" for v in verdicts(runs)], "",
        "An accuracy gap counts only when the seed ranges do not overlap and it exceeds two binomial standard "
        f"errors of one held-out evaluation (the band). With {runs.seed.nunique()} seeds this is a rough test.", ""])


@hydra.main(version_base="1.3", config_path="../conf/studies/length_inflation", config_name="length_inflation")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    df = run(cfg)
    runs = summarise(df)
    df.to_csv(out_dir / "results.csv", index=False)
    runs.to_csv(out_dir / "runs.csv", index=False)
    plot(df, runs, out_dir)
    (out_dir / "report.md").write_text(text := report(runs, cfg))
    print(text)
    print(f"results.csv, runs.csv, report.md and figures in {out_dir}")


if __name__ == "__main__":
    main()
