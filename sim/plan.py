"""`python -m sim.plan`: capacity planner. Given a GPU budget, per-role costs and a workload, which
rollout : teacher : learner split and which staleness bound η give the most samples/s that the KL estimator
can afford?

    python -m sim.plan gpus=64 'etas=[0,1,2,4]' estimator=reverse_kl_stale hydra.run.dir=outputs/plan/64
    python -m sim.plan cluster=h100x64_qwen3_8b_235b workload=chat_short gpus=128 on_stale=wait

Writes plan.csv (one row per split × η, ranked), plan.png (samples/s against η per split) into Hydra's run
folder and prints the top rows and a one-line recommendation. `estimator=<preset>` picks a conf/estimator/ file;
only its name matters here: it selects the tolerated η below.

Search. With G GPUs, g_r GPUs per rollout replica and g_t per teacher replica (tensor parallel, from the
cluster), a split (r, t, L) has r·g_r + t·g_t + L ≤ G. L runs over `learner_gpus`, t over 1, 2, … (t = 0 for the
colocated placements, which are planned as given), and rollout fills the rest, r = ⌊(G − L − t·g_t)/g_r⌋ ≥ 1.
A split is kept only if no further replica fits (leftover < min(g_r, g_t)): the others waste GPUs. Simulating
every split × η is too slow at G = 64, so the splits are first ranked by an analytic throughput bound and the
best `max_splits` are simulated with `sim.model.simulate` at every η. With mean response length ℓ (sampled),
prompt length P, batch B and n = min(max_batch, ⌈(η+1)·B/r⌉) sequences per rollout replica (the scheduler
keeps at most (η+1)·B in flight), the samples/s each role can sustain are

    rollout  R_r = r / (ℓ·step_s(n)/n + P·prefill_s_per_token [+ score_s, teacher on rollout])
    teacher  R_t = t / score_s                                                        (separate placement)
    learner  R_L = B / (learner_step_s + s_tok(L)·B·ℓ + publish_s [+ B·score_s, teacher on learner])

where score_s = teacher_s_per_seq + teacher_s_per_token·(P+ℓ) + teacher_call_s/g scores one trajectory in calls
of g (teacher_max_batch, or score_group with the teacher on the rollout replicas).

and the bound is min(R_r, R_t, R_L) at η* = the largest η in etas the estimator tolerates; ties are broken by
the serial rate 1/Σ(1/R) (what η = 0 approaches). The best split of every learner size is kept, then the next
best bounds, up to `max_splits`. The simulated samples/s, not the bound, rank the plan (the bound is in plan.csv
for comparison; it ignores the response-length tail, which a synchronous step waits for).

Learner scaling. costs.learner_s_per_token was measured on L₀ = cluster.learner_gpus GPUs. Each doubling of
the learner is assumed to speed the per-token work up by 2e, e = learner_scaling_efficiency ∈ (0, 1]:

    s_tok(L) = s_tok(L₀) · (L₀/L) / e^{log₂(L/L₀)} = s_tok(L₀) · (L₀/L)^{1 + log₂ e}

(e = 1: linear; e = 0.9: 1.8× per doubling; e = 0.5: no gain). learner_step_s (optimizer, gradient sync),
publish_s and weight_sync_s are kept as measured: they are taken not to shrink with L. The teacher on the
learner's devices (teacher_with_learner) keeps its measured speed.

KL advice. studies/kl_direction (docs/kl_direction_report.md: toy backend, fixed staleness k ∈ {0,1,2,4,8},
2 seeds, 150 steps) measured what staleness costs per estimator. `max_eta[e]` is the largest tested k at which
e's final accuracy shows no loss against k = 0 under the report's own test (the seed ranges do not overlap and
the gap exceeds two binomial standard errors): forward KL and every corrected or recomputed reverse KL stay
within noise up to k = 8 (the largest tested); stale reverse KL collapses at k = 8 (−22.6 points), so its bound is
4. The conservative reading for stale reverse KL is 1: at k = 2 and 4 both seeds lose ~1 point and held-out
reverse KL rises 1.60 → 1.79 (`max_eta.reverse_kl_stale=1`). A bounded-async η gives staleness ≤ η, milder than
the study's every-sample-exactly-k, so the bounds are conservative. A row is kl_ok iff η ≤ max_eta[estimator].
Ranking: kl_ok rows first, then the rest, each by simulated samples/s (descending); rank 1 is the recommendation.
Caveat: with on_stale=drop, short responses finish first, so dropping biases samples/s upward (compare tokens/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd.config import ObjectiveConfig, check_finite
from asyncopd.scheduler import ON_STALE, SchedulerConfig
from sim.costs import ClusterShape, CostModel, Workload
from sim.model import simulate

plt.switch_backend("Agg")

FORWARD = "forward_kl_topk"
# Largest tested fixed staleness k with no significant accuracy loss vs k = 0 (docs/kl_direction_report.md).
MAX_ETA = {"forward_kl_topk": 8, "reverse_kl_stale": 4, "reverse_kl_stale_tis": 8, "reverse_kl_stale_clip": 8,
           "reverse_kl_recompute_tis": 8, "reverse_kl_recompute": 8, "reverse_kl_mc": 8}


@dataclass
class PlanConfig:
    cluster: ClusterShape = field(default_factory=ClusterShape)   # placement and GPUs per replica; its
    costs: CostModel = field(default_factory=CostModel)           # learner_gpus is where costs were measured
    workload: Workload = field(default_factory=Workload)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # set by the estimator group; unused
    gpus: int = 64                       # GPU budget, >= the smallest split (one replica of each role)
    etas: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])   # staleness bounds η tried, >= 0
    on_stale: str = "drop"               # drop | wait, as SchedulerConfig.on_stale
    learner_gpus: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # sizes tried (>= 1; too big: skipped)
    learner_scaling_efficiency: float = 0.9   # e in (0, 1]: each doubling of the learner is 2e× faster per token
    max_splits: int = 8                  # splits simulated (best analytic bounds), >= 1
    steps: int = 30                      # learner steps simulated per candidate, >= 1
    seed: int = 0                        # response lengths, >= 0
    estimator: str = "reverse_kl_stale"  # preset name (conf/estimator/); the CLI takes it from the group choice
    max_eta: dict[str, int] = field(default_factory=lambda: dict(MAX_ETA))   # tolerated η per estimator, >= 0
    top: int = 10                        # rows in the printed table, >= 1

    def __post_init__(self):
        check_finite(self)
        for name, lo in (("max_splits", 1), ("steps", 1), ("seed", 0), ("top", 1)):
            x = getattr(self, name)
            if not isinstance(x, int) or isinstance(x, bool) or x < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")
        for name, lo in (("etas", 0), ("learner_gpus", 1)):
            v = list(getattr(self, name))
            if not v or len(set(v)) < len(v) or not all(isinstance(x, int) and x >= lo for x in v):
                raise ValueError(f"{name} must be a non-empty list of distinct ints >= {lo}, got {v!r}")
        if self.on_stale not in ON_STALE:
            raise ValueError(f"on_stale must be one of {ON_STALE}, got {self.on_stale!r}")
        e = self.learner_scaling_efficiency
        if not (isinstance(e, (int, float)) and 0 < e <= 1):
            raise ValueError(f"learner_scaling_efficiency must be in (0, 1], got {e!r}")
        bad = {k: v for k, v in self.max_eta.items() if not isinstance(v, int) or v < 0}
        if bad or FORWARD not in self.max_eta:
            raise ValueError(f"max_eta must map estimator names to ints >= 0 and include {FORWARD!r}, got "
                             f"{dict(self.max_eta)!r}")
        if self.estimator not in self.max_eta:
            raise ValueError(f"estimator must be one of {sorted(self.max_eta)} (the presets with a measured η "
                             f"bound), got {self.estimator!r}; add one with +max_eta.{self.estimator}=<η>")
        c = self.cluster
        least = c.gpus_per_rollout_replica + min(self.learner_gpus) + (
            c.gpus_per_teacher_replica if c.placement == "separate" else 0)
        if not isinstance(self.gpus, int) or self.gpus < least:
            raise ValueError(f"gpus must be an int >= {least} (one rollout replica, "
                             f"{'one teacher replica, ' if c.placement == 'separate' else ''}the smallest "
                             f"learner of learner_gpus={list(self.learner_gpus)}), got {self.gpus!r}")


ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def enumerate_splits(cfg: PlanConfig) -> list[tuple[int, int, int]]:
    """Every (r, t, L) with r·g_r + t·g_t + L ≤ gpus, r, t ≥ 1 (t = 0 colocated) and no room for one more replica."""
    c, G = cfg.cluster, cfg.gpus
    gr, gt = c.gpus_per_rollout_replica, c.gpus_per_teacher_replica
    sep = c.placement == "separate"
    out = []
    for L in sorted(cfg.learner_gpus):
        for t in range(1, (G - L - gr) // gt + 1) if sep else [0]:
            r = (G - L - t * gt) // gr
            left = G - L - t * gt - r * gr
            if r >= 1 and left < (min(gr, gt) if sep else gr):
                out.append((r, t, L))
    return out


def learner_costs(cfg: PlanConfig, L: int) -> CostModel:
    """The cost model with the learner on L GPUs: s_tok(L) = s_tok(L₀)·(L₀/L)/e^{log₂(L/L₀)} (see the top)."""
    L0, e = cfg.cluster.learner_gpus, cfg.learner_scaling_efficiency
    factor = (L0 / L) / e ** math.log2(L / L0)
    return replace(cfg.costs, learner_s_per_token=cfg.costs.learner_s_per_token * factor)


def mean_length(cfg: PlanConfig, n: int = 4096) -> float:
    rng = np.random.default_rng(cfg.seed)
    return float(np.mean([cfg.workload.length.sample(rng) for _ in range(n)]))


def bound(cfg: PlanConfig, r: int, t: int, L: int, eta: int, ell: float) -> tuple[float, float]:
    """(min(R_r, R_t, R_L), serial rate 1/Σ 1/R): the samples/s each role sustains alone (module docstring)."""
    c, w, placement = learner_costs(cfg, L), cfg.workload, cfg.cluster.placement
    B, P = w.batch_size, w.prompt_len
    group = cfg.cluster.score_group if placement == "teacher_with_rollout" else c.teacher_max_batch
    score_s = c.teacher_s_per_seq + c.teacher_s_per_token * (P + ell) + c.teacher_call_s / group   # one trajectory
    n = min(c.max_batch, math.ceil((eta + 1) * B / r))
    per_traj = ell * c.step_s(n) / n + P * c.prefill_s_per_token       # replica-seconds per trajectory
    per_traj += score_s if placement == "teacher_with_rollout" else 0
    rates = [r / per_traj]
    if placement == "separate":
        rates.append(t / score_s if score_s > 0 else math.inf)
    step = c.learner_step_s + c.learner_s_per_token * B * ell + c.publish_s
    rates.append(B / (step + (B * score_s if placement == "teacher_with_learner" else 0)))
    serial = 1 / sum(1 / x for x in rates)
    return min(rates), serial


def select_splits(cfg: PlanConfig, ell: float) -> list[tuple[int, int, int]]:
    """The `max_splits` splits to simulate: the best bound of each learner size first, then the next best bounds.
    The bound is taken at η* = the largest η in etas that the estimator tolerates (max(etas) if none)."""
    ok = [eta for eta in cfg.etas if advise(cfg, eta)[0]]
    eta_star = max(ok or cfg.etas)
    ranked = sorted(enumerate_splits(cfg), key=lambda s: bound(cfg, *s, eta_star, ell), reverse=True)
    firsts = [next(s for s in ranked if s[2] == L) for L in sorted({s[2] for s in ranked})]
    firsts.sort(key=ranked.index)
    return (firsts + [s for s in ranked if s not in firsts])[:cfg.max_splits]


def advise(cfg: PlanConfig, eta: int) -> tuple[bool, str]:
    """(kl_ok, short advice) for η under cfg.estimator's tolerated bound."""
    e, lim, fwd = cfg.estimator, cfg.max_eta[cfg.estimator], cfg.max_eta[FORWARD]
    if eta == 0:
        return True, "synchronous: no staleness"
    if eta <= lim:
        return True, f"η ≤ {lim}: {e} tolerated it"
    if eta <= fwd:
        return False, f"{e} tolerates η ≤ {lim}; forward KL tolerates η ≤ {fwd}"
    return False, f"beyond every tested bound (forward KL: η ≤ {fwd})"


