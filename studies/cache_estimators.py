"""What does a finite teacher-score cache cost in bias and variance, per byte?

Question
    A teacher-score cache replaces full teacher logits (2·V bytes per token) by the sampled token's log-prob, a
    top-k (teacher's or the student's), or M Monte-Carlo draws. For a fixed set of rollouts, how far is the KL
    gradient each layout gives from the exact one (bias: norm of the mean error and cosine; variance over
    draws), fresh and stale, and how many bytes does it move? Does the gradient error show in training?
Covers
    1. Gradients (studies/cache_estimators_grads.py holds the maths and the exact definitions): the toy
       backend's rollouts (V = 20, so k caps at V), fresh and k learner versions stale (versions from a short
       on-policy run), in logit and in parameter space; and a synthetic large-vocabulary setting (Zipf-like
       teacher, noisy student, V = 32k, where top-64 is a real truncation), fresh and stale (the current student
       moved λ toward the teacher since the rollout). Layouts: teacher top-k (tail bucket|renorm|none), student
       top-k, sampled (stale / recompute signal, IS / TIS), MC-M (LOO / SNIS); bytes from asyncopd.cache.
    2. Bytes per token and per batch each layout moves at a real vocabulary and length, and time on a link.
    3. Short toy training runs (studies/cells.py) of a few trainable layouts, fresh and stale: final accuracy.
    Left out: gradients in parameter space at a real model size; layouts the toy learner cannot train
    (student top-k, forward KL from samples); lr tuning per layout.
How to run
    python -m studies.cache_estimators                  # 12 min on 2 busy CPU cores (toy models cached)
    python -m studies.cache_estimators scale=smoke      # tiny task, models and vocabulary, 20-75 s
    python -m studies.cache_estimators hydra.run.dir=outputs/cache_estimators/<run>   # reuse finished cells
    → Hydra's run folder: results.csv (one row per setting × staleness × direction × layout), settings.csv,
      network.csv, training.csv, pareto_synthetic.png, pareto_toy.png, training_accuracy.png, report.md.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
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

from asyncopd.cache import bytes_per_token, full_logits_bytes_per_token
from asyncopd.config import check_finite
from asyncopd.estimators import TAILS
from asyncopd.objective import ObjectiveConfig, cache_layout
from asyncopd.rollout import Batch
from asyncopd.scheduler import SchedulerConfig
from backends import toy
from backends.run import RunConfig
from backends.session import block_prompts
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_models import response_logits
from backends.toy_teacher import ToyTeacher
from studies import cells as cells_lib
from studies import cache_estimators_grads as grads
from studies.cache_estimators_grads import SyntheticConfig
from studies.cells import PRESETS, markdown, preset

plt.switch_backend("Agg")
log = logging.getLogger(__name__)

GRAD_PROMPT_SEED = 2**30                # prompts of the gradient comparison (+ seed); training uses the run's prompts (backends.session.block_prompts)
TRAIN_LAYOUTS = {                       # trainable layouts: name -> ObjectiveConfig fields (the cache each one needs)
    "teacher_top1_bucket": dict(estimator="forward_kl_topk", topk=1, tail="bucket"),
    "teacher_top4_bucket": dict(estimator="forward_kl_topk", topk=4, tail="bucket"),
    "teacher_top16_bucket": dict(estimator="forward_kl_topk", topk=16, tail="bucket"),
    "teacher_top1_none": dict(estimator="forward_kl_topk", topk=1, tail="none"),
    "sampled_recompute_tis": dict(estimator="reverse_kl_sampled", signal="recompute", correction="tis"),
    "sampled_stale": dict(estimator="reverse_kl_sampled", signal="stale", correction="none"),
    "mc4_snis": dict(estimator="reverse_kl_mc", n_samples=4, self_normalize=True),
    "mc16_snis": dict(estimator="reverse_kl_mc", n_samples=16, self_normalize=True),
}


@dataclass
class Config:
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])     # top-k sizes (capped at each setting's V)
    ms: list[int] = field(default_factory=lambda: [1, 4, 16, 64])     # MC draws per position
    tails: list[str] = field(default_factory=lambda: list(TAILS))     # top-k tail handling: bucket | renorm | none
    draws: int = 32                      # R: independent draws per stochastic layout (bias, variance), >= 2
    seed: int = 0                        # rollouts, draws and synthetic logits of the gradient comparison
    toy_staleness: list[int] = field(default_factory=lambda: [0, 8, 32])   # k: π_β is k learner versions old
    drift_estimator: str = "forward_kl_topk"   # preset of conf/estimator/ the on-policy run that makes versions uses
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    target_rmse: float = 0.1             # report: the cheapest layout with per-token relative RMSE <= this, > 0
    real_vocab: int = 151936             # the network table: vocabulary (Qwen-style 152k), >= 1
    real_response_len: int = 8192        # response tokens per sequence, >= 1
    real_batch: int = 256                # sequences per learner step, >= 1
    link_gbit_s: float = 100.0           # teacher -> learner link, Gbit/s, > 0
    train_layouts: list[str] = field(default_factory=lambda: ["teacher_top1_bucket", "teacher_top16_bucket",
                                                              "sampled_recompute_tis", "mc4_snis"])
    train_staleness: list[int] = field(default_factory=lambda: [0, 8])   # fixed k of the training cells, >= 0
    train_seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 150                     # learner steps per training cell, >= 1
    workers: int = 2                     # training cells in parallel, one single-threaded process each
    scale: str = "default"               # default | smoke (set by the `scale` config group)
    cells_dir: str = "cells"             # one folder per training cell; the YAML puts it in Hydra's run folder
    toy: toy.ToyConfig = field(default_factory=toy.ToyConfig)   # its lr also drives the drift run

    def __post_init__(self):
        check_finite(self)
        cells_lib.check_distinct_ints(self, ("ks", "ms"), lo=1)
        cells_lib.check_distinct_ints(self, ("toy_staleness", "train_staleness", "train_seeds"))
        if not self.tails or set(self.tails) - set(TAILS) or len(set(self.tails)) < len(self.tails):
            raise ValueError(f"tails must be distinct values of {TAILS}, got {self.tails!r}")
        t = list(self.train_layouts)
        if not t or len(set(t)) < len(t) or set(t) - set(TRAIN_LAYOUTS):
            raise ValueError(f"train_layouts must be distinct names of {tuple(TRAIN_LAYOUTS)}, got {t!r}")
        V = self.toy.n_symbols + 4
        if too_big := [n for n in t if TRAIN_LAYOUTS[n].get("topk", 0) > V]:
            raise ValueError(f"train_layouts {too_big} keep more teacher top-k than the toy vocabulary ({V})")
        for name, ok, rule in (
                ("draws", self.draws >= 2, ">= 2"), ("target_rmse", self.target_rmse > 0, "> 0"),
                ("drift_estimator", self.drift_estimator in PRESETS, "a file of conf/estimator/"),
                ("real_vocab", self.real_vocab >= max(self.ks), f">= max(ks) = {max(self.ks)}"),
                ("real_response_len", self.real_response_len >= 1, ">= 1"),
                ("real_batch", self.real_batch >= 1, ">= 1"), ("link_gbit_s", self.link_gbit_s > 0, "> 0"),
                ("steps", self.steps >= 1, ">= 1"), ("workers", self.workers >= 1, ">= 1"),
                ("scale", self.scale in ("default", "smoke"), "default or smoke")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.toy.temperature != 1:
            raise ValueError(f"toy.temperature must be 1 (π_β is compared at T = 1), got {self.toy.temperature}")


ConfigStore.instance().store(name="cache_estimators_schema", node=Config)


# --- 1. gradients -------------------------------------------------------------------------------------------

def toy_settings(cfg: Config):
    """Yield (k, Positions, project) per staleness k: rollouts of the student K − k versions old (K = max k) on
    the same prompts, the current student's logits at version K. Versions come from a K-step on-policy run of
    `drift_estimator` at toy.lr; `project` maps a logit gradient to the flat parameter gradient (the batch's)."""
    task, teacher_model, student_model, _ = toy.build_models(cfg.toy)
    V, B, K = task.vocab_size, cfg.toy.batch_size, max(cfg.toy_staleness)
    objective = preset(cfg.drift_estimator)
    topk, M = cache_layout(objective)
    engine = ToyRolloutEngine(student_model, max_batch=cfg.toy.engine_slots, max_new_tokens=task.max_response_len,
                              eos_id=task.eos_id, seed=cfg.seed, capture_topk=min(max(cfg.ks), V), capture_samples=M)
    teacher = ToyTeacher(teacher_model, batch_size=B)
    learner = ToyLearner(copy.deepcopy(student_model), objective, lr=cfg.toy.lr, pad_id=task.pad_id,
                         weight_decay=cfg.toy.weight_decay, grad_clip=cfg.toy.grad_clip)
    ring = {0: learner.state_dict()}
    for v in range(K):                                           # the drift run: on-policy, one version per step
        engine.load_weights(ring[v], v)
        trajs = engine.generate(block_prompts(task, cfg.seed, v, B), list(range(v * B, (v + 1) * B)))
        learner.step(Batch(trajs, v), teacher.score(trajs, topk=topk, n_samples=M))
        ring[v + 1] = learner.state_dict()
    behav_model = copy.deepcopy(student_model).eval()
    params = list(learner.model.parameters())
    prompts = task.make_prompts(B, seed=GRAD_PROMPT_SEED + cfg.seed)
    for k in cfg.toy_staleness:
        engine.load_weights(ring[K - k], K - k)
        behav_model.load_state_dict(ring[K - k])
        trajs = engine.generate(prompts, list(range(B)))
        with torch.no_grad():
            behav = response_logits(behav_model, trajs, task.pad_id)
            teacher_logits = response_logits(teacher_model, trajs, task.pad_id)
        ids = torch.cat([t.response_ids for t in trajs])
        recorded = torch.cat([t.behav_logp for t in trajs])                  # [N] log π_β at sampling time
        gap = (behav.log_softmax(-1).gather(1, ids[:, None]).squeeze(1) - recorded).abs()
        if gap.max() > 1e-3:
            raise RuntimeError(f"the engine's behaviour log-probs differ from π_β's by {gap.max():.2g} at k={k}")
        z = response_logits(learner.model, trajs, task.pad_id)               # [N, V] with the graph to θ

        def project(g: torch.Tensor, z=z) -> torch.Tensor:
            return torch.cat([p.flatten() for p in torch.autograd.grad(z, params, g, retain_graph=True)])

        captured = torch.cat([t.student_topk_ids for t in trajs])            # [N, k_max] π_β's top-k at rollout
        yield k, grads.Positions(z.detach(), teacher_logits, behav, captured), project


def gradients(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, settings): every layout against the exact gradient in both settings at every staleness level,
    and one row per setting × staleness describing it (entropies, KL to the teacher, drift KL(π_β‖π_θ))."""
    rows, settings = [], []

    def add(setting: str, stale: str, level: float, pos, project=None):
        lays = grads.layouts(cfg.ks, cfg.ms, cfg.tails, pos.student_logits.shape[1])
        t0 = time.monotonic()
        out = grads.compare(pos, lays, n_draws=cfg.draws, seed=cfg.seed, project=project)
        labels = {"setting": setting, "staleness": stale, "stale_level": level}
        rows.extend({**labels, "vocab": pos.student_logits.shape[1], **r} for r in out)
        settings.append({**labels, **grads.describe(pos), "seconds": time.monotonic() - t0})
        log.info("%s %s: %d layouts in %.0f s", setting, stale, len(lays), time.monotonic() - t0)

    for k, pos, project in toy_settings(cfg):
        add("toy", "fresh" if k == 0 else f"k={k}", k, pos, project)
    for lam in cfg.synthetic.stale_shift:
        pos = grads.synthetic_positions(cfg.synthetic, lam, max(cfg.ks), cfg.seed)
        add("synthetic", "fresh" if lam == 0 else f"λ={lam:g}", lam, pos)
    return pd.DataFrame(rows), pd.DataFrame(settings)


# --- 2. bytes at a real vocabulary --------------------------------------------------------------------------

def network(cfg: Config) -> pd.DataFrame:
    """Bytes per token, per sequence and per learner batch of each cache layout at real_vocab, and the time one
    batch takes on the link; full bf16 logits last for reference."""
    sizes = [("sampled", 0, 0, False)] + [(f"top-{k}", k, 0, False) for k in cfg.ks]
    sizes += [(f"mc-{M}" + (" + sampler logp" if s else ""), 0, M, s) for M in cfg.ms for s in (False, True)]
    rows = [(name, bytes_per_token(k=k, n_samples=M, sampler_logp=s, vocab_size=cfg.real_vocab))
            for name, k, M, s in sizes]
    rows.append(("full logits (bf16)", full_logits_bytes_per_token(cfg.real_vocab)))
    df = pd.DataFrame(rows, columns=["layout", "bytes_per_token"])
    tokens = cfg.real_response_len * cfg.real_batch
    return df.assign(vocab=cfg.real_vocab, mb_per_sequence=df.bytes_per_token * cfg.real_response_len / 1e6,
                     gb_per_batch=df.bytes_per_token * tokens / 1e9,
                     seconds_per_batch=df.bytes_per_token * tokens * 8 / (cfg.link_gbit_s * 1e9),
                     ratio_to_full=df.bytes_per_token / full_logits_bytes_per_token(cfg.real_vocab))


# --- 3. training --------------------------------------------------------------------------------------------

def train_cells(cfg: Config) -> list[dict]:
    """The training sweep: layout × fixed staleness × seed, one toy lockstep run each."""
    out = []
    for name, k, s in itertools.product(cfg.train_layouts, cfg.train_staleness, cfg.train_seeds):
        objective = ObjectiveConfig(**TRAIN_LAYOUTS[name])
        topk, M = cache_layout(objective)
        rc = RunConfig(staleness=SchedulerConfig(fixed_staleness=k).spec, steps=cfg.steps, seed=s, toy=cfg.toy,
                       objective=objective)
        out.append(cells_lib.cell(rc, Path(cfg.cells_dir) / f"{name}_k{k}_s{s}", layout=name, staleness=k, seed=s,
                                  bytes_per_token=bytes_per_token(k=topk, n_samples=M, sampler_logp=M > 0)))
    return out


def training(cfg: Config) -> pd.DataFrame:
    df = cells_lib.run_all(train_cells(cfg), cfg.toy, workers=cfg.workers, desc="cache_estimators cells")
    return df.drop(columns="run_staleness").assign(eval_prompts=cfg.toy.eval_prompts)   # run_staleness: "fixed:k"


def run(cfg: Config) -> dict[str, pd.DataFrame]:
    """All three parts; keys results (gradients), settings, network, training."""
    results, settings = gradients(cfg)
    return {"results": results, "settings": settings, "network": network(cfg), "training": training(cfg)}


# --- figures and report -------------------------------------------------------------------------------------

ERROR_FLOOR = 1e-3                       # relative errors below this are drawn at it (log axis; k = V is exact)


def pareto(df: pd.DataFrame) -> pd.DataFrame:
    """The non-dominated layouts of one panel: no other layout has both fewer bytes and a lower rmse_rel."""
    d = df.sort_values(["bytes_per_token", "rmse_rel"])
    return d[d.rmse_rel < d.rmse_rel.cummin().shift(fill_value=np.inf)]


def plot(res: dict[str, pd.DataFrame], out_dir: Path) -> None:
    sns.set_theme(style="whitegrid")
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)
    df = res["results"].assign(error=lambda d: d.rmse_rel.clip(lower=ERROR_FLOOR))
    for setting, d in df.groupby("setting"):
        g = sns.relplot(d, x="bytes_per_token", y="error", hue="family", style="variant", col="direction",
                        row="staleness", kind="line", markers=True, dashes=False, sort=True, markersize=8,
                        height=3.2, aspect=1.3, estimator=None)
        for (stale, direction), ax in g.axes_dict.items():
            front = pareto(d[(d.staleness == stale) & (d.direction == direction)])
            ax.step(front.bytes_per_token, front.error, where="post", c="gray", lw=3, alpha=0.3, zorder=0)
        g.set(xscale="log", yscale="log")
        g.set_titles("{row_name} · {col_name} KL")
        g.set_axis_labels("cache bytes / token", "relative RMSE of ∇_z (per token)")
        V = int(d.vocab.iloc[0])
        g.figure.suptitle(f"{setting} (V = {V}): gradient error vs bytes; gray = Pareto front", y=1.01)
        g.savefig(out_dir / f"pareto_{setting}.png", dpi=110)
        plt.close(g.figure)
    final = res["training"].loc[lambda d: d.step == d.step.max()]
    if len(final):
        fig, ax = plt.subplots(figsize=(7, 4))
        dodge = 0.3 if final.staleness.nunique() > 1 else False           # seaborn divides by (levels − 1)
        sns.pointplot(final, x="layout", y="accuracy", hue="staleness", dodge=dodge, errorbar=("pi", 100), ax=ax)
        ax.axhline(res["training"].loc[lambda d: d.step == 0].accuracy.mean(), ls="--", c="gray", label="initial")
        ax.set(ylabel="final held-out greedy accuracy", xlabel="")
        ax.tick_params(axis="x", rotation=20)
        fig.savefig(out_dir / "training_accuracy.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def biased(r, space: str = "") -> bool:
    """The bias is resolved: above twice its noise floor and above numerical noise. space: "" or "param_"."""
    return getattr(r, f"{space}bias_rel") > max(2 * getattr(r, f"{space}bias_floor_rel"), ERROR_FLOOR)


def bias_str(r, space: str = "") -> str:
    """'bias±floor', with * when the bias is resolved."""
    b, floor = getattr(r, f"{space}bias_rel"), getattr(r, f"{space}bias_floor_rel")
    return f"{b:.3f}±{floor:.3f}" + ("*" if biased(r, space) else "")


def select(df: pd.DataFrame, **eq) -> pd.DataFrame:
    """The rows of df whose columns equal the given values."""
    return df[np.logical_and.reduce([df[c] == v for c, v in eq.items()])]


def verdicts(res: dict[str, pd.DataFrame]) -> list[str]:
    """Claims about the layouts, each decided from the numbers (bias a±b: b is the noise floor, * = resolved)."""
    out = []
    for setting, d in res["results"].groupby("setting", sort=False):
        levels = list(dict.fromkeys(d.staleness))
        fresh, stale = d[d.staleness == "fresh"], d[d.staleness == levels[-1]]
        for direction in ("forward", "reverse"):
            top = select(fresh, direction=direction, family="teacher top-k")
            b = top[top.variant == "bucket"].sort_values("k")
            falls = "falls" if (b.bias_rel.diff().dropna() <= 1e-6).all() else "does not fall"
            truncating = top[top.k < top.vocab]
            wins = truncating.loc[truncating.groupby("k").bias_rel.idxmin()].variant.value_counts().to_dict()
            out.append(f"{setting}, {direction} KL, teacher top-k: bias {falls} monotonically with k (bucket: "
                       + ", ".join(f"k={r.k} {r.bias_rel:.3f}" for r in b.itertuples())
                       + f"); least-biased tail over the k < V: {wins}")
        loo = select(fresh, family="mc", variant="loo").sort_values("M")
        slope = np.polyfit(np.log(loo.M), np.log(loo.std_rel), 1)[0] if loo.M.nunique() > 1 else float("nan")
        out.append(f"{setting}, reverse KL, MC fresh, loo (on-policy): bias "
                   + ", ".join(f"M={r.M} {bias_str(r)}" for r in loo.itertuples())
                   + f"; spread ∝ M^{slope:.2f} (1/√M: −0.5)")
        sn = select(fresh, family="mc", variant="snis").sort_values("M")
        if len(sn):
            out.append(f"{setting}, reverse KL, MC fresh, snis: bias "
                       + ", ".join(f"M={r.M} {bias_str(r)} (1/M = {1 / r.M:.3f})" for r in sn.itertuples())
                       + "; on-policy E ĝ = (1 − 1/M)·g exactly: a shorter step in the right direction")
        if levels[-1] == "fresh":
            continue
        s = select(stale, direction="reverse", family="sampled")
        param = ""
        if s.get("param_bias_rel") is not None and s.param_bias_rel.notna().all():
            param = " (parameter space: " + "; ".join(f"{r.variant} {bias_str(r, 'param_')}"
                                                      for r in s.itertuples()) + ")"
        out.append(f"{setting}, reverse KL, sampled at {levels[-1]}: "
                   + "; ".join(f"{r.variant} {bias_str(r)}" for r in s.itertuples()) + param)
        for v in ("loo", "snis"):
            m = select(stale, family="mc", variant=v).sort_values("M")
            out.append(f"{setting}, reverse KL, MC {v} at {levels[-1]}: bias "
                       + ", ".join(f"M={r.M} {bias_str(r)}" for r in m.itertuples()))
        before = select(fresh, direction="forward", family="teacher top-k").set_index("layout").bias_rel
        after = select(stale, direction="forward", family="teacher top-k").set_index("layout").bias_rel
        out.append(f"{setting}, forward KL, teacher top-k reads no π_β: its bias moves fresh→{levels[-1]} by at most "
                   f"{(after - before).abs().max():.3f} (only through the prefixes the stale rollouts visit)")
    return [line + "." for line in out]


def cheapest(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per setting × staleness × direction (× logit/parameter space): the fewest-bytes layout whose relative RMSE
    is <= target (ties in bytes: the lower RMSE, then the layout order; k = V makes every tail exact)."""
    rows = []
    for (setting, stale, direction), p in df.groupby(["setting", "staleness", "direction"], sort=False):
        for space, col in (("logit", "rmse_rel"), ("parameter", "param_rmse_rel")):
            if col not in p or p[col].isna().all():
                continue
            ok = p[p[col] <= target].assign(rounded=lambda x: x[col].round(6))
            ok = ok.sort_values(["bytes_per_token", "rounded"], kind="stable")
            best = ok.iloc[0] if len(ok) else None
            rows.append((setting, stale, direction, space, "none" if best is None else best.layout,
                         None if best is None else best.bytes_per_token, None if best is None else best[col]))
    return pd.DataFrame(rows, columns=["setting", "staleness", "direction", "space", f"cheapest with RMSE ≤ {target:g}",
                                       "bytes_per_token", "rmse_rel"])


def by_staleness(df: pd.DataFrame, values: dict) -> pd.DataFrame:
    """One row per (direction, layout) in df's order, one column per value name × staleness level."""
    rows: dict[tuple, dict] = {}
    for r in df.itertuples():
        row = rows.setdefault((r.direction, r.layout), {"direction": r.direction, "layout": r.layout})
        row.update({f"{name} {r.staleness}": fn(r) for name, fn in values.items()})
    return pd.DataFrame(list(rows.values()))


def report(res: dict[str, pd.DataFrame], cfg: Config) -> str:
    df, settings, net, tr = res["results"], res["settings"], res["network"], res["training"]
    cols = ["direction", "layout", "bytes_per_token", "bias_rel", "bias_floor_rel", "cos_mean", "cos_draw",
            "std_rel", "rmse_rel"]
    final, init = tr[tr.step == tr.step.max()], tr[tr.step == 0].accuracy.mean()
    kl0 = tr[tr.step == 0][["eval_forward_kl", "eval_reverse_kl"]].mean()
    n = int(cfg.toy.eval_prompts)
    band = 2 * np.sqrt(max(init * (1 - init), 1 / n) / n)
    t = final.groupby(["layout", "staleness"], sort=False).agg(
        bytes_per_token=("bytes_per_token", "first"), accuracy=("accuracy", "mean"), seed_min=("accuracy", "min"),
        seed_max=("accuracy", "max"), eval_forward_kl=("eval_forward_kl", "mean"),
        eval_reverse_kl=("eval_reverse_kl", "mean")).reset_index()
    t["Δ vs initial"] = t.accuracy - init
    spread = t.groupby("staleness").accuracy.agg(lambda a: a.max() - a.min())
    sections = []
    for setting, d in df.groupby("setting", sort=False):
        fresh, V = d[d.staleness == "fresh"], int(d.vocab.iloc[0])
        capped = sorted(set(fresh.k_requested[fresh.k_requested > fresh.k]))
        note = f"Top-k sizes {capped} exceed V and are capped at V = {V} (k = V is exact for every tail)."
        moving = d[d.family.isin(["sampled", "mc", "student top-k"])]
        sections += [f"## {setting} (V = {V}): fresh, every layout, logit space", "", note if capped else "", "",
                     markdown(fresh[cols], ".3g"), "",
                     f"## {setting}: staleness, the layouts that read π_β (bias ± noise floor, * resolved; cos of the "
                     "mean), logit space", "",
                     markdown(by_staleness(moving, {"bias": bias_str, "cos": lambda r: f"{r.cos_mean:.3f}"}),
                              ".3g"), ""]
        if d.get("param_rmse_rel") is not None and d.param_rmse_rel.notna().all():
            param = by_staleness(d, {"bias": lambda r: bias_str(r, "param_"),
                                     "rmse": lambda r: f"{r.param_rmse_rel:.3f}"})
            sections += [f"## {setting}: parameter space (one batch; what the optimiser sees before clipping), "
                         "bias ± noise floor and relative RMSE, every layout", "", markdown(param, ".3g"), ""]
    return "\n".join([
        "# cache_estimators: what a finite teacher-score cache costs in bias and variance", "",
        "Exact gradients, w.r.t. the current student's logits z [N, V] at the rollout positions (masked token means): "
        "forward KL g_F = ∇_z (1/N) Σ_n KL(π_T‖π_θ) = (π_θ − π_T)/N; reverse KL g_R = ∇_z (1/N) Σ_n KL(π_θ‖π_T) at "
        "the fixed rollout prefixes (per position; not the effect on later prefixes). Stale: prefixes, student top-k "
        "and MC draws come from π_β, the gradient is taken at the current π_θ (toy: π_β is k learner versions older; "
        "synthetic: π_β's logits are z_θ − λ(z_T − z_θ)). A draw resamples every token a layout stores from π_β at "
        f"the same prefixes; R = {cfg.draws} draws per stochastic layout. bias_rel = ‖E ĝ − g‖/‖g‖ (debiased; a±b "
        "gives its noise floor b, * marks a bias above 2b), cos_mean = cos(E ĝ, g), cos_draw = mean cos(ĝ, g), "
        "std_rel = √tr Cov(ĝ)/‖g‖, rmse_rel = √E‖ĝ − g‖²/‖g‖. In logit space these are per-token numbers "
        f"(independent of the batch); in parameter space (toy, `param_*`, one batch of {cfg.toy.batch_size} rollouts) "
        "the variance part averages over the batch and the bias part does not. Forward KL from sampled/MC caches uses "
        "a study-local importance-sampling estimator (`forward_kl_is`); everything else is the library's estimators.",
        "",
        "## Settings", "", markdown(settings, ".3g"), "",
        "## Claims (decided from the numbers)", "", *[f"- {v}" for v in verdicts(res)], "",
        f"## The cheapest layout per setting within a relative RMSE of {cfg.target_rmse:g}", "",
        markdown(cheapest(df, cfg.target_rmse), ".3g"), "",
        *sections,
        f"## Bytes at V = {cfg.real_vocab}: {cfg.real_response_len} response tokens × {cfg.real_batch} sequences per "
        f"batch, {cfg.link_gbit_s:g} Gbit/s link", "",
        "top-k rows hold for the teacher's and the student's top-k alike (ids, teacher log-probs, tail mass); mc rows "
        "with sampler logp are what importance weights need.", "", markdown(net, ".3g"), "",
        f"## Training: {cfg.steps} steps, lr {cfg.toy.lr:g}, final held-out greedy accuracy (initial {init:.3f})", "",
        f"Initial held-out KL per token: forward {kl0.eval_forward_kl:.3f}, reverse {kl0.eval_reverse_kl:.3f}.", "",
        markdown(t, ".3g"), "",
        f"Noise band: two binomial standard errors of one evaluation on {n} prompts = ±{band:.3f}. Spread of final "
        "accuracy across layouts: " + ", ".join(f"k={k}: {v:.3f}" for k, v in spread.items())
        + ("; within the band everywhere: the layouts' gradient errors do not separate in accuracy in this short run."
           if (spread <= band).all() else "; larger than the band at some staleness (see the table)."), ""])


@hydra.main(version_base="1.3", config_path="../conf/studies/cache_estimators", config_name="cache_estimators")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    res = run(cfg)
    for name, df in res.items():
        df.to_csv(out_dir / f"{name}.csv", index=False)
    plot(res, out_dir)
    (out_dir / "report.md").write_text(text := report(res, cfg))
    print(text)
    print(f"results.csv, report.md and figures in {out_dir}")


if __name__ == "__main__":
    main()
