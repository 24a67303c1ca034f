"""`python -m sim.plan`: capacity planner. Given a GPU budget, per-role costs and a workload, which
rollout : teacher : learner split and which staleness bound η give the most samples/s that the KL estimator
can afford, and why?

    python -m sim.plan gpus=64 'etas=[0,1,2,4]' estimator=reverse_kl_stale hydra.run.dir=outputs/plan/64
    python -m sim.plan cluster=h100x64_qwen3_8b_235b workload=chat_short gpus=128 on_stale=wait
    python -m sim.plan cluster=from_specs specs.gpu=a100-80gb specs.student=llama-3.1-8b \\
        specs.teacher=llama-3.1-70b cluster.gpus_per_teacher_replica=4 gpus=32     # costs from specs alone
    python -m sim.plan --config-dir <calibrate's output folder> cluster=calibrated gpus=64   # measured costs

The search (sim/planner.py) simulates the best splits at every η and ranks them; this module explains rank 1.
Writes into Hydra's run folder: plan.csv (one row per split × η, ranked, with each role's utilisation and
analytic capacity), frontier.csv (the best plan at smaller budgets), recommendation.txt (what is printed
below the table), costs.csv (with specs.gpu: every derived cost with its formula) and plan.png (samples/s
against η per split with the recommendation marked, and the GPUs → samples/s frontier).

The explanation names: the binding constraint (the role that saturates, or, when none does, the staleness
window: at most (η+1)·B sequences in flight and a step waiting for the longest of its B responses); each role's
utilisation and the samples/s it could sustain alone, so the spare capacity of the others is visible; the
runner-up and what it costs; whether the recommendation was chosen over a faster split inside the tie band
(and why: GPU-weighted utilisation); what the last GPUs of the budget buy (the frontier), flagged when it is less
than the tie band; and, with on_stale=drop, the share of rollouts dropped, of generated tokens wasted, and how much
shorter the trained responses are than the generated ones (dropping keeps the short ones, so samples/s flatters
it: compare tokens/s). Every row carries its length_bias and wasted_token_frac (asyncopd.data_skew);
`max_length_bias=0.1` sets aside the rows whose trained mean length is more than 10% off the generated one, and
the explanation names the fastest row it set aside.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd.files import atomic_write
from sim.planner import FORWARD, PlanConfig, eligible, frontier, run
from sim.specs import derivation

plt.switch_backend("Agg")
SATURATED = 0.9        # a role busier than this share of the time is the binding one
ROLES = ("rollout", "teacher", "learner")


def split_name(row, cfg: PlanConfig) -> str:
    c = cfg.cluster
    teacher = (f"{row.teacher_replicas}×{c.gpus_per_teacher_replica}" if c.placement == "separate"
               else c.placement.replace("_", " "))
    return f"{row.rollout_replicas}×{c.gpus_per_rollout_replica} / {teacher} / {row.learner_gpus}"


def recommend(df: pd.DataFrame, cfg: PlanConfig) -> str:
    """One line: rank 1 (the best kl_ok row after the tie-break), and the best row forward KL's bound allows."""
    e, lim, fwd = cfg.estimator, cfg.max_eta[cfg.estimator], cfg.max_eta[FORWARD]
    ok = df[eligible(df)]
    if ok.empty:
        limit = "" if cfg.max_length_bias is None else f" and max_length_bias={cfg.max_length_bias}"
        return (f"No candidate fits {e}'s tolerated η ≤ {lim}{limit}: add an η ≤ {lim} to etas"
                + (", use on_stale=wait (or pacing: on_stale=deadline pipeline_depth=1) or loosen the bias limit."
                   if limit else "."))
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


def binding(row, cfg: PlanConfig) -> str:
    """Which constraint sets rank 1's samples/s, and why GPUs added to the other roles would not raise it."""
    util = {r: 1 - row[f"idle_{r}"] for r in ROLES if not pd.isna(row[f"rate_{r}"])}
    caps = ", ".join(f"{r} {row[f'rate_{r}']:.3g}" for r in util)
    role = max(util, key=util.get)
    busy = sorted((r for r in util if util[r] >= SATURATED), key=util.get, reverse=True)
    if busy:
        spare = [r for r in util if r not in busy]
        names = " and ".join(busy)
        why = (f"the {' and '.join(spare)} {'has' if len(spare) == 1 else 'have'} spare capacity, so GPUs moved "
               f"{'there' if len(spare) == 1 else 'to them'} would not raise samples/s; GPUs for the {names} would"
               if spare else "every role is saturated: GPUs for any of them would help")
        return (f"Binding: the {names} ({', '.join(f'{util[r]:.0%}' for r in busy)} busy). Alone each role sustains "
                f"(samples/s, analytic): {caps}; {why}.")
    window = (row.pipeline_depth + 1) * cfg.workload.batch_size
    return (f"Binding: the staleness window, not a role: no role is {SATURATED:.0%} busy (busiest: {role} "
            f"{util[role]:.0%}). At most (D+1)·B = {window} sequences are in flight (D = {row.pipeline_depth}, the "
            f"admission depth) and a step waits for the "
            f"longest of its {cfg.workload.batch_size} responses, so the simulation reaches "
            f"{row.samples_per_s / row.bound_samples_per_s:.0%} of the slowest role's capacity (samples/s, "
            f"analytic: {caps}). More GPUs do not help here; "
            + (f"a deeper pipeline (pipeline_depth up to η = {row.eta}) " if row.pipeline_depth < row.eta else
               "a larger η (if the estimator tolerates it) ")
            + "or shorter length tails would.")


