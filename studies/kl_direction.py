"""The headline study: does on-policy distillation work here, and how does the KL direction and the estimator
change what staleness costs it?

Question
    The AsyncOPD seeds claim (1) forward KL (teacher-weighted) is robust to staleness, (2) reverse KL with the
    stale behaviour signal log π_T − log π_β degrades as staleness grows, and (3) recomputing log π_θ at
    learner time restores it and beats the usual async-RL stabilisers (TIS, PPO clip). Before any of that, OPD
    must work at k = 0: the report gives the fraction of the student–teacher gap each estimator closes per seed.
    Then a dose–response: accuracy vs k per estimator and k½, the staleness at which half of the k = 0 gain is
    lost. Bias from stale data scales with staleness × step size, so k½ should fall as lr rises (`lrs`).
Covers
    estimator presets (conf/estimator/) × fixed staleness k (every batch from weights exactly k versions old)
    × seeds (× lrs when set), on the toy backend's lockstep run. Every cell shares the teacher, the warmed-up
    student, lr and steps; all are judged on held-out greedy accuracy and exact held-out reverse KL to the
    teacher, beside the teacher's own held-out accuracy. Left out: wall-clock async (lockstep staleness is
    exact, not timed) and lr tuning per estimator.
How to run
    python -m studies.kl_direction                  # runtime on 2 CPU cores: see README (+ the models, trained once)
    python -m studies.kl_direction scale=smoke      # the same pipeline, tiny task and models, < 1 min
    python -m studies.kl_direction scale=lr         # lr × k: stale reverse KL at the default lr /3, ×1, ×3 (few min)
    python -m studies.kl_direction hydra.run.dir=outputs/kl_direction/<run>   # resume: finished cells reused
    python -m studies.kl_direction 'lrs=[3e-5,1e-4]' 'staleness=[0,4,16]'  # any lr × k grid
    → Hydra's run folder: results.csv (cell × step), accuracy_vs_staleness.png, reverse_kl_vs_staleness.png,
      learning_curves.png, report.md; each cell's run in cells/<estimator>_k<k>_s<seed>[_lr<lr>]/ (done.json
      when finished) and the teacher's held-out accuracy in cells/teacher.json.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd.files import atomic_write
from asyncopd.scheduler import SchedulerConfig
from backends import toy
from backends.run import RunConfig
from backends.toy_models import greedy_accuracy
from backends.toy_task import HELDOUT_SEED
from studies import cells as cells_lib
from studies.cells import PRESETS, preset
from studies.kl_direction_report import FORWARD, RECOMPUTE, REVERSE_TOPK, STABILISERS, STALE, report

plt.switch_backend("Agg")


@dataclass
class Config:
    estimators: list[str] = field(default_factory=lambda: [FORWARD, REVERSE_TOPK, STALE, STABILISERS[0], RECOMPUTE[0]])
    staleness: list[int] = field(default_factory=lambda: [0, 1, 4, 16])   # fixed k per cell, >= 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])   # prompts and sampling; the models are shared
    lrs: list[float] = field(default_factory=list)   # learning rates to sweep (distinct, > 0); empty: toy.lr only
    steps: int = 150                     # learner steps per cell, the same for every cell
    workers: int = 2                     # cells run in parallel, one single-threaded process each
    scale: str = "default"               # default | smoke | lr (set by the `scale` config group)
    cells_dir: str = "cells"             # one folder per cell; the YAML puts it in Hydra's run folder
    toy: toy.ToyConfig = field(default_factory=toy.ToyConfig)   # task, models, batch, lr, evals: every cell's

    def __post_init__(self):
        e = list(self.estimators)
        if not e or len(set(e)) < len(e) or set(e) - set(PRESETS):
            raise ValueError(f"estimators must be distinct names from conf/estimator/ {PRESETS}, got {e!r}")
        cells_lib.check_distinct_ints(self, ("staleness", "seeds"))
        lrs = list(self.lrs)
        for name, ok, rule in (("steps", self.steps >= 1, ">= 1"), ("workers", self.workers >= 1, ">= 1"),
                               ("scale", self.scale in ("default", "smoke", "lr"), "default, smoke or lr"),
                               ("lrs", len(set(lrs)) == len(lrs) and all(v > 0 for v in lrs), "distinct and > 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


ConfigStore.instance().store(name="kl_direction_schema", node=Config)


def cells(cfg: Config) -> list[dict]:
    """The sweep, one dict per cell: its labels, its RunConfig, its folder and the digest its done.json must hold.
    Folder names carry the lr only when `lrs` is set, so the default sweep's folders do not depend on it."""
    out = []
    for e, k, s, lr in itertools.product(cfg.estimators, cfg.staleness, cfg.seeds, cfg.lrs or [cfg.toy.lr]):
        rc = RunConfig(staleness=SchedulerConfig(fixed_staleness=k).spec, steps=cfg.steps, seed=s,
                       toy=replace(cfg.toy, lr=lr), objective=preset(e))
        name = f"{e}_k{k}_s{s}" + (f"_lr{lr:g}" if cfg.lrs else "")
        out.append(cells_lib.cell(rc, Path(cfg.cells_dir) / name, estimator=e, staleness=k, seed=s, lr=lr))
    return out


