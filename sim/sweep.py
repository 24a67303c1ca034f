"""One table for a `python -m sim.run --multirun` sweep: summary.csv in hydra.sweep.dir, a row per job.

The one idea: a Hydra callback (registered in conf/sim.yaml under hydra.callbacks) notes each finished job's
folder and overrides (`on_job_end`), and once the sweep is over (`on_multirun_end`) reads every noted job's
summary.json into one DataFrame: a `job` column (hydra.job.num), then one column per override key with the
value as the command line gave it (`scheduler.max_staleness`, `steps`, ...), then the summary's scalar figures
(samples_per_s, ..., n_events; staleness_hist and config are not scalars and stay in summary.json). It writes
the table atomically and prints it.

Only the jobs of this sweep count, so a reused sweep folder's older job folders never leak into the table. The
callback sees the jobs that ran in its own process: the basic launcher's (sim.yaml's); a launcher that runs jobs
elsewhere leaves it with none, and it writes nothing. A failed job stops the sweep before `on_multirun_end`, so
there is no table then (the finished jobs' summary.json files stay).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from asyncopd.files import atomic_write


def summary_table(jobs: list[tuple[int, list[str], Path]]) -> pd.DataFrame:
    """A row per (job num, overrides "key=value", output dir): job, the override values, the scalar figures of
    the dir's summary.json (column order: job, overrides in order of first appearance, figures)."""
    rows = []
    for num, overrides, out_dir in jobs:
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
        swept = dict(o.split("=", 1) for o in overrides)
        figures = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}   # bool is an int
        rows.append({"job": num, **swept, **figures})
    return pd.DataFrame(rows)


class SummaryTable(Callback):
    """Hydra callback: summary.csv of a multirun's jobs (see the module docstring)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[int, list[str], Path]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Note a finished job of a multirun (a single run has no job number and gets no table)."""
        if config.hydra.mode == RunMode.MULTIRUN and job_return.status == JobStatus.COMPLETED:
            self.jobs.append((config.hydra.job.num, list(job_return.overrides or []),
                              Path(config.hydra.runtime.output_dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.jobs:
            return
        df = summary_table(self.jobs)
        path = Path(config.hydra.sweep.dir) / "summary.csv"
        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
        print(f"{df.to_string(index=False)}\n-> {path}")
