"""The capacity planner's search: which rollout : teacher : learner split and which staleness bound η give the
most samples/s that the KL estimator can afford, for a GPU budget, per-role costs and a workload.
`python -m sim.plan` (sim/plan.py) is its command line and explains the answer; this module finds it.

Search. With G GPUs, g_r GPUs per rollout replica and g_t per teacher replica (tensor parallel, from the
cluster), a split (r, t, L) has r·g_r + t·g_t + L ≤ G. L runs over `learner_gpus`, t over 1, 2, … (t = 0 for the
colocated placements, which are planned as given), and rollout fills the rest, r = ⌊(G − L − t·g_t)/g_r⌋ ≥ 1.
A split is kept only if no further replica fits (leftover < min(g_r, g_t)): the others waste GPUs. Simulating
every split × η is too slow at G = 64, so the splits are first ranked by an analytic throughput bound and the
best `max_splits` are simulated with `sim.model.simulate` at every η. With mean response length ℓ (sampled),
prompt length P, batch B and n = min(max_batch, ⌈(D+1)·B/r⌉) sequences per rollout replica (the scheduler
keeps at most (D+1)·B in flight, D = min(pipeline_depth, η) the admission depth, η without pacing), the samples/s
each role can sustain are

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

KL advice. studies/kl_direction (docs/kl_direction_report.md: toy backend, fixed staleness k ∈ {0, 1, 4, 16},
3 seeds, 150 steps at lr 1e-3, B = 128) measured what staleness costs per estimator. `max_eta[e]` is the largest
tested k up to which e's final accuracy shows no loss against k = 0 under the report's own test (the seed ranges
do not overlap and the gap exceeds two binomial standard errors of one evaluation): forward top-k stays within
noise up to k = 16 (−2.0, −2.9, −1.0 points at k = 1, 4, 16; bands ±3.1); every reverse KL in the grid loses at
k = 1 already: top-k −4.1 points, recompute + TIS −4.4, and the stale signal collapses (0.80 → 0 accuracy, with
TIS 0.77 → 0.24), so their bound is 0. Estimators outside that grid (clip, VCPO, no-ratio recompute, Monte
Carlo) have no measured bound: pass one with `+max_eta.<name>=<η>`. These are toy numbers at a large step size:
the bias of stale data grows with staleness × step size, so a run with a much smaller lr tolerates more; set
max_eta from a measurement at your own lr where you have one. A bounded-async η gives staleness ≤ η, milder
than the study's every-sample-exactly-k. A row is kl_ok iff η ≤ max_eta[estimator].
Ranking: kl_ok rows first, then the rest, each by simulated samples/s (descending); rank 1 is the recommendation.
Caveat: with on_stale=drop, short responses finish first, so dropping biases samples/s upward (compare tokens/s).
Pacing (on_stale=deadline, pipeline_depth=D; asyncopd/scheduler.py) drops nothing: each candidate η is then the
slack a straggler may use, admission runs min(D, η) versions ahead, and kl_ok still judges the bound η.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import pandas as pd
from hydra.core.config_store import ConfigStore

from asyncopd.config import ObjectiveConfig, check_finite
from asyncopd.scheduler import ON_STALE, SchedulerConfig
from sim.costs import ClusterShape, CostModel, Workload
from sim.model import simulate
from sim.specs import Specs, costs_for, learner_state_fits

FORWARD = "forward_kl_topk"
# Largest tested fixed staleness k with no significant accuracy loss vs k = 0 (docs/kl_direction_report.md,
# "Dose–response"; see "KL advice" above): forward KL holds to the grid's end, every reverse KL loses at k = 1.
MAX_ETA = {"forward_kl_topk": 16, "reverse_kl_topk": 0, "reverse_kl_stale": 0, "reverse_kl_stale_tis": 0,
           "reverse_kl_recompute_tis": 0}


@dataclass
class PlanConfig:
    cluster: ClusterShape = field(default_factory=ClusterShape)   # placement and GPUs per replica; its
    costs: CostModel = field(default_factory=CostModel)           # learner_gpus is where costs were measured
    workload: Workload = field(default_factory=Workload)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # set by the estimator group; unused
    gpus: int = 64                       # GPU budget, >= the smallest split (one replica of each role)
    etas: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])   # staleness bounds η tried, >= 0
    on_stale: str = "drop"               # drop | wait | deadline, as SchedulerConfig.on_stale
    pipeline_depth: Optional[int] = None  # admission depth D >= 0: at each η the scheduler runs min(D, η); None: η
    learner_gpus: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # sizes tried (>= 1; too big: skipped)
    learner_scaling_efficiency: float = 0.9   # e in (0, 1]: each doubling of the learner is 2e× faster per token
    max_splits: int = 8                  # splits simulated (best analytic bounds), >= 1
    steps: int = 30                      # learner steps simulated per candidate, >= 1
    seed: int = 0                        # response lengths, >= 0
    estimator: str = "reverse_kl_stale"  # preset name (conf/estimator/); the CLI takes it from the group choice
    max_eta: dict[str, int] = field(default_factory=lambda: dict(MAX_ETA))   # tolerated η per estimator, >= 0
    top: int = 10                        # rows in the printed table, >= 1
    tie_band: float = 0.02               # rows within this fraction of the best samples/s count as tied, [0, 1)
    frontier: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # budget fractions also planned
    max_length_bias: Optional[float] = None   # |len_trained_mean / len_generated_mean − 1| allowed, >= 0; None: any
    specs: Specs = field(default_factory=Specs)   # specs.gpu set: costs derived per learner size (sim/specs.py),
                                                  # costs.* set by hand override them

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
        d = self.pipeline_depth
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
            raise ValueError(f"pipeline_depth must be an int >= 0 or null (= η), got {d!r}")
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
        if self.max_length_bias is not None and not self.max_length_bias >= 0:
            raise ValueError(f"max_length_bias must be >= 0 or null (no limit), got {self.max_length_bias!r}")
        if not 0 <= self.tie_band < 1:
            raise ValueError(f"tie_band must be in [0, 1), got {self.tie_band!r}")
        if not all(0 < f < 1 for f in self.frontier):
            raise ValueError(f"frontier must hold budget fractions in (0, 1), got {list(self.frontier)!r}")
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
        if cfg.specs.enabled and not learner_state_fits(cfg.specs, L):
            continue                                   # too few GPUs for the weights + AdamW states
        for t in range(1, (G - L - gr) // gt + 1) if sep else [0]:
            r = (G - L - t * gt) // gr
            left = G - L - t * gt - r * gr
            if r >= 1 and left < (min(gr, gt) if sep else gr):
                out.append((r, t, L))
    return out


def admission_depth(cfg: PlanConfig, eta: int) -> int:
    """The scheduler's pipeline depth D at η: min(pipeline_depth, η), or η when pipeline_depth is None."""
    return eta if cfg.pipeline_depth is None else min(cfg.pipeline_depth, eta)


