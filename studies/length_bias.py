"""`python -m studies.length_bias`: what a staleness policy does to the training data, predicted and measured.

Dropping too-stale rollouts drops the slow ones, which are the long ones: the learner trains on shorter answers
than the policy generated, and the dropped tokens were paid for. For the example cluster shapes with their
long-tailed workloads (conf/cluster/, conf/workload/; each shape's own split), every η and policy (drop, wait) is
simulated (sim.model, the cells of studies.throughput), and asyncopd.data_skew's measures are reported beside the
throughput: length_bias (trained mean / generated mean − 1), length_w1 (tokens), drop_rate, wasted_token_frac,
samples/s and trained tokens/s. Then one measured toy point per policy: concurrent toy runs at η = toy_eta with
drop and with wait (studies.sim_vs_real: calibrated on a drop run at η = 1), each beside the simulator's
prediction from the calibrated costs.

    python -m studies.length_bias                 # ~3 min on 2 cores with the toy models cached
    python -m studies.length_bias scale=smoke     # tiny, for tests

Then a short training comparison: the same concurrent toy run (kl_direction's student, forward KL top-k,
`train_steps` steps, one rollout worker with the teacher beside it) with drop and with wait at η = train_eta, on
the same seeds: held-out accuracy and response length at the end, the trained vs generated mean length, the
share of tokens dropped, and the wall time. Does the skew move the student?

Left out (not built yet): a pacing or oldest-first admission policy beyond drop and wait.
"""

from __future__ import annotations

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

from backends.run import RunConfig, run as run_backend
from backends.toy import ToyConfig
from backends.toy_concurrent import ConcurrentConfig
from studies import sim_vs_real, throughput
from studies.cells import markdown

log = logging.getLogger(__name__)
plt.switch_backend("Agg")
MEASURES = ["samples_per_s", "tokens_per_s", "length_bias", "length_w1", "drop_rate", "wasted_token_frac"]


