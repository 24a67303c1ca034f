"""The kl_direction study's report: does OPD work at the lowest k, what staleness then costs per estimator (the
dose–response and its k½), how k½ moves with the learning rate, and the claims, each decided from the numbers.

The input is studies.kl_direction.run's table: one row per cell × step with the labels estimator, staleness, seed
and lr, the held-out metrics, eval_prompts and teacher_accuracy (the teacher's held-out greedy accuracy on the
same prompts). A gap counts only beyond the noise band of studies/cells.compare.

    text = report(df)                                  # report.md
    k_half([0, 2, 4], [0.9, 0.8, 0.7], initial=0.7)    # 2.0: half of the k=0 gain (0.2) is gone at k=2
"""

from __future__ import annotations

import itertools
import math

import pandas as pd

from studies.cells import compare, markdown

FORWARD, STALE, STABILISERS = "forward_kl_topk", "reverse_kl_stale", ("reverse_kl_stale_tis", "reverse_kl_stale_clip")
RECOMPUTE = ("reverse_kl_recompute_tis", "reverse_kl_recompute")   # the seeds' surrogate, then the no-ratio ablation
REVERSE_TOPK = "reverse_kl_topk"   # reverse KL summed over the behaviour's top-k: learner-time π_θ, no sampling noise
GAP_TARGET = 0.4          # OPD "works" when it closes this fraction of the student–teacher gap on every seed


def finals(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.step == df.step.max()]


def initial(df: pd.DataFrame) -> pd.Series:
    """The warmed-up student's held-out accuracy per seed (step 0: the same student in every cell)."""
    return df[df.step == 0].groupby("seed").accuracy.first()


def pts(c: tuple[float, float, int]) -> str:
    return f"{100 * c[0]:+.1f} points (noise band ±{100 * c[1]:.1f})"


# --- k½ -----------------------------------------------------------------------------------------------------------

def k_half(ks: list, acc: list, initial: float) -> float:
    """The staleness at which half of the lowest k's gain acc[0] − initial is lost: the first k at which the
    accuracy reaches (acc[0] + initial) / 2, linearly interpolated between neighbouring grid points. inf if the
    accuracy never falls that far on the grid, nan if there is no gain. ks ascending; acc: the accuracy per k."""
    if not acc[0] > initial:
        return math.nan
    half = (acc[0] + initial) / 2
    for (k1, a1), (k2, a2) in itertools.pairwise(zip(ks, acc)):
        if a2 <= half:                                   # a1 > half, or the previous pair would have returned
            return k1 + (a1 - half) / (a1 - a2) * (k2 - k1)
    return math.inf


def half_lives(df: pd.DataFrame) -> pd.DataFrame:
    """Per estimator and lr: the lowest k's gain over the initial student (with its noise band) and k½ on the
    seed-mean final accuracy; k½ is nan when the gain is not positive beyond the band."""
    fin, init, n = finals(df), initial(df), int(df.eval_prompts.iloc[0])
    rows = []
    for (e, lr), g in fin.groupby(["estimator", "lr"], sort=False):
        mean = g.groupby("staleness").accuracy.mean().sort_index()
        c = compare(g[g.staleness == mean.index[0]].accuracy.to_numpy(), init.to_numpy(), n)
        kh = k_half(mean.index.tolist(), mean.tolist(), init.mean()) if c[2] > 0 else math.nan
        rows.append(dict(estimator=e, lr=lr, gain=c, k_half=kh))
    return pd.DataFrame(rows)


def k_half_label(v: float, k0, kmax) -> str:
    return f"n/a (no gain at k={k0})" if math.isnan(v) else f"> {kmax}" if math.isinf(v) else f"{v:.1f}"


def lr_trend(k_halves: list[float]) -> str:
    """Does k½ fall as lr rises? k_halves in increasing lr order (inf: '> max k', nan: no gain). Reproduced if
    strictly decreasing (inf above every finite value); not reproduced if some higher lr has a larger k½;
    inconclusive otherwise (a tie, two '> max k', or an lr without gain that could hide the order)."""
    pairs = list(itertools.combinations(k_halves, 2))    # (lower lr, higher lr)
    if any(a < b for a, b in pairs):                     # nan compares False: only known orders count
        return "not reproduced"
    return "reproduced" if all(a > b for a, b in pairs) else "inconclusive"


# --- claims -------------------------------------------------------------------------------------------------------

def gap_closed(df: pd.DataFrame) -> pd.DataFrame:
    """Per estimator, lr and seed at the lowest k: initial → final held-out accuracy, the teacher's, and the
    fraction of the student–teacher gap closed, (final − initial) / (teacher − initial) (nan if no gap)."""
    fin, init, teacher = finals(df), initial(df), float(df.teacher_accuracy.iloc[0])
    t = fin[fin.staleness == fin.staleness.min()][["estimator", "lr", "seed", "accuracy"]]
    t = t.rename(columns={"accuracy": "final"}).reset_index(drop=True)
    t.insert(3, "initial", t.seed.map(init))
    t["teacher"] = teacher
    t["gap closed"] = ((t.final - t.initial) / (teacher - t.initial)).where(teacher > t.initial)
    return t


