"""When does asynchrony pay? Simulated async/sync speedup over the length tail, η and the GPU split.

Question
    The AsyncOPD seeds report 1.6–3.8× from running rollout, teacher and learner asynchronously. On the documented
    example cluster shapes (conf/cluster/, each with its workload from conf/workload/), how does the speedup depend
    on the response-length tail (σ of a lognormal with the workload's mean), on the staleness bound η and on the
    rollout : learner split of the shape's GPU budget, and what staleness does each η produce?
Covers
    sim.model.simulate over shape × split × σ × η × on_stale × seed, in parallel. The speedup of a cell is

        speedup = R(η) / R(0)  of the same shape, split, σ and seed;   vs best sync = R(η) / max_split R(0)

    with R the steady samples/s (from the end of learner step `warmup` to the last, sim_vs_real.window_rate), and
    token_speedup the same ratio in trained tokens/s: drop mode discards the stale long tail, so it counts more,
    shorter samples. η = 0 is synchronous in both modes (nothing is ever dropped), so it is simulated once.
    Splits: sim.planner.enumerate_splits at the shape's own GPU count with its teacher replicas kept, learner GPUs
    from `learner_gpus` (a teacher on the learner needs L ≥ its GPUs) and learner cost scaled by
    sim.planner.learner_costs. One measured toy point: a concurrent toy run at η = 0 calibrates the simulator
    (studies.sim_vs_real), which predicts the η = toy_point.eta run; both are measured on this machine.
    Left out: learning quality (studies.kl_direction prices staleness), and calibrated GPU costs: the example
    shapes are derived from hardware and model specs by a roofline (sim/specs.py), so the absolute numbers are what
    those assumptions imply.
How to run
    python -m studies.throughput                 # 441 simulations (317 s of CPU) + 2 toy runs: 12 min measured on
                                                 # 2 CPU cores shared with other jobs (load ~8), ~4 min when idle
    python -m studies.throughput scale=smoke     # the same pipeline on a tiny grid and tiny toy models, ~30 s
    python -m studies.throughput 'sigmas=[0.5,2.0]' 'etas=[0,1,3]' measure_toy=false
    → Hydra's run folder: results.csv (one row per simulated cell), staleness_hist.csv, toy_point.csv and
      toy_point/ (the sim_vs_real run), speedup_vs_sigma.png, speedup_vs_split.png, speedup_vs_eta.png,
      staleness.png, report.md.
"""

from __future__ import annotations

import itertools
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from asyncopd import trace
from asyncopd.config import check_finite
from asyncopd.data_skew import SCALARS as SKEW_SCALARS
from asyncopd.scheduler import ON_STALE, SchedulerConfig
from backends.toy import ToyConfig
from sim.costs import ClusterShape, CostModel, Workload
from sim.model import simulate
from sim.planner import PlanConfig, enumerate_splits, learner_costs
from sim.specs import Specs, costs_from_specs
from studies import sim_vs_real
from studies.cells import markdown

plt.switch_backend("Agg")

CONF = Path(__file__).resolve().parents[1] / "conf"
KEY = ["shape", "sigma", "seed"]                       # a sync baseline is shared within these ...
SPLIT = [*KEY, "learner_gpus"]                        # ... and the teacher is fixed, so L names the split


@dataclass
class Shape:
    cluster: str = "h100x8_qwen3_1p7b_30b"   # conf/cluster/<name>.yaml: cluster + costs
    workload: str = "math_1p7b"              # conf/workload/<name>.yaml; its length mean and max are kept