def run(cfg: PlanConfig) -> pd.DataFrame:
    """Simulate the best `max_splits` splits at every η; return plan.csv's rows, ranked (module docstring)."""
    ell = mean_length(cfg)
    rows = []
    for r, t, L in select_splits(cfg, ell):
        shape = replace(cfg.cluster, rollout_replicas=r, teacher_replicas=t, learner_gpus=L)
        costs = learner_costs(cfg, L)
        for eta in cfg.etas:
            _, s = simulate(shape, costs, cfg.workload, SchedulerConfig(max_staleness=eta, on_stale=cfg.on_stale),
                            cfg.steps, cfg.seed)
            kl_ok, advice = advise(cfg, eta)
            util = {role: s[f"util_{role}"] for role in ("rollout", "teacher", "learner")}
            rows.append(dict(
                rollout_replicas=r, teacher_replicas=t, learner_gpus=L, gpus_used=shape.gpus, eta=eta,
                samples_per_s=s["samples_per_s"], tokens_per_s=s["tokens_per_s"],
                staleness_mean=s["staleness_mean"], staleness_max=s["staleness_max"],
                **{f"idle_{role}": 1 - u for role, u in util.items()},
                latency_mean_s=s["latency_mean_s"], n_dropped=s["n_dropped"],
                bound_samples_per_s=bound(cfg, r, t, L, eta, ell)[0], bottleneck=max(util, key=util.get),
                kl_ok=kl_ok, advice=advice))
    df = pd.DataFrame(rows).sort_values(["kl_ok", "samples_per_s"], ascending=False, kind="stable")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def split_name(row, cfg: PlanConfig) -> str:
    c = cfg.cluster
    teacher = (f"{row.teacher_replicas}×{c.gpus_per_teacher_replica}" if c.placement == "separate"
               else c.placement.replace("_", " "))
    return f"{row.rollout_replicas}×{c.gpus_per_rollout_replica} / {teacher} / {row.learner_gpus}"