def opd_works(df: pd.DataFrame) -> str:
    """Does OPD work at the lowest k: do the two required estimators (forward top-k, the seeds' 1-sample reverse KL
    with recompute + TIS) each close ≥ GAP_TARGET of the gap on every seed, with an accuracy gain beyond the noise
    band? The top-k reverse KL, when swept, is reported beside them (the same divergence without the 1-sample
    estimator's noise), but does not decide the verdict."""
    gaps, init, n, k0 = gap_closed(df), initial(df), int(df.eval_prompts.iloc[0]), df.staleness.min()
    parts, ok = [], []
    for e, required in ((FORWARD, True), (RECOMPUTE[0], True), (REVERSE_TOPK, False)):
        g = gaps[gaps.estimator == e]
        if g.empty:
            parts += [f"{e} not in the sweep"] if required else []
            continue
        c, every = compare(g.final.to_numpy(), init.to_numpy(), n), bool((g["gap closed"] >= GAP_TARGET).all())
        lo, hi = (f"{100 * v:.0f}" for v in (g["gap closed"].min(), g["gap closed"].max()))
        parts.append(f"{e}{'' if required else ' (not required)'} closes {lo if lo == hi else f'{lo}–{hi}'}"
                     f"% of the gap (every seed ≥ {100 * GAP_TARGET:.0f}%: {'yes' if every else 'no'}; accuracy "
                     f"{100 * c[0]:+.1f} points, noise band ±{100 * c[1]:.1f})")
        if required:
            ok.append(every and c[2] > 0)
    word = "no" if not all(ok) else "yes" if len(ok) == 2 else "not tested"
    return f"OPD works at k={k0}: {word}; " + "; ".join(parts) + "."


def moved(df: pd.DataFrame, e: str, k) -> bool:
    """Did estimator e at staleness k move the student toward the teacher? Held-out forward or reverse KL of
    every seed below every seed's initial value (accuracy alone can stay flat in a short run)."""
    final, init = finals(df), df[df.step == 0].groupby("seed").first()
    cell = final[(final.estimator == e) & (final.staleness == k)]
    return any(cell[c].max() < init[c].min() for c in ("eval_forward_kl", "eval_reverse_kl"))


def verdicts(df: pd.DataFrame) -> list[str]:
    """The seeds' claims at one lr, one line each: a gap inside its noise band never counts as an effect."""
    final, n = finals(df), int(df.eval_prompts.iloc[0])
    k0, kmax, ests = df.staleness.min(), df.staleness.max(), set(df.estimator)
    acc = lambda e, k: final[(final.estimator == e) & (final.staleness == k)].accuracy.to_numpy()  # noqa: E731
    if k0 == kmax:
        return ["All claims: not tested (the sweep has a single staleness value)."]
    init = initial(df).to_numpy()
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


def lr_claim(hl: pd.DataFrame, k0, kmax) -> str:
    """Bias from stale data scales with staleness × lr, so k½ of the stale reverse KL should fall as lr rises."""
    claim = "Bias from stale data scales with staleness × lr (k½ falls as lr rises)"
    s = hl[hl.estimator == STALE].sort_values("lr")
    if len(s) < 2:
        return f"{claim}: not tested ({STALE} is not in the lr sweep)."
    values = ", ".join(f"lr {lr:g}: {k_half_label(v, k0, kmax)}" for lr, v in zip(s.lr, s.k_half))
    return f"{claim}: {lr_trend(s.k_half.tolist())} for {STALE} ({values})."


# --- report.md ----------------------------------------------------------------------------------------------------

def tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The report's tables, each with an lr column only when the sweep has several lrs."""
    final, k0, n, by_lr = finals(df), df.staleness.min(), int(df.eval_prompts.iloc[0]), df.lr.nunique() > 1
    keys = ["estimator", "lr"]
    t = final.groupby([*keys, "staleness"], sort=False).agg(**{
        "final accuracy": ("accuracy", "mean"), "seed min": ("accuracy", "min"), "seed max": ("accuracy", "max"),
        "reverse KL": ("eval_reverse_kl", "mean"), "forward KL": ("eval_forward_kl", "mean"),
        "train resp. len": ("response_len_mean", "mean"), "truncation": ("truncation_rate", "mean")}).reset_index()
    at_k0 = {(e, lr): a for e, lr, a in t[t.staleness == k0][[*keys, "final accuracy"]].itertuples(index=False)}
    t.insert(6, f"Δ vs k={k0}", [a - at_k0[e, lr] for e, lr, a in zip(t.estimator, t.lr, t["final accuracy"])])
    fairness = []
    for lr, sub in df.groupby("lr"):
        init, fin = initial(sub), finals(sub)
        kl0 = sub[sub.step == 0].groupby("seed")[["eval_forward_kl", "eval_reverse_kl"]].first().mean()
        for e, cell in fin[fin.staleness == k0].groupby("estimator", sort=False):
            c, kl = compare(cell.accuracy.to_numpy(), init.to_numpy(), n), cell[["eval_forward_kl", "eval_reverse_kl"]]
            fairness.append({"estimator": e, "lr": lr, "initial accuracy": init.mean(),
                             "final accuracy": cell.accuracy.mean(),
                             "accuracy improved": {1: "yes", 0: "within noise", -1: "no, worse"}[c[2]]
                             + f" ({100 * c[0]:+.1f} points, band ±{100 * c[1]:.1f})",
                             "forward KL": f"{kl0.eval_forward_kl:.3f} → {kl.eval_forward_kl.mean():.3f}",
                             "reverse KL": f"{kl0.eval_reverse_kl:.3f} → {kl.eval_reverse_kl.mean():.3f}",
                             "moved toward teacher": "yes" if moved(sub, e, k0) else "no"})
    gaps = gap_closed(df).assign(**{"gap closed": lambda g: g["gap closed"].map(lambda v: f"{100 * v:.1f}%")})
    hl = half_lives(df)
    hl = pd.DataFrame({"estimator": hl.estimator, "lr": hl.lr, f"k={k0} gain": hl.gain.map(pts),
                       "k½": [k_half_label(v, k0, df.staleness.max()) for v in hl.k_half]})
    order = {e: i for i, e in enumerate(df.estimator.unique())}             # the sweep's order, then lr, k, seed
    by = lambda c: c.map(order) if c.name == "estimator" else c  # noqa: E731
    out = {"findings": t, "fairness": pd.DataFrame(fairness), "gaps": gaps, "k_half": hl}
    out = {name: v.sort_values([c for c in ("estimator", "lr", "staleness", "seed") if c in v], key=by, kind="stable")
           for name, v in out.items()}
    return {name: v if by_lr else v.drop(columns="lr") for name, v in out.items()}


def report(df: pd.DataFrame) -> str:
    """report.md: OPD at the lowest k, the dose–response and k½, the fairness check, and the claims."""
    n, k0, kmax, steps = int(df.eval_prompts.iloc[0]), df.staleness.min(), df.staleness.max(), df.step.max()
    t, teacher, lrs = tables(df), float(df.teacher_accuracy.iloc[0]), sorted(df.lr.unique())
    claims = [f"lr {lr:g}: " * (len(lrs) > 1) + line for lr in lrs
              for line in (opd_works(df[df.lr == lr]), *verdicts(df[df.lr == lr]))]
    if len(lrs) > 1:
        claims.append(lr_claim(half_lives(df), k0, kmax))
    lr_text = f"lr {lrs[0]:g}" if len(lrs) == 1 else "lr ∈ {" + ", ".join(f"{v:g}" for v in lrs) + "}"
    return "\n".join([
        "# kl_direction: what staleness costs per KL direction and estimator", "",
        f"{df.estimator.nunique()} estimators × k ∈ {sorted(df.staleness.unique().tolist())} × seeds "
        f"{sorted(df.seed.unique().tolist())}, {lr_text}, {steps} learner steps; held-out greedy accuracy on {n} "
        f"prompts, exact per-token KL to the teacher at step {steps}. Initial student accuracy "
        f"{initial(df).mean():.3f}; teacher {teacher:.3f}.", "",
        f"## Does OPD work at k={k0}? Gap closed per seed", "",
        "The fraction of the student–teacher accuracy gap closed: (final − initial) / (teacher − initial). OPD "
        f"works when {FORWARD} and {RECOMPUTE[0]} each close ≥ {100 * GAP_TARGET:.0f}% on every seed.", "",
        markdown(t["gaps"]), "",
        f"## Fairness: does k={k0} move the student for every estimator?", "",
        "The student must actually move within k steps, or staleness could not matter. Moving means its held-out "
        "KL to the teacher (either direction) ends below its initial value for every seed; accuracy is shown beside it.", "",
        markdown(t["fairness"]), "",
        "## Dose–response (final step; mean over seeds)", "", markdown(t["findings"]), "",
        f"## k½: the staleness at which half of the k={k0} gain is lost", "",
        f"Linearly interpolated between grid points on the seed-mean accuracy; '> {kmax}' if never lost on the "
        f"grid, n/a if the k={k0} gain over the initial student is not beyond its noise band.", "",
        markdown(t["k_half"]), "",
        "## Claims", "", *[f"- {v}" for v in claims], "",
        "A gap counts only when the seed ranges do not overlap and it exceeds two binomial standard errors of one "
        "held-out evaluation (the band). With few seeds this is a rough test; more seeds sharpen it.", ""])
