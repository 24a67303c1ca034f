"""sim.sweep: a --multirun of sim.run writes one summary.csv in the sweep folder, a row per job of this sweep."""

import json
import subprocess
import sys

import pandas as pd
import yaml

from asyncopd.data_skew import SCALARS as SKEW_SCALARS

SMALL = ["cluster.rollout_replicas=2", "costs.max_batch=8", "workload.batch_size=8", "workload.prompt_len=16",
         "workload.length.mean=32", "workload.length.max=64", "steps=4"]


def test_multirun_writes_one_table_of_every_jobs_summary(tmp_path):
    stale = tmp_path / "7"                                   # a job folder of an earlier sweep in the same folder
    stale.mkdir()
    (stale / "summary.json").write_text(json.dumps({"samples_per_s": -1.0}))
    p = subprocess.run([sys.executable, "-m", "sim.run", "--multirun", "scheduler.max_staleness=0,2",
                        "scheduler.on_stale=drop,wait", *SMALL, f"hydra.sweep.dir={tmp_path}"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    table = pd.read_csv(tmp_path / "summary.csv")
    assert len(table) == 4 and sorted(table.job) == [0, 1, 2, 3]
    assert list(table.columns[:4]) == ["job", "scheduler.max_staleness", "scheduler.on_stale",
                                       "cluster.rollout_replicas"]
    assert "staleness_hist" not in table and "config" not in table
    assert set(zip(table["scheduler.max_staleness"], table["scheduler.on_stale"])) == {
        (0, "drop"), (0, "wait"), (2, "drop"), (2, "wait")}
    assert (table.steps == 4).all()
    for row in table.to_dict("records"):
        job = tmp_path / str(row["job"])
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        assert {k: str(row[k]) for k in overrides} == overrides          # the row's overrides are its job's
        summary = json.loads((job / "summary.json").read_text())
        figures = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}   # the scalars
        assert len(figures) == 14 + len(SKEW_SCALARS) and {k: row[k] for k in figures} == figures   # exactly
    assert "staleness_by_length" not in table
    assert (table[table["scheduler.max_staleness"] == 0].staleness_max == 0).all()
    assert (table[table["scheduler.max_staleness"] == 2].staleness_max == 2).all()
    assert "samples_per_s" in p.stdout and str(tmp_path / "summary.csv") in p.stdout   # printed once it is written