def explain(df: pd.DataFrame, front: pd.DataFrame, cfg: PlanConfig) -> list[str]:
    """The lines printed under the table (module docstring)."""
    ok = df[eligible(df)]
    if ok.empty:
        return [recommend(df, cfg)]
    best = ok.iloc[0]
    lines = [recommend(df, cfg), binding(best, cfg),
             "Utilisation: " + ", ".join(f"{r} {1 - best[f'idle_{r}']:.0%}" for r in ROLES
                                         if not pd.isna(best[f"rate_{r}"]))
             + f"; GPU-weighted {best.busy_gpu_frac:.0%} busy."]
    fastest = ok.sort_values("samples_per_s", ascending=False, kind="stable").iloc[0]
    if fastest["rank"] != best["rank"]:
        lines.append(f"Chosen over the fastest row ({split_name(fastest, cfg)}, η = {fastest.eta}, "
                     f"{fastest.samples_per_s / best.samples_per_s - 1:+.1%} samples/s, inside the "
                     f"{cfg.tie_band:.0%} tie band) because it keeps its GPUs busier "
                     f"({best.busy_gpu_frac:.0%} vs {fastest.busy_gpu_frac:.0%} GPU-weighted).")
    runner = ok[(ok.rollout_replicas != best.rollout_replicas) | (ok.teacher_replicas != best.teacher_replicas)
                | (ok.learner_gpus != best.learner_gpus)]
    if len(runner):
        u = runner.iloc[0]
        lines.append(f"Runner-up: {split_name(u, cfg)} at η = {u.eta}: {u.samples_per_s:.3g} samples/s "
                     f"({u.samples_per_s / best.samples_per_s - 1:+.1%}), {u.gpus_used} GPUs, "
                     f"{u.busy_gpu_frac:.0%} GPU-weighted busy.")
    lines += frontier_lines(front, best, cfg)
    if cfg.on_stale == "drop" and best.n_dropped:
        lines.append(f"Caveat (on_stale=drop): {best.n_dropped} of {best.n_dropped + best.n_trained} finished "
                     f"rollouts ({best.n_dropped / (best.n_dropped + best.n_trained):.0%}) were dropped as too stale, "
                     f"{best.wasted_token_frac:.0%} of the generated tokens; trained responses average "
                     f"{best.len_trained_mean:.0f} tokens against {best.len_generated_mean:.0f} generated "
                     f"({best.length_bias:+.0%}): dropping keeps the short ones, so samples/s flatters it; compare "
                     f"tokens/s, plan with on_stale=wait or pacing (on_stale=deadline pipeline_depth=1), or bound it "
                     f"with max_length_bias=.")
    skipped = df[df.kl_ok & ~df.bias_ok]
    if len(skipped):
        lines.append(f"{len(skipped)} rows within the η bound were set aside for a length bias beyond "
                     f"max_length_bias={cfg.max_length_bias} (the fastest: {split_name(skipped.iloc[0], cfg)} at "
                     f"η = {skipped.iloc[0].eta}, {skipped.iloc[0].samples_per_s:.3g} samples/s, length bias "
                     f"{skipped.iloc[0].length_bias:+.0%}).")
    return lines


def frontier_lines(front: pd.DataFrame, best, cfg: PlanConfig) -> list[str]:
    if front.empty:
        return []
    points = [*zip(front.gpus_used, front.samples_per_s), (best.gpus_used, best.samples_per_s)]
    line = (f"Frontier at η = {best.eta}: " + ", ".join(f"{g} GPUs → {s:.3g}" for g, s in points)
            + " samples/s.")
    g_prev, s_prev = points[-2]
    gain = best.samples_per_s / s_prev - 1
    if gain < cfg.tie_band:
        line += (f" The last {best.gpus_used - g_prev} GPUs buy {gain:+.1%}, less than the {cfg.tie_band:.0%} "
                 f"tie band: {g_prev} GPUs do the same work.")
    else:
        line += f" The last {best.gpus_used - g_prev} GPUs buy {gain:+.0%}."
    return [line]