def learner_costs(cfg: PlanConfig, L: int) -> CostModel:
    """The cost model with the learner on L GPUs: derived for L from the specs when they are given, else
    s_tok(L) = s_tok(L₀)·(L₀/L)/e^{log₂(L/L₀)} (see the top)."""
    if cfg.specs.enabled:                           # derived for L; costs.* set by hand still win
        return costs_for(cfg.specs, replace(cfg.cluster, learner_gpus=L), cfg.workload, cfg.costs)
    L0, e = cfg.cluster.learner_gpus, cfg.learner_scaling_efficiency
    factor = (L0 / L) / e ** math.log2(L / L0)
    return replace(cfg.costs, learner_s_per_token=cfg.costs.learner_s_per_token * factor)


def mean_length(cfg: PlanConfig, n: int = 4096) -> float:
    rng = np.random.default_rng(cfg.seed)
    return float(np.mean([cfg.workload.length.sample(rng) for _ in range(n)]))


def bound(cfg: PlanConfig, r: int, t: int, L: int, eta: int, ell: float) -> tuple[float, float]:
    """(min(R_r, R_t, R_L), serial rate 1/Σ 1/R): the samples/s each role sustains alone (module docstring)."""
    rates = list(role_rates(cfg, r, t, L, eta, ell).values())
    return min(rates), 1 / sum(1 / x for x in rates)


