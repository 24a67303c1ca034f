"""Study cells: one training run each, run in parallel worker processes and reused once finished; plus what every
study shares: the estimator presets, the config checks, the noise-band test and the report's table writer.

A cell is a dict with at least `run` (a `backends.run.RunConfig`), `dir` (its own folder) and any labels the
study wants as columns (estimator, staleness, seed, ...). `cell(run, dir, **labels)` adds `digest`, a hash of
the whole RunConfig: a cell counts as done only if its `done.json` was written by this very config, so a study
rerun with `hydra.run.dir=<its folder>` reuses finished cells and reruns changed or half-finished ones.

    sweep = [cells.cell(RunConfig(...), out / "cells" / name, estimator=e, seed=s) for ...]
    df = cells.run_all(sweep, toy_cfg, workers=2, desc="my study")   # every cell's metrics.csv + label columns
    gap, band, sign = cells.compare(acc_a, acc_b, n_prompts)            # a claim counts only when sign != 0
    objective = cells.preset("reverse_kl_stale_tis")                    # a file of conf/estimator/
    text = cells.markdown(table, floatfmt=".4g")                        # a report's table

Metrics columns that clash with a label come back as run_<name>: a cell labelled staleness=k gets the run's
staleness spec ("fixed:k") as run_staleness, and the objective's name is the metrics column `objective`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from asyncopd.files import atomic_write
from asyncopd.objective import ObjectiveConfig
from backends import toy
from backends.run import RunConfig, run as run_backend

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "estimator"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))   # the estimator presets, by file name


def preset(name: str) -> ObjectiveConfig:
    """The objective of conf/estimator/<name>.yaml (a `# @package objective` node: ObjectiveConfig's fields)."""
    if name not in PRESETS:
        raise ValueError(f"{name!r} is not a preset of conf/estimator/ {PRESETS}")
    return ObjectiveConfig(**OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{name}.yaml")))


def cell(run: RunConfig, cell_dir: Path, **labels) -> dict:
    """A cell: its RunConfig, folder, the config's digest, and the study's labels (become result columns).
    A study measures collapse rather than avoiding it, so its runs record the health check's signals and go on
    (health.on_collapse=warn) instead of stopping."""
    run = replace(run, health=replace(run.health, on_collapse="warn"))
    digest = hashlib.sha256(json.dumps(asdict(run), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return dict(labels, run=run, dir=Path(cell_dir), digest=digest, labels=tuple(labels))


def is_done(c: dict) -> bool:
    """Finished with this very config (done.json is written last, with the config's digest)."""
    return (f := c["dir"] / "done.json").exists() and json.loads(f.read_text())["digest"] == c["digest"]


def run_cell(rc: RunConfig, cell_dir: Path, digest: str) -> None:
    """One cell in a worker process. A half-finished cell restarts from scratch; done.json is written last."""
    torch.set_num_threads(1)
    shutil.rmtree(cell_dir, ignore_errors=True)
    run_backend(rc, cell_dir)                                 # writes metrics.csv at its last step
    shutil.rmtree(cell_dir / "checkpoint")                    # a finished cell is never resumed
    atomic_write(cell_dir / "done.json", json.dumps({"digest": digest, "config": asdict(rc)}, default=str))


def run_all(sweep: list[dict], toy_cfg: toy.ToyConfig, *, workers: int, desc: str) -> pd.DataFrame:
    """Run the cells not yet done (`workers` single-threaded processes), then return every cell's metrics.csv
    as one table with the cells' labels as extra columns (a metrics column of the same name becomes run_<name>).
    A failed cell stops the sweep; finished cells stay done."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    todo = [c for c in sweep if not is_done(c)]
    if todo:
        toy.build_models(toy_cfg)                             # train or load the models once; workers load the cache
        with (patch.dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1"),   # inherited by the spawned workers
              tqdm(total=len(sweep), initial=len(sweep) - len(todo), desc=desc, unit="cell") as bar,
              ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool):
            futures = {pool.submit(run_cell, c["run"], c["dir"], c["digest"]): c for c in todo}
            for f in as_completed(futures):
                if f.exception() is not None:
                    pool.shutdown(cancel_futures=True)
                f.result()
                bar.set_postfix_str(futures[f]["dir"].name)
                bar.update()
    frames = []
    for c in sweep:
        df = pd.read_csv(c["dir"] / "metrics.csv")
        df = df.rename(columns={k: f"run_{k}" for k in c["labels"] if k in df.columns})   # the label wins
        frames.append(df.assign(**{k: c[k] for k in c["labels"]}))
    return pd.concat(frames, ignore_index=True)


def check_distinct_ints(cfg, names, lo: int = 0) -> None:
    """Each cfg.<name> must be a non-empty list of distinct integers >= lo (ValueError naming the field)."""
    for name in names:
        v = list(getattr(cfg, name))
        if not v or len(set(v)) < len(v) or min(v) < lo:
            raise ValueError(f"{name} must be a non-empty list of distinct integers >= {lo}, got {v!r}")


def compare(a: np.ndarray, b: np.ndarray, n_prompts: int) -> tuple[float, float, int]:
    """(mean(a) − mean(b), noise band, sign): sign is ±1 only if the seed ranges of a and b do not overlap and
    the gap exceeds two binomial standard errors of one evaluation on n_prompts prompts (the band)."""
    p = np.clip(np.mean(np.concatenate([a, b])), 1 / n_prompts, 1 - 1 / n_prompts)
    gap, band = a.mean() - b.mean(), 2 * np.sqrt(p * (1 - p) / n_prompts)
    separate = a.max() < b.min() or a.min() > b.max()
    return gap, band, int(np.sign(gap)) if separate and abs(gap) > band else 0


def markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """df as a markdown table (every study's report tables): floats as format(v, floatfmt), the rest as str(v)."""
    fmt = lambda v: format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    rows = [list(map(str, df.columns)), ["---"] * df.shape[1], *(map(fmt, r) for r in df.itertuples(index=False))]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