def recommend(df: pd.DataFrame, cfg: PlanConfig) -> str:
    """One line: the best kl_ok row, and the best row forward KL's bound would allow."""
    e, lim, fwd = cfg.estimator, cfg.max_eta[cfg.estimator], cfg.max_eta[FORWARD]
    ok = df[df.kl_ok]
    if ok.empty:
        return f"No candidate fits {e}'s tolerated η ≤ {lim}: add an η ≤ {lim} to etas."
    b = ok.iloc[0]
    line = (f"Recommendation for {e} (η ≤ {lim}): rollout / teacher / learner GPUs = {split_name(b, cfg)}, "
            f"η = {b.eta}: {b.samples_per_s:.3g} samples/s, staleness mean {b.staleness_mean:.2f}.")
    if e == FORWARD:
        return line
    f = df[df.eta <= fwd].sort_values("samples_per_s", ascending=False).iloc[0]
    if f.samples_per_s <= b.samples_per_s:
        more = f"; it would allow η up to {fwd}, beyond etas" if max(cfg.etas) < fwd else ""
        return line + f" Forward KL (η ≤ {fwd}) does no better with η ≤ {max(cfg.etas)}{more}."
    return line + (f" Forward KL (η ≤ {fwd}) would allow {split_name(f, cfg)} at η = {f.eta}: "
                   f"{f.samples_per_s:.3g} samples/s ({f.samples_per_s / b.samples_per_s - 1:+.0%}).")