def toy_digest(toy_cfg: toy.ToyConfig) -> str:
    """A hash of the whole toy config: teacher.json is reused only for the very config that wrote it."""
    return hashlib.sha256(json.dumps(asdict(toy_cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_accuracy(cfg: Config) -> float:
    """The teacher's held-out greedy accuracy on the prompts every cell is evaluated on (backends/evaluate.py:
    the first toy.eval_prompts of seed HELDOUT_SEED), cached in cells_dir/teacher.json for this toy config."""
    path, digest = Path(cfg.cells_dir) / "teacher.json", toy_digest(cfg.toy)
    if path.exists() and (cached := json.loads(path.read_text()))["digest"] == digest:
        return cached["accuracy"]
    task, teacher, _, _ = toy.build_models(cfg.toy)      # trains the pair once; the cells load the cache
    accuracy = greedy_accuracy(teacher, task, task.make_prompts(cfg.toy.eval_prompts, HELDOUT_SEED))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"digest": digest, "accuracy": accuracy, "eval_prompts": cfg.toy.eval_prompts}))
    return accuracy


def run(cfg: Config) -> pd.DataFrame:
    """Measure the teacher (once), run the cells not yet done (in parallel), then return every cell's metrics as
    one tidy table, with the teacher's held-out accuracy as a column."""
    teacher = teacher_accuracy(cfg)
    df = cells_lib.run_all(cells(cfg), cfg.toy, workers=cfg.workers, desc="kl_direction cells")
    df = df.drop(columns="run_staleness")                 # "fixed:k"; run_lr (the optimiser's, per step) stays
    df = df.assign(eval_prompts=cfg.toy.eval_prompts, teacher_accuracy=teacher)
    first = ["estimator", "staleness", "seed", "lr", "step"]
    return df[first + [c for c in df.columns if c not in first]]


def plot(df: pd.DataFrame, out_dir: Path) -> None:
    """Final accuracy (with the initial student's and the teacher's) and final held-out reverse KL vs k, one line
    per estimator (per estimator and lr when several), bars: min–max over seeds; and the learning curves."""
    sns.set_theme(style="whitegrid")
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)   # quiet: integer k on a categorical axis
    if df.lr.nunique() > 1:
        df = df.assign(estimator=df.estimator + df.lr.map(lambda lr: f" lr={lr:g}"))
    final, ks = df[df.step == df.step.max()], sorted(df.staleness.unique())
    for y, name, label in (("accuracy", "accuracy_vs_staleness.png", "final held-out greedy accuracy"),
                           ("eval_reverse_kl", "reverse_kl_vs_staleness.png", "final held-out KL(π_θ‖π_T)/token")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        sns.pointplot(final, x="staleness", y=y, hue="estimator", order=ks, errorbar=("pi", 100),
                      dodge=0.4 if final.estimator.nunique() > 1 else False, ax=ax)   # seaborn divides by n − 1
        if y == "accuracy":
            ax.axhline(df[df.step == 0].accuracy.mean(), ls="--", c="gray", label="initial student")
            ax.axhline(df.teacher_accuracy.iloc[0], ls="--", c="black", label="teacher")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])                 # every k of the grid, evenly spaced
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