@dataclass
class Config:
    shapes: list[throughput.Shape] = field(default_factory=lambda: [
        throughput.Shape(), throughput.Shape("h100x64_qwen3_8b_235b", "chat_short")])
    etas: list[int] = field(default_factory=lambda: [1, 2, 4])        # staleness bounds, >= 1
    steps: int = 60                      # simulated learner steps per cell, > warmup
    warmup: int = 10                     # steps left out of the throughput window, >= 1
    workers: int = 2                     # simulation processes, >= 1
    measure_toy: bool = True             # the measured toy points (drop and wait)
    toy_eta: int = 2                     # η of the measured toy points, >= 1
    toy_steps: int = 60                  # learner steps per measured toy run
    toy_batch_size: int = 64
    sim_seeds: int = 3                   # simulations per toy prediction, >= 1
    toy: ToyConfig = field(default_factory=ToyConfig)
    train_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])   # training comparison; [] = skip it
    train_eta: int = 1                   # η of the training comparison, >= 1
    train_steps: int = 150
    train_toy: ToyConfig = field(default_factory=ToyConfig)   # its task, models and learner

    def __post_init__(self):
        for name, ok, rule in (("etas", self.etas and min(self.etas) >= 1, "a non-empty list of ints >= 1"),
                               ("warmup", self.warmup >= 1, ">= 1"), ("steps", self.steps > self.warmup, "> warmup"),
                               ("workers", self.workers >= 1, ">= 1"), ("toy_eta", self.toy_eta >= 1, ">= 1"),
                               ("sim_seeds", self.sim_seeds >= 1, ">= 1"), ("train_eta", self.train_eta >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


ConfigStore.instance().store(name="length_bias_schema", node=Config)


def simulated(cfg: Config) -> pd.DataFrame:
    """One row per shape × η × policy (each shape's own split and σ), from studies.throughput's cells."""
    loaded = [throughput.load_shape(s) for s in cfg.shapes]
    tcfg = throughput.Config(shapes=cfg.shapes, sigmas=sorted({w.length.sigma for _, _, w in loaded}),
                             etas=[0, *cfg.etas], on_stale=["drop", "wait"],
                             learner_gpus=sorted({c.learner_gpus for c, _, _ in loaded}),
                             steps=cfg.steps, warmup=cfg.warmup, seeds=[0], workers=cfg.workers, measure_toy=False)
    todo = [c for c in throughput.cells(tcfg) if c["default_split"] and c["workload_sigma"] and c["eta"] > 0]
    done = throughput.simulate_cells(todo, cfg.workers, "length_bias simulations")
    return pd.DataFrame([row for row, _ in done])[["shape", "eta", "on_stale", *MEASURES]]


def measured(cfg: Config, out_dir: Path) -> pd.DataFrame:
    """Concurrent toy runs with drop and with wait at η = toy_eta, each with its prediction (studies.sim_vs_real)."""
    spec = lambda name, eta, mode: sim_vs_real.RunSpec(name=name, eta=eta, batch_size=cfg.toy_batch_size,  # noqa: E731
                                                       on_stale=mode)
    svr = sim_vs_real.Config(calibration=spec("calibration", 1, "drop"),
                             configs=[spec(f"{m}{cfg.toy_eta}", cfg.toy_eta, m) for m in ("drop", "wait")],
                             steps=cfg.toy_steps, warmup=5, sim_seeds=cfg.sim_seeds, toy=cfg.toy)
    return sim_vs_real.run(svr, out_dir)


def trained(cfg: Config, out_dir: Path) -> pd.DataFrame:
    """The training comparison: one row per policy × seed, from each run's metrics.csv."""
    rows = []
    for mode, seed in ((m, s) for s in cfg.train_seeds for m in ("drop", "wait")):
        run_cfg = RunConfig(exec="concurrent", staleness=str(cfg.train_eta), steps=cfg.train_steps, seed=seed,
                            toy=cfg.train_toy, concurrent=ConcurrentConfig(
                                rollout_workers=1, placement="colocate_teacher_with_rollout", on_stale=mode))
        m = run_backend(run_cfg, out_dir / f"{mode}{seed}")
        first, last = m[m.accuracy.notna()].iloc[0], m.iloc[-1]
        rows.append(dict(on_stale=mode, seed=seed, initial_accuracy=first.accuracy, accuracy=last.accuracy,
                         eval_response_len=last.eval_response_len, len_trained_mean=last.len_trained_mean,
                         len_generated_mean=last.len_generated_mean, wasted_token_frac=last.wasted_token_frac,
                         wall_s=m.step_s.sum()))
    return pd.DataFrame(rows)


def training_claim(train: pd.DataFrame, eval_prompts: int) -> str:
    drop, wait = (train[train.on_stale == m].set_index("seed") for m in ("drop", "wait"))
    gap = (wait.accuracy - drop.accuracy).mean()
    band = 2 * (0.25 / eval_prompts) ** 0.5                # two binomial standard errors at p = 0.5
    return (f"Training (toy, {len(drop)} seeds): drop trains answers {drop.len_trained_mean.mean():.2f} tokens long "
            f"against {drop.len_generated_mean.mean():.2f} generated and wastes {drop.wasted_token_frac.mean():.0%} "
            f"of its tokens; final held-out accuracy drop {drop.accuracy.mean():.3f} "
            f"({drop.accuracy.min():.3f}–{drop.accuracy.max():.3f}), wait {wait.accuracy.mean():.3f} "
            f"({wait.accuracy.min():.3f}–{wait.accuracy.max():.3f}): wait {gap:+.1%} points on average "
            f"({'beyond' if abs(gap) > band else 'within'} the ±{band:.1%} band of one evaluation); held-out response "
            f"length drop {drop.eval_response_len.mean():.2f}, wait {wait.eval_response_len.mean():.2f}; wall time "
            f"wait / drop {wait.wall_s.mean() / drop.wall_s.mean():.2f}x.")


def claims(sim: pd.DataFrame, toy: pd.DataFrame | None) -> list[str]:
    lines = []
    for shape, d in sim.groupby("shape", sort=False):
        drop, wait = (d[d.on_stale == m].set_index("eta") for m in ("drop", "wait"))
        skew = ", ".join(f"η = {e}: {drop.length_bias[e]:+.0%} ({drop.drop_rate[e]:.0%} of rollouts, "
                         f"{drop.wasted_token_frac[e]:.0%} of tokens dropped)" for e in drop.index)
        cost = ", ".join(f"η = {e}: samples/s {wait.samples_per_s[e] / drop.samples_per_s[e]:.2f}x, trained tokens/s "
                         f"{wait.tokens_per_s[e] / drop.tokens_per_s[e]:.2f}x" for e in wait.index)
        lines.append(f"{shape}: drop trains answers this much shorter than it generates: {skew}.")
        lines.append(f"{shape}: wait removes the skew (length bias {wait.length_bias.abs().max():.0%} at most, nothing "
                     f"dropped) at this cost against drop: {cost}.")
    if toy is not None:
        for r in toy[toy.held_out].itertuples():
            lines.append(f"Toy point {r.config} (η = {r.eta}, {r.on_stale}, this CPU): length bias measured "
                         f"{r.measured_length_bias:+.3f}, predicted {r.predicted_length_bias:+.3f}; wasted tokens "
                         f"{r.measured_wasted_token_frac:.1%} vs {r.predicted_wasted_token_frac:.1%}; samples/s "
                         f"{r.measured_samples_per_s:.0f} vs {r.predicted_samples_per_s:.0f} ({r.rel_error:+.0%}).")
    return lines


def plot(sim: pd.DataFrame, path: Path) -> None:
    """Length bias and trained tokens/s against η, per shape (colour) and policy (line style)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, y, label in ((axes[0], "length_bias", "trained / generated mean length − 1"),
                         (axes[1], "tokens_per_s", "trained tokens/s")):
        sns.lineplot(sim, x="eta", y=y, hue="shape", style="on_stale", markers=True, ax=ax, legend=ax is axes[1])
        ax.set(xlabel="η (max staleness)", ylabel=label)
    axes[1].legend(fontsize=7, loc="upper left")
    axes[0].axhline(0, c="0.6", lw=0.8)
    fig.suptitle("drop trains shorter answers than it generates; wait does not")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sim: pd.DataFrame, toy: pd.DataFrame | None, train: pd.DataFrame | None = None,
           eval_prompts: int = 0) -> str:
    lines = ["# length_bias: what the staleness policy does to the training data", "",
             "Simulated on the example shapes (their own split and workload), drop vs wait, from the one Driver's "
             "measures (asyncopd/data_skew.py). length_bias = trained mean length / generated mean length − 1; "
             "length_w1 in tokens; wasted_token_frac = tokens of dropped rollouts / tokens of every resolved rollout.",
             "", "## Claims", "", *[f"- {c}" for c in claims(sim, toy)],
             *([f"- {training_claim(train, eval_prompts)}"] if train is not None and len(train) else []),
             "", "## Simulated", "",
             markdown(sim, floatfmt=".3g"), ""]
    if toy is not None:
        cols = ["config", "eta", "on_stale", "measured_samples_per_s", "predicted_samples_per_s", "rel_error",
                *[f"{side}_{k}" for k in ("drop_rate", "length_bias", "wasted_token_frac")
                  for side in ("measured", "predicted")]]
        lines += ["## Measured toy points (concurrent, calibrated on a drop run at η = 1)", "",
                  markdown(toy[cols], floatfmt=".3g"), ""]
    if train is not None and len(train):
        lines += ["## Training comparison (toy, concurrent, same seeds)", "", markdown(train, floatfmt=".3g"), ""]
    return "\n".join(lines + ["![length bias](length_bias.png)", ""])


@hydra.main(version_base="1.3", config_path="../conf/studies/length_bias", config_name="length_bias")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    toy = measured(cfg, out_dir / "toy") if cfg.measure_toy else None   # first: simulations would slow it down
    train = trained(cfg, out_dir / "train") if cfg.train_seeds else None
    sim = simulated(cfg)
    sim.to_csv(out_dir / "results.csv", index=False)
    if train is not None:
        train.to_csv(out_dir / "training.csv", index=False)
    plot(sim, out_dir / "length_bias.png")
    (out_dir / "report.md").write_text(text := report(sim, toy, train, cfg.train_toy.eval_prompts))
    print(text)
    print(f"results.csv, report.md and length_bias.png in {out_dir}")


if __name__ == "__main__":
    main()