@dataclass
class ToyPoint:
    eta: int = 2                         # η of the measured async run, >= 1; the calibration run is η = 0
    steps: int = 60                      # learner steps per measured run, >= warmup + 3
    warmup: int = 5                      # steps left out of the throughput window, >= 1
    sim_seeds: int = 3                   # simulations per prediction, >= 1
    placement: str = "colocate_teacher_with_rollout"     # toy concurrent placement (2 cores: 2 processes)
    toy: ToyConfig = field(default_factory=ToyConfig)

    def __post_init__(self):
        for name, ok, rule in (("eta", self.eta >= 1, ">= 1"), ("warmup", self.warmup >= 1, ">= 1"),
                               ("steps", self.steps >= self.warmup + 3, ">= warmup + 3"),
                               ("sim_seeds", self.sim_seeds >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"toy_point.{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class Config:
    shapes: list[Shape] = field(default_factory=lambda: [
        Shape(), Shape("h100x8_teacher_on_learner", "math_1p7b"), Shape("h100x64_qwen3_8b_235b", "chat_short")])
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5])   # lognormal σ, >= 0
                                         # (each workload's own σ is added)
    etas: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])   # staleness bounds, >= 0; 0 is required
    on_stale: list[str] = field(default_factory=lambda: ["wait", "drop"])   # scheduler modes for η > 0
    learner_gpus: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])   # learner sizes tried, >= 1
    learner_scaling_efficiency: float = 0.9   # each doubling of the learner is 2e× faster per token, (0, 1]
    steps: int = 40                      # learner steps per simulation, >= warmup + 3
    warmup: int = 10                     # steps left out of the steady window (pipeline fill), >= 1
    seeds: list[int] = field(default_factory=lambda: [0])   # response-length seeds, >= 0
    band: list[float] = field(default_factory=lambda: [1.6, 3.8])   # the seeds' reported speedup range [lo, hi]
    workers: int = 2                     # simulations in parallel, one process each, >= 1
    measure_toy: bool = True             # measure and predict the toy point (wall clock, before the simulations)
    toy_point: ToyPoint = field(default_factory=ToyPoint)
    scale: str = "default"               # default | smoke (set by the `scale` config group)

    def __post_init__(self):
        check_finite(self)
        self.shapes = [Shape(**s) if isinstance(s, dict) else s for s in self.shapes]
        for group, name in ((g, getattr(s, g)) for s in self.shapes for g in ("cluster", "workload")):
            if not (CONF / group / f"{name}.yaml").exists():
                raise ValueError(f"shapes: {group}={name!r} is not a file in {CONF / group}")
        for name, lo in (("sigmas", 0), ("etas", 0), ("learner_gpus", 1), ("seeds", 0)):
            v = list(getattr(self, name))
            if not v or len(set(v)) < len(v) or min(v) < lo:
                raise ValueError(f"{name} must be a non-empty list of distinct numbers >= {lo}, got {v!r}")
        e, (lo, hi) = self.learner_scaling_efficiency, (list(self.band) + [0, 0])[:2]
        for name, ok, rule in (
                ("etas", 0 in self.etas and len(self.etas) >= 2, "a list with 0 (the synchronous baseline) and η > 0"),
                ("on_stale", self.on_stale and set(self.on_stale) <= set(ON_STALE)
                 and len(set(self.on_stale)) == len(self.on_stale), f"distinct values of {ON_STALE}"),
                ("learner_scaling_efficiency", 0 < e <= 1, "in (0, 1]"),
                ("band", len(self.band) == 2 and 0 < lo < hi, "[lo, hi] with 0 < lo < hi"),
                ("warmup", self.warmup >= 1, ">= 1"), ("steps", self.steps >= self.warmup + 3, ">= warmup + 3"),
                ("workers", self.workers >= 1, ">= 1"),
                ("scale", self.scale in ("default", "smoke"), "default or smoke")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


ConfigStore.instance().store(name="throughput_schema", node=Config)


def load_shape(shape: Shape) -> tuple[ClusterShape, CostModel, Workload]:
    c = OmegaConf.to_container(OmegaConf.load(CONF / "cluster" / f"{shape.cluster}.yaml"))
    w = OmegaConf.to_container(OmegaConf.load(CONF / "workload" / f"{shape.workload}.yaml"))
    cluster, workload = ClusterShape(**c["cluster"]), Workload(**w)
    if "specs" in c:                                     # a shape described by hardware and models: derive
        return cluster, costs_from_specs(Specs(**c["specs"]), cluster, workload), workload
    return cluster, CostModel(**c["costs"]), workload


def cells(cfg: Config) -> list[dict]:
    """Every simulation: labels plus the objects simulate() takes. η = 0 once per (split, σ, seed)."""
    out = []
    for shape in cfg.shapes:
        cluster, costs, workload = load_shape(shape)
        plan = PlanConfig(cluster=cluster, costs=costs, workload=workload, gpus=cluster.gpus,
                          learner_gpus=list(cfg.learner_gpus),
                          learner_scaling_efficiency=cfg.learner_scaling_efficiency)
        splits = [(r, t, L) for r, t, L in enumerate_splits(plan) if t == cluster.teacher_replicas
                  and (cluster.placement != "teacher_with_learner" or L >= cluster.gpus_per_teacher_replica)
                  and r * costs.max_batch >= workload.batch_size]
        sigmas = sorted({*cfg.sigmas, workload.length.sigma})
        for (r, t, L), sigma, eta, seed in itertools.product(splits, sigmas, cfg.etas, cfg.seeds):
            for mode in ["sync"] if eta == 0 else cfg.on_stale:
                out.append(dict(
                    shape=f"{shape.cluster} / {shape.workload}", rollout_replicas=r, teacher_replicas=t,
                    learner_gpus=L,
                    default_split=(r, L) == (cluster.rollout_replicas, cluster.learner_gpus), sigma=float(sigma),
                    workload_sigma=sigma == workload.length.sigma, eta=eta, on_stale=mode, seed=seed,
                    sim=(replace(cluster, rollout_replicas=r, learner_gpus=L), learner_costs(plan, L),
                         replace(workload, length=replace(workload.length, dist="lognormal", sigma=float(sigma))),
                         SchedulerConfig(max_staleness=eta, on_stale="wait" if mode == "sync" else mode),
                         cfg.steps, seed), warmup=cfg.warmup))
    return out


def simulate_cell(cell: dict) -> tuple[dict, dict]:
    """(results row, staleness histogram) of one cell; rates over the steady window."""
    events, s = simulate(*cell["sim"])
    steps = trace.to_frame(e for e in events if e.kind == "learner_step").sort_values("t")
    B, w = cell["sim"][2].batch_size, cell["warmup"]
    rate = sim_vs_real.window_rate(steps, B, w)
    tokens_per_sample = steps.tokens.iloc[w:].sum() / (B * (len(steps) - w))
    row = {k: v for k, v in cell.items() if k not in ("sim", "warmup")}
    c = cell["sim"][1]
    row.update(samples_per_s=rate, tokens_per_s=rate * tokens_per_sample, mean_length=tokens_per_sample,
               learner_period_s=c.learner_step_s + c.learner_s_per_token * B * tokens_per_sample + c.publish_s,
               weight_sync_s=c.weight_sync_s,
               staleness_mean=s["staleness_mean"], staleness_max=s["staleness_max"],
               drop_fraction=s["n_dropped"] / (s["n_dropped"] + sum(s["staleness_hist"].values())),
               util_rollout=s["util_rollout"], util_teacher=s["util_teacher"], util_learner=s["util_learner"],
               **{k: s[k] for k in SKEW_SCALARS})           # what the policy did to the data (asyncopd.data_skew)
    return row, s["staleness_hist"]


def simulate_cells(todo: list[dict], workers: int, desc: str) -> list[tuple[dict, dict]]:
    """`simulate_cell` of every cell, over `workers` processes, with a progress bar."""
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:   # fork: no re-import per worker
        return list(tqdm(pool.map(simulate_cell, todo, chunksize=max(1, len(todo) // (20 * workers))),
                         total=len(todo), desc=desc, unit="sim"))


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """speedup and token_speedup vs the η = 0 row of the same split; speedup_vs_best_sync vs the fastest η = 0 split
    of the same (shape, σ, seed), whose learner GPUs are best_sync_learner_gpus."""
    sync = df[df.eta == 0]
    same = sync[SPLIT + ["samples_per_s", "tokens_per_s"]].rename(
        columns={"samples_per_s": "sync_samples_per_s", "tokens_per_s": "sync_tokens_per_s"})
    best = sync.sort_values("samples_per_s", kind="stable").groupby(KEY).tail(1)
    best = best[KEY + ["learner_gpus", "samples_per_s"]].rename(
        columns={"learner_gpus": "best_sync_learner_gpus", "samples_per_s": "best_sync_samples_per_s"})
    out = df.merge(same, on=SPLIT, how="left").merge(best, on=KEY, how="left")
    return out.assign(speedup=out.samples_per_s / out.sync_samples_per_s,
                      token_speedup=out.tokens_per_s / out.sync_tokens_per_s,
                      speedup_vs_best_sync=out.samples_per_s / out.best_sync_samples_per_s)


def measure_toy_point(p: ToyPoint, out_dir: Path) -> pd.DataFrame:
    """Concurrent toy runs at η = 0 (calibration) and η = p.eta (held out), via studies.sim_vs_real; one row each."""
    spec = lambda name, eta: sim_vs_real.RunSpec(name=name, eta=eta, batch_size=p.toy.batch_size)  # noqa: E731
    svr = sim_vs_real.Config(calibration=spec("sync", 0), configs=[spec(f"eta{p.eta}", p.eta)], steps=p.steps,
                             warmup=p.warmup, placement=p.placement, sim_seeds=p.sim_seeds, toy=p.toy)
    load_1min = os.getloadavg()[0]                   # other work on this machine slows the measured runs
    df = sim_vs_real.run(svr, out_dir).assign(load_1min=load_1min, cpus=os.cpu_count())
    for src in ("measured", "predicted"):
        df[f"{src}_speedup"] = df[f"{src}_samples_per_s"] / df[f"{src}_samples_per_s"].iloc[0]
    return df


def run(cfg: Config, out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """(results with speedups, staleness histograms, toy point or None). The toy point is measured first: it times
    real processes, which the simulations would slow down."""
    toy = measure_toy_point(cfg.toy_point, Path(out_dir) / "toy_point") if cfg.measure_toy else None
    done = simulate_cells(cells(cfg), cfg.workers, "throughput simulations")
    rows = pd.DataFrame([r for r, _ in done])
    hists = pd.DataFrame([{**{k: r[k] for k in (*SPLIT, "eta", "on_stale", "default_split", "workload_sigma")},
                           "staleness": k, "count": n, "fraction": n / sum(h.values())}
                          for r, h in done for k, n in h.items()])
    return add_speedups(rows), hists, toy


def with_sync_per_mode(df: pd.DataFrame) -> pd.DataFrame:
    """The η = 0 rows repeated under every on_stale mode, so that each mode's curve starts at its baseline."""
    modes = sorted(set(df.on_stale) - {"sync"})
    return pd.concat([df[df.eta > 0], *(df[df.eta == 0].assign(on_stale=m) for m in modes)], ignore_index=True)


def band_marks(ax, cfg: Config) -> None:
    ax.axhspan(*cfg.band, color="C2", alpha=0.12, lw=0)
    ax.axhline(1, c="gray", lw=0.8, ls=":")


def plot(df: pd.DataFrame, hists: pd.DataFrame, toy: pd.DataFrame | None, cfg: Config, out_dir: Path) -> None:
    """speedup vs σ and vs split (rows: on_stale, columns: shape, lines: η), speedup vs η with the toy point,
    staleness histograms; the green band is the seeds' range."""
    sns.set_theme(style="whitegrid")
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)   # quiet: integer staleness as categories
    df = with_sync_per_mode(df)
    for name, d, x, y, xlabel, ylabel in (
            ("speedup_vs_sigma.png", df[df.default_split & (df.eta > 0)], "sigma", "speedup",
             "lognormal σ of response length", "R(η) / R(0), same split"),
            ("speedup_vs_split.png", df[df.workload_sigma], "learner_gpus", "speedup_vs_best_sync",
             "learner GPUs (the rest: rollout)", "R(η) / best sync split")):
        g = sns.relplot(d, x=x, y=y, hue="eta", row="on_stale", col="shape", kind="line", marker="o",
                        errorbar=("pi", 100), palette="crest", height=3, aspect=1.3, facet_kws={"sharey": False})
        for ax in g.axes.flat:
            band_marks(ax, cfg)
            if x == "learner_gpus":
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks := sorted(d.learner_gpus.unique()), labels=[str(t) for t in ticks])
                ax.minorticks_off()
        g.set_titles("{col_name} | {row_name}", size=8).set_axis_labels(xlabel, ylabel)
        g.savefig(out_dir / name, dpi=110)
        plt.close(g.figure)
    d = df[df.default_split & df.workload_sigma]
    etas = sorted(d.eta.unique())
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sns.lineplot(d, x="eta", y="speedup", hue="shape", style="on_stale", markers=True, errorbar=None, ax=ax)
    ax.plot(etas, [e + 1 for e in etas], c="gray", ls="--", label="η + 1")
    band_marks(ax, cfg)
    if toy is not None:
        for src, m in (("measured", "X"), ("predicted", "o")):
            ax.scatter(toy.eta, toy[f"{src}_speedup"], marker=m, c="k", s=60, zorder=5, label=f"toy CPU, {src}")
    ax.set(xlabel="η (max staleness)", ylabel="R(η) / R(0)", title="default split, workload σ; band: seeds' range")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.savefig(out_dir / "speedup_vs_eta.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    h = hists[hists.default_split & hists.workload_sigma & (hists.eta > 0)]
    g = sns.catplot(h, x="staleness", y="fraction", hue="on_stale", col="eta", row="shape", kind="bar",
                    errorbar=None, height=2.4, aspect=1.2, sharex=False)
    g.set_titles("{row_name} | η = {col_name}", size=7)
    g.savefig(out_dir / "staleness.png", dpi=110)
    plt.close(g.figure)


def verdicts(df: pd.DataFrame, toy: pd.DataFrame | None, cfg: Config) -> list[str]:
    """Claims decided from the numbers, over the default splits (every σ) unless said otherwise."""
    lo, hi = cfg.band
    a = df[(df.eta > 0) & df.default_split]
    per = a.assign(inside=a.speedup.between(lo, hi)).groupby(["on_stale", "eta"]).agg(
        low=("speedup", "min"), high=("speedup", "max"), inside=("inside", "mean"))
    out = [f"Seeds' {lo}–{hi}× range: {a.speedup.between(lo, hi).mean():.0%} of the async cells fall in it; "
           + "; ".join(f"{m} η={e}: {r.low:.2f}–{r.high:.2f}× ({r.inside:.0%} in)" for (m, e), r in per.iterrows())]
    s0, s1 = a.sigma.min(), a.sigma.max()
    for mode, d in a.groupby("on_stale"):
        ends = d.pivot_table(index=["shape", "eta"], columns="sigma", values=["speedup", "token_speedup"])
        ratio, tokens = (ends[y][s1] / ends[y][s0] for y in ("speedup", "token_speedup"))
        word = ("grows with the tail" if (ratio > 1.1).mean() >= 0.5 else
                "is flat in the tail" if ratio.between(0.9, 1.1).all() else
                "does not grow consistently with the tail")
        out.append(f"{mode}: the speedup {word} (grows: > 1.1 for at least half of shapes × η; flat: all within "
                   f"±10%): speedup(σ={s1:g}) / speedup(σ={s0:g}) = {ratio.min():.2f}–{ratio.max():.2f} in "
                   f"samples/s, {tokens.min():.2f}–{tokens.max():.2f} in trained tokens/s")
    wait = a[a.on_stale == "wait"]
    if len(wait):
        f = wait.speedup / (wait.eta + 1)
        out.append(f"wait: speedup / (η+1) = {f.min():.2f}–{f.max():.2f} ({(f.between(0.9, 1.15)).mean():.0%} of "
                   f"cells within 0.9–1.15): near 1 the gain is concurrency, (η+1)·B in flight on replicas "
                   f"that one batch of B under-fills; below 1 a role saturates")
    slow = a[a.weight_sync_s > a.learner_period_s].groupby("shape")[["weight_sync_s", "learner_period_s"]].mean()
    out += [f"{shape}: weight_sync_s {r.weight_sync_s:g} s exceeds a learner step + publish "
            f"({r.learner_period_s:.2g} s) and the model starts no request on outdated weights, so the replicas admit "
            f"only while the learner stalls, in bursts (staleness.png), which caps the async speedup"
            for shape, r in slow.iterrows()]
    sync = df[(df.eta == 0) & df.workload_sigma]
    best = sync.loc[sync.groupby("shape").samples_per_s.idxmax()].set_index("shape")
    dflt = sync[sync.default_split].set_index("shape").samples_per_s
    out.append("Best synchronous split (workload σ): " + "; ".join(
        f"{shape} {r.rollout_replicas} rollout / {r.learner_gpus} learner GPUs, {r.samples_per_s / dflt[shape]:.2f}× "
        f"the default split" for shape, r in best.iterrows()))
    if toy is not None:
        t = toy.iloc[1]
        out.append(f"Toy point (this CPU, {int(t.cpus)} cores, 1-min load {t.load_1min:.1f}; η={int(t.eta)}): "
                   f"measured {t.measured_speedup:.2f}×, predicted {t.predicted_speedup:.2f}× from the η=0 "
                   f"calibration ({t.predicted_speedup / t.measured_speedup - 1:+.0%}); "
                   f"{'inside' if lo <= t.measured_speedup <= hi else 'outside'} the seeds' range")
    return [v + "." for v in out]


def report(df: pd.DataFrame, toy: pd.DataFrame | None, cfg: Config) -> str:
    d = df[df.default_split & df.workload_sigma & (df.eta > 0)]
    t = d.groupby(["shape", "on_stale", "eta"]).agg(
        rollout=("rollout_replicas", "first"), learner_gpus=("learner_gpus", "first"), sigma=("sigma", "first"),
        speedup=("speedup", "mean"), token_speedup=("token_speedup", "mean"),
        vs_best_sync=("speedup_vs_best_sync", "mean"), staleness_mean=("staleness_mean", "mean"),
        drop_fraction=("drop_fraction", "mean"), util_rollout=("util_rollout", "mean"),
        util_teacher=("util_teacher", "mean"), util_learner=("util_learner", "mean")).reset_index()
    t.insert(3, "in band", t.speedup.between(*cfg.band))
    sync = df[(df.eta == 0) & df.workload_sigma].groupby(["shape", "rollout_replicas", "learner_gpus"]).agg(
        samples_per_s=("samples_per_s", "mean"), mean_length=("mean_length", "mean"),
        util_rollout=("util_rollout", "mean"), util_learner=("util_learner", "mean")).reset_index()
    tail = df[(df.eta == 0) & df.default_split].groupby(["shape", "sigma"]).mean_length.mean().unstack("sigma")
    lines = ["# throughput: when does asynchrony pay?", "",
             f"Simulated ({cfg.steps} learner steps, steady window after step {cfg.warmup}, seeds "
             f"{list(cfg.seeds)}) on {len(cfg.shapes)} example shapes; η ∈ {list(cfg.etas)}, on_stale ∈ "
             f"{list(cfg.on_stale)}, σ ∈ {sorted(df.sigma.unique().tolist())}. Speedup = steady samples/s ÷ η = 0 "
             "of the same split.", "",
             "η = 0 is the streaming synchronous baseline: the teacher scores each trajectory as it finishes, the "
             "learner waits for all B, the replicas wait for the new weights. The shapes' costs are derived from "
             "specs by a roofline (conf/cluster/, sim/specs.py): these are the speedups those assumptions imply, "
             "not measurements; "
             "calibrate them on a real run (`python -m sim.calibrate`) before relying on the numbers.", "",
             "## Claims", "", *[f"- {v}" for v in verdicts(df, toy, cfg)], "",
             "## Async at each workload's own σ, default split", "", markdown(t, ".3g"), "",
             "## Synchronous baseline per split (workload σ)", "", markdown(sync, ".3g"), "",
             "## Trained mean response length at η = 0 by σ (the tail is truncated at the workload's max)", "",
             markdown(tail.reset_index(), ".0f"), ""]
    if toy is not None:
        lines += ["## Measured toy point (concurrent, this machine)", "",
                  markdown(toy[["config", "eta", "measured_samples_per_s", "predicted_samples_per_s",
                                "measured_speedup", "predicted_speedup", "measured_staleness_mean",
                                "predicted_staleness_mean"]], ".3g"), ""]
    return "\n".join(lines + ["![speedup vs η](speedup_vs_eta.png)", "![speedup vs σ](speedup_vs_sigma.png)",
                              "![speedup vs split](speedup_vs_split.png)", "![staleness](staleness.png)", ""])


@hydra.main(version_base="1.3", config_path="../conf/studies/throughput", config_name="throughput")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    df, hists, toy = run(cfg, out_dir)
    df.to_csv(out_dir / "results.csv", index=False)
    hists.to_csv(out_dir / "staleness_hist.csv", index=False)
    if toy is not None:
        toy.to_csv(out_dir / "toy_point.csv", index=False)
    plot(df, hists, toy, cfg, out_dir)
    (out_dir / "report.md").write_text(text := report(df, toy, cfg))
    print(text)
    print(f"results.csv, report.md and figures in {out_dir}")


if __name__ == "__main__":
    main()