def role_rates(cfg: PlanConfig, r: int, t: int, L: int, eta: int, ell: float) -> dict[str, float]:
    """{role: samples/s it sustains alone}: R_r, R_t (separate placement only) and R_L of the module docstring."""
    c, w, placement = learner_costs(cfg, L), cfg.workload, cfg.cluster.placement
    B, P = w.batch_size, w.prompt_len
    group = cfg.cluster.score_group if placement == "teacher_with_rollout" else c.teacher_max_batch
    score_s = c.teacher_s_per_seq + c.teacher_s_per_token * (P + ell) + c.teacher_call_s / group   # one trajectory
    n = min(c.max_batch, math.ceil((admission_depth(cfg, eta) + 1) * B / r))
    per_traj = ell * c.step_s(n) / n + P * c.prefill_s_per_token       # replica-seconds per trajectory
    per_traj += score_s if placement == "teacher_with_rollout" else 0
    rates = {"rollout": r / per_traj}
    if placement == "separate":
        rates["teacher"] = t / score_s if score_s > 0 else math.inf
    step = c.learner_step_s + c.learner_s_per_token * B * ell + c.publish_s
    learner_s = step + (B * score_s if placement == "teacher_with_learner" else 0)
    rates["learner"] = B / learner_s if learner_s > 0 else math.inf
    return rates


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
            sched = SchedulerConfig(max_staleness=eta, on_stale=cfg.on_stale,
                                    pipeline_depth=admission_depth(cfg, eta))
            _, s = simulate(shape, costs, cfg.workload, sched, cfg.steps, cfg.seed)
            kl_ok, advice = advise(cfg, eta)
            util = {role: s[f"util_{role}"] for role in ("rollout", "teacher", "learner")}
            gpus = {"rollout": r * shape.gpus_per_rollout_replica, "teacher": t * shape.gpus_per_teacher_replica,
                    "learner": L}
            rates = role_rates(cfg, r, t, L, eta, ell)
            rows.append(dict(
                rollout_replicas=r, teacher_replicas=t, learner_gpus=L, gpus_used=shape.gpus, eta=eta,
                pipeline_depth=sched.depth,
                samples_per_s=s["samples_per_s"], tokens_per_s=s["tokens_per_s"],
                staleness_mean=s["staleness_mean"], staleness_max=s["staleness_max"],
                **{f"idle_{role}": 1 - u for role, u in util.items()},
                busy_gpu_frac=sum(util[k] * gpus[k] for k in gpus) / shape.gpus,
                latency_mean_s=s["latency_mean_s"], n_dropped=s["n_dropped"],
                n_trained=cfg.steps * cfg.workload.batch_size,
                len_generated_mean=s["len_generated_mean"], len_trained_mean=s["len_trained_mean"],
                length_bias=s["length_bias"], wasted_token_frac=s["wasted_token_frac"],
                bias_ok=cfg.max_length_bias is None or abs(s["length_bias"]) <= cfg.max_length_bias,
                bound_samples_per_s=min(rates.values()),
                **{f"rate_{role}": rates.get(role, math.nan) for role in ("rollout", "teacher", "learner")},
                bottleneck=max(util, key=util.get), kl_ok=kl_ok, advice=advice))
    return rank(pd.DataFrame(rows), cfg.tie_band)


def eligible(df: pd.DataFrame) -> pd.Series:
    """The rows a recommendation may come from: kl_ok (η within the estimator's bound) and bias_ok (the length
    bias within max_length_bias; True when the column is absent)."""
    return df.kl_ok & (df.bias_ok if "bias_ok" in df else True)


def rank(df: pd.DataFrame, tie_band: float) -> pd.DataFrame:
    """`eligible` rows first. Among them, the rows within tie_band of the best samples/s are tied: a simulation of
    `steps` steps cannot tell them apart, so the one that keeps its GPUs busiest (`busy_gpu_frac`, the
    GPU-weighted utilisation) ranks first: it buys the same samples/s without parking GPUs on an idle role. Every
    other row follows by samples/s. Rank 1 is the recommendation (`in_band` marks the tied rows)."""
    ok = eligible(df)
    best = df.samples_per_s[ok].max() if ok.any() else math.inf
    df = df.assign(_ok=ok, in_band=ok & (df.samples_per_s >= (1 - tie_band) * best))
    df = df.assign(_busy=np.where(df.in_band, df.busy_gpu_frac, 0.0))
    df = df.sort_values(["_ok", "kl_ok", "in_band", "_busy", "samples_per_s"], ascending=False, kind="stable")
    df = df.drop(columns=["_busy", "_ok"])
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def frontier(cfg: PlanConfig, eta: int) -> pd.DataFrame:
    """The GPUs → samples/s frontier: the plan's rank-1 row at η for every budget fraction in cfg.frontier that
    still fits one replica of each role (smaller budgets are skipped). The full budget is the caller's own plan."""
    rows = []
    for f in sorted(cfg.frontier):
        gpus = round(f * cfg.gpus)
        try:
            sub = replace(cfg, gpus=gpus, etas=[eta], frontier=[])
        except ValueError:                              # the budget cannot hold one replica of each role
            continue
        if enumerate_splits(sub):
            rows.append(run(sub).iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)