def table(df: pd.DataFrame, cfg: PlanConfig) -> str:
    t = df.head(cfg.top).assign(split=[split_name(row, cfg) for row in df.head(cfg.top).itertuples()])
    t = t[["rank", "split", "eta", "samples_per_s", "tokens_per_s", "staleness_mean", "staleness_max",
           "idle_rollout", "idle_teacher", "idle_learner", "n_dropped", "kl_ok", "advice"]]
    return t.rename(columns={"split": "rollout / teacher / learner GPUs", "samples_per_s": "samples/s",
                             "tokens_per_s": "tokens/s", "staleness_mean": "stale mean", "staleness_max": "max",
                             "idle_rollout": "idle R", "idle_teacher": "idle T", "idle_learner": "idle L",
                             "n_dropped": "dropped"}).to_string(
        index=False, formatters={"samples/s": "{:.3g}".format, "tokens/s": "{:.3g}".format,
                                 "stale mean": "{:.2f}".format, "idle R": "{:.0%}".format,
                                 "idle T": "{:.0%}".format, "idle L": "{:.0%}".format})


def plot(df: pd.DataFrame, cfg: PlanConfig, path: Path) -> None:
    """samples/s against η, one line per split; ✕ where η is beyond the estimator's bound."""
    d = df.assign(split=[split_name(row, cfg) for row in df.itertuples()])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sns.lineplot(d, x="eta", y="samples_per_s", hue="split", ax=ax, legend="brief")
    sns.scatterplot(d, x="eta", y="samples_per_s", hue="split", style="kl_ok", markers={True: "o", False: "X"},
                    style_order=[True, False], ax=ax, legend=False, s=50)
    ax.axvline(cfg.max_eta[cfg.estimator], ls="--", c="C3", label=f"{cfg.estimator} η bound")
    ax.axvline(cfg.max_eta[FORWARD], ls=":", c="k", label="forward KL η bound")
    ax.set(xlabel="η (max staleness)", ylabel="samples/s (simulated)",
           title=f"{cfg.gpus} GPUs, rollout / teacher / learner GPUs; ✕ = too stale for {cfg.estimator}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(dcfg: DictConfig) -> None:
    cfg: PlanConfig = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    df = run(cfg)
    df.to_csv(out_dir / "plan.csv", index=False)
    plot(df, cfg, out_dir / "plan.png")
    print(table(df, cfg))
    print(recommend(df, cfg))
    print(f"-> {out_dir}/plan.csv, plan.png")


if __name__ == "__main__":
    main()