def table(df: pd.DataFrame, cfg: PlanConfig) -> str:
    t = df.head(cfg.top).assign(split=[split_name(row, cfg) for row in df.head(cfg.top).itertuples()])
    t = t[["rank", "split", "eta", "samples_per_s", "tokens_per_s", "staleness_mean", "staleness_max",
           "idle_rollout", "idle_teacher", "idle_learner", "busy_gpu_frac", "length_bias", "wasted_token_frac",
           "kl_ok", "advice"]]
    return t.rename(columns={"split": "rollout / teacher / learner GPUs", "samples_per_s": "samples/s",
                             "tokens_per_s": "tokens/s", "staleness_mean": "stale mean", "staleness_max": "max",
                             "idle_rollout": "idle R", "idle_teacher": "idle T", "idle_learner": "idle L",
                             "busy_gpu_frac": "busy", "length_bias": "len bias",
                             "wasted_token_frac": "wasted"}).to_string(
        index=False, formatters={"samples/s": "{:.3g}".format, "tokens/s": "{:.3g}".format,
                                 "stale mean": "{:.2f}".format, "idle R": "{:.0%}".format,
                                 "idle T": "{:.0%}".format, "idle L": "{:.0%}".format, "busy": "{:.0%}".format,
                                 "len bias": "{:+.0%}".format, "wasted": "{:.0%}".format})


def plot(df: pd.DataFrame, front: pd.DataFrame, cfg: PlanConfig, path: Path) -> None:
    """Left: samples/s against η, a colour per learner size and a line style per teacher count, ✕ where η is
    beyond the estimator's bound, a star on the recommendation. Right: the GPUs → samples/s frontier."""
    d = df.assign(split=[split_name(row, cfg) for row in df.itertuples()],
                  learner=[f"learner {L} GPUs" for L in df.learner_gpus])
    fig, (ax, fx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    order = [f"learner {L} GPUs" for L in sorted(set(df.learner_gpus))]
    sns.lineplot(d, x="eta", y="samples_per_s", hue="learner", hue_order=order, style="split", palette="viridis",
                 ax=ax, legend="full", markers=False, dashes=True)
    bad = d[~d.kl_ok]
    ax.scatter(bad.eta, bad.samples_per_s, marker="x", c="0.3", s=30, label=f"too stale for {cfg.estimator}")
    ok = d[eligible(d)]
    if len(ok):
        b = ok.iloc[0]
        ax.scatter([b.eta], [b.samples_per_s], marker="*", s=260, c="crimson", zorder=5,
                   label=f"recommended: {b.split}, η={b.eta}")
    ax.axvline(cfg.max_eta[cfg.estimator], ls="--", c="0.5", lw=1)
    ax.text(cfg.max_eta[cfg.estimator], ax.get_ylim()[1], f" {cfg.estimator} η bound", fontsize=7, va="top")
    ax.set(xlabel="η (max staleness)", ylabel="samples/s (simulated)",
           title=f"{cfg.gpus} GPUs: rollout / teacher / learner GPUs per line")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    if len(ok):
        pts = pd.concat([front, ok.iloc[:1]])[["gpus_used", "samples_per_s"]]
        fx.plot(pts.gpus_used, pts.samples_per_s, "o-", c="crimson")
        fx.set(xlabel="GPU budget", ylabel="best samples/s", title=f"frontier at η = {ok.iloc[0].eta}",
               ylim=(0, None), xlim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(dcfg: DictConfig) -> None:
    cfg: PlanConfig = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    df = run(cfg)
    ok = df[eligible(df)]
    front = frontier(cfg, int(ok.iloc[0].eta)) if len(ok) else pd.DataFrame()
    atomic_write(out_dir / "plan.csv", lambda tmp: df.to_csv(tmp, index=False))
    atomic_write(out_dir / "frontier.csv", lambda tmp: front.to_csv(tmp, index=False))
    if cfg.specs.enabled:
        costs = derivation(cfg.specs, cfg.cluster, cfg.workload)
        atomic_write(out_dir / "costs.csv", lambda tmp: costs.to_csv(tmp, index=False))
        print(f"costs derived from specs (gpu {cfg.specs.gpu}, student {cfg.specs.student}, teacher "
              f"{cfg.specs.teacher}; assumptions specs.assume.*):\n{costs.to_string(index=False)}\n")
    plot(df, front, cfg, out_dir / "plan.png")
    lines = explain(df, front, cfg)
    atomic_write(out_dir / "recommendation.txt", "\n".join(lines) + "\n")
    print(table(df, cfg))
    print("\n".join(lines))
    print(f"-> {out_dir}/plan.csv, frontier.csv, recommendation.txt, plan.png")


if __name__ == "__main__":
    main()
