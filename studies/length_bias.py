"""`python -m studies.length_bias`: what a staleness policy does to the training data, predicted and measured.

Dropping too-stale rollouts drops the slow ones, which are the long ones: the learner trains on shorter answers
than the policy generated, and the dropped tokens were paid for. For the example cluster shapes with their
long-tailed workloads (conf/cluster/, conf/workload/; each shape's own split), every η and policy is simulated
(sim.model, the cells of studies.throughput): drop, wait, and pacing ("pace D=d": on_stale=deadline with
pipeline_depth d < η, asyncopd/scheduler.py: admission runs d versions ahead, the learner trains the oldest ready
rollouts and waits for a straggler only when its deadline, admission version + η, is due; nothing is dropped).
asyncopd.data_skew's measures are reported beside the throughput and staleness: length_bias (trained mean /
generated mean − 1), length_w1 (tokens), drop_rate, wasted_token_frac, samples/s, trained tokens/s, mean and
max staleness. Then one measured toy point per policy: concurrent toy runs at η = toy_eta (studies.sim_vs_real:
calibrated on a drop run at η = 1), each beside the simulator's prediction from the calibrated costs.

    python -m studies.length_bias                 # ~5 min on 2 cores with the toy models cached
    python -m studies.length_bias scale=smoke     # tiny, for tests

Then a short training comparison: the same concurrent toy run (kl_direction's student, forward KL top-k,
`train_steps` steps, one rollout worker with the teacher beside it) under each policy at η = train_eta, on the
same seeds: held-out accuracy and response length at the end, the trained vs generated mean length, the share of
tokens dropped, and the wall time. Does the skew move the student?
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

from asyncopd.scheduler import SchedulerConfig
from backends.run import RunConfig, run as run_backend
from backends.toy import ToyConfig
from backends.toy_concurrent import ConcurrentConfig
from studies import sim_vs_real, throughput
from studies.cells import markdown

log = logging.getLogger(__name__)
plt.switch_backend("Agg")
MEASURES = ["samples_per_s", "tokens_per_s", "staleness_mean", "staleness_max", "length_bias", "length_w1",
            "drop_rate", "wasted_token_frac"]


def policy_name(on_stale: str, depth: int | None = None) -> str:
    """drop | wait | "pace D=d" (on_stale=deadline with pipeline_depth d)."""
    return f"pace D={depth}" if on_stale == "deadline" else on_stale


def policies(eta: int, pace_depths: list[int]) -> list[tuple[str, int | None]]:
    """(on_stale, pipeline_depth) of every policy compared at η: drop, wait, and pacing at each depth d < η."""
    return [("drop", None), ("wait", None), *(("deadline", d) for d in pace_depths if d < eta)]


@dataclass
class Config:
    shapes: list[throughput.Shape] = field(default_factory=lambda: [
        throughput.Shape(), throughput.Shape("h100x64_qwen3_8b_235b", "chat_short")])
    etas: list[int] = field(default_factory=lambda: [1, 2, 4])        # staleness bounds, >= 1
    pace_depths: list[int] = field(default_factory=lambda: [1, 2])   # pacing's admission depths D, >= 0 (at η > D)
    steps: int = 60                      # simulated learner steps per cell, > warmup
    warmup: int = 10                     # steps left out of the throughput window, >= 1
    workers: int = 2                     # simulation processes, >= 1
    measure_toy: bool = True             # the measured toy points (every policy at toy_eta)
    toy_eta: int = 2                     # η of the measured toy points, >= 1
    toy_steps: int = 60                  # learner steps per measured toy run
    toy_batch_size: int = 64
    sim_seeds: int = 3                   # simulations per toy prediction, >= 1
    toy: ToyConfig = field(default_factory=ToyConfig)
    train_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])   # training comparison; [] = skip it
    train_eta: int = 2                   # η of the training comparison, >= 1 (pacing needs η > min(pace_depths))
    train_steps: int = 150
    train_toy: ToyConfig = field(default_factory=ToyConfig)   # its task, models and learner

    def __post_init__(self):
        for name, ok, rule in (("etas", self.etas and min(self.etas) >= 1, "a non-empty list of ints >= 1"),
                               ("warmup", self.warmup >= 1, ">= 1"), ("steps", self.steps > self.warmup, "> warmup"),
                               ("workers", self.workers >= 1, ">= 1"), ("toy_eta", self.toy_eta >= 1, ">= 1"),
                               ("sim_seeds", self.sim_seeds >= 1, ">= 1"), ("train_eta", self.train_eta >= 1, ">= 1"),
                               ("pace_depths", min(self.pace_depths, default=0) >= 0
                                and len(set(self.pace_depths)) == len(self.pace_depths), "distinct ints >= 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


ConfigStore.instance().store(name="length_bias_schema", node=Config)


def simulated(cfg: Config) -> pd.DataFrame:
    """One row per shape × η × policy (each shape's own split and σ), from studies.throughput's cells: the wait
    cell of each (shape, η) is repeated with pacing's scheduler at every depth."""
    loaded = [throughput.load_shape(s) for s in cfg.shapes]
    tcfg = throughput.Config(shapes=cfg.shapes, sigmas=sorted({w.length.sigma for _, _, w in loaded}),
                             etas=[0, *cfg.etas], on_stale=["drop", "wait"],
                             learner_gpus=sorted({c.learner_gpus for c, _, _ in loaded}),
                             steps=cfg.steps, warmup=cfg.warmup, seeds=[0], workers=cfg.workers, measure_toy=False)
    todo = []
    for c in throughput.cells(tcfg):
        if not (c["default_split"] and c["workload_sigma"] and c["eta"] > 0):
            continue
        todo.append({**c, "policy": c["on_stale"]})
        paced = [d for mode, d in policies(c["eta"], cfg.pace_depths) if mode == "deadline"]
        for d in paced if c["on_stale"] == "wait" else []:
            sched = SchedulerConfig(max_staleness=c["eta"], on_stale="deadline", pipeline_depth=d)
            todo.append({**c, "on_stale": "deadline", "policy": policy_name("deadline", d),
                         "sim": (*c["sim"][:3], sched, *c["sim"][4:])})
    done = throughput.simulate_cells(todo, cfg.workers, "length_bias simulations")
    return pd.DataFrame([row for row, _ in done])[["shape", "eta", "policy", *MEASURES]]


def measured(cfg: Config, out_dir: Path) -> pd.DataFrame:
    """Concurrent toy runs under every policy at η = toy_eta, each with its prediction (studies.sim_vs_real)."""
    def spec(name, eta, mode, depth=None):
        return sim_vs_real.RunSpec(name=name, eta=eta, batch_size=cfg.toy_batch_size, on_stale=mode,
                                   pipeline_depth=depth)
    svr = sim_vs_real.Config(
        calibration=spec("calibration", 1, "drop"),
        configs=[spec(f"{policy_name(m, d).replace(' D=', '_D')}_eta{cfg.toy_eta}", cfg.toy_eta, m, d)
                 for m, d in policies(cfg.toy_eta, cfg.pace_depths)],
        steps=cfg.toy_steps, warmup=5, sim_seeds=cfg.sim_seeds, toy=cfg.toy)
    df = sim_vs_real.run(svr, out_dir)
    return df.assign(policy=[policy_name(m, None if pd.isna(d) else int(d)) for m, d in zip(df.on_stale,
                                                                                       df.pipeline_depth)])


def trained(cfg: Config, out_dir: Path) -> pd.DataFrame:
    """The training comparison: one row per policy × seed, from each run's metrics.csv."""
    rows = []
    for (mode, depth), seed in ((p, s) for s in cfg.train_seeds for p in policies(cfg.train_eta, cfg.pace_depths)):
        name = policy_name(mode, depth)
        run_cfg = RunConfig(exec="concurrent", staleness=str(cfg.train_eta), steps=cfg.train_steps, seed=seed,
                            toy=cfg.train_toy, concurrent=ConcurrentConfig(
                                rollout_workers=1, placement="colocate_teacher_with_rollout", on_stale=mode,
                                pipeline_depth=depth))
        m = run_backend(run_cfg, out_dir / f"{name.replace(' D=', '_D')}_seed{seed}")
        first, last = m[m.accuracy.notna()].iloc[0], m.iloc[-1]
        rows.append(dict(policy=name, seed=seed, initial_accuracy=first.accuracy, accuracy=last.accuracy,
                         eval_response_len=last.eval_response_len, len_trained_mean=last.len_trained_mean,
                         len_generated_mean=last.len_generated_mean, wasted_token_frac=last.wasted_token_frac,
                         staleness_mean=m.staleness_mean.mean(), staleness_max=int(m.staleness_max.max()),
                         wall_s=m.step_s.sum()))
    return pd.DataFrame(rows)


def training_claim(train: pd.DataFrame, eval_prompts: int) -> str:
    by = {p: d.set_index("seed") for p, d in train.groupby("policy", sort=False)}
    drop = by["drop"]
    band = 2 * (0.25 / eval_prompts) ** 0.5                # two binomial standard errors at p = 0.5
    others = "; ".join(
        f"{p} {d.accuracy.mean():.3f} ({d.accuracy.min():.3f}–{d.accuracy.max():.3f}): "
        f"{(d.accuracy - drop.accuracy).mean():+.1%} points vs drop "
        f"({'beyond' if abs((d.accuracy - drop.accuracy).mean()) > band else 'within'} the ±{band:.1%} band of one "
        f"evaluation), held-out length {d.eval_response_len.mean():.2f}, mean staleness {d.staleness_mean.mean():.2f}, "
        f"wall time {d.wall_s.mean() / drop.wall_s.mean():.2f}x drop's"
        for p, d in by.items() if p != "drop")
    return (f"Training (toy, {len(drop)} seeds): drop trains answers {drop.len_trained_mean.mean():.2f} tokens long "
            f"against {drop.len_generated_mean.mean():.2f} generated and wastes {drop.wasted_token_frac.mean():.0%} "
            f"of its tokens; final held-out accuracy drop {drop.accuracy.mean():.3f} "
            f"({drop.accuracy.min():.3f}–{drop.accuracy.max():.3f}), held-out length "
            f"{drop.eval_response_len.mean():.2f}, mean staleness {drop.staleness_mean.mean():.2f}; {others}.")


def pacing_claim(shape: str, d: pd.DataFrame) -> list[str]:
    """Each pacing cell against drop at the same η and against drop and wait at η = D (the same typical
    staleness: pacing's batches are about D versions old)."""
    cell = d.set_index(["policy", "eta"])
    lines = []
    for (p, eta), r in cell[cell.index.get_level_values(0).str.startswith("pace")].iterrows():
        depth = int(p.split("=")[1])
        same = [f"{base} at η = {depth} ({cell.loc[(base, depth)].tokens_per_s:.3g} tokens/s, mean staleness "
                f"{cell.loc[(base, depth)].staleness_mean:.2f}, length bias {cell.loc[(base, depth)].length_bias:+.0%}"
                f"): {r.tokens_per_s / cell.loc[(base, depth)].tokens_per_s:.2f}x"
                for base in ("drop", "wait") if (base, depth) in cell.index]
        lines.append(f"{shape}: {p} at η = {eta}: nothing dropped, length bias {r.length_bias:+.0%}, mean staleness "
                     f"{r.staleness_mean:.2f} (max {r.staleness_max:.0f}), {r.tokens_per_s:.3g} trained tokens/s = "
                     f"{r.tokens_per_s / cell.loc[('drop', eta)].tokens_per_s:.2f}x drop at the same η; against "
                     + ("; ".join(same) if same else "no policy at η = D") + ".")
    return lines


def claims(sim: pd.DataFrame, toy: pd.DataFrame | None) -> list[str]:
    lines = []
    for shape, d in sim.groupby("shape", sort=False):
        drop, wait = (d[d.policy == m].set_index("eta") for m in ("drop", "wait"))
        skew = ", ".join(f"η = {e}: {drop.length_bias[e]:+.0%} ({drop.drop_rate[e]:.0%} of rollouts, "
                         f"{drop.wasted_token_frac[e]:.0%} of tokens dropped)" for e in drop.index)
        cost = ", ".join(f"η = {e}: samples/s {wait.samples_per_s[e] / drop.samples_per_s[e]:.2f}x, trained tokens/s "
                         f"{wait.tokens_per_s[e] / drop.tokens_per_s[e]:.2f}x" for e in wait.index)
        lines.append(f"{shape}: drop trains answers this much shorter than it generates: {skew}.")
        lines.append(f"{shape}: wait removes the skew (length bias {wait.length_bias.abs().max():.0%} at most, nothing "
                     f"dropped) at this cost against drop: {cost}.")
        lines += pacing_claim(shape, d)
    if toy is not None:
        for r in toy[toy.held_out].itertuples():
            lines.append(f"Toy point {r.config} (η = {r.eta}, {r.policy}, this CPU): length bias measured "
                         f"{r.measured_length_bias:+.3f}, predicted {r.predicted_length_bias:+.3f}; wasted tokens "
                         f"{r.measured_wasted_token_frac:.1%} vs {r.predicted_wasted_token_frac:.1%}; mean staleness "
                         f"{r.measured_staleness_mean:.2f} vs {r.predicted_staleness_mean:.2f}; samples/s "
                         f"{r.measured_samples_per_s:.0f} vs {r.predicted_samples_per_s:.0f} ({r.rel_error:+.0%}).")
    return lines


def plot(sim: pd.DataFrame, path: Path) -> None:
    """Length bias against η, and trained tokens/s against mean staleness (the frontier each policy reaches), per
    shape (colour) and policy (marker)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sns.lineplot(sim, x="eta", y="length_bias", hue="shape", style="policy", markers=True, ax=axes[0], legend=False)
    axes[0].set(xlabel="η (max staleness)", ylabel="trained / generated mean length − 1")
    axes[0].axhline(0, c="0.6", lw=0.8)
    sns.scatterplot(sim, x="staleness_mean", y="tokens_per_s", hue="shape", style="policy", s=70, ax=axes[1])
    for r in sim.itertuples():
        axes[1].annotate(f"η={r.eta}", (r.staleness_mean, r.tokens_per_s), fontsize=6, xytext=(3, 3),
                         textcoords="offset points")
    axes[1].set(xlabel="mean staleness of trained rollouts", ylabel="trained tokens/s", yscale="log")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("drop trains shorter answers than it generates; wait and pacing do not, and pacing is faster at the "
                 "same mean staleness")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sim: pd.DataFrame, toy: pd.DataFrame | None, train: pd.DataFrame | None = None,
           eval_prompts: int = 0) -> str:
    lines = ["# length_bias: what the staleness policy does to the training data", "",
             "Simulated on the example shapes (their own split and workload), drop vs wait vs pacing (\"pace D=d\": "
             "on_stale=deadline, pipeline_depth=d; asyncopd/scheduler.py), from the one Driver's measures "
             "(asyncopd/data_skew.py). length_bias = trained mean length / generated mean length − 1; length_w1 in "
             "tokens; wasted_token_frac = tokens of dropped rollouts / tokens of every resolved rollout.",
             "", "## Claims", "", *[f"- {c}" for c in claims(sim, toy)],
             *([f"- {training_claim(train, eval_prompts)}"] if train is not None and len(train) else []),
             "", "## Simulated", "",
             markdown(sim, floatfmt=".3g"), ""]
    if toy is not None:
        cols = ["config", "eta", "policy", "measured_samples_per_s", "predicted_samples_per_s", "rel_error",
                "measured_staleness_mean", "predicted_staleness_mean",
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
