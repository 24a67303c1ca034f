"""sim.run: the Hydra entry writes trace, histogram, summary and schedule; bad input exits non-zero naming the field."""

import json
import pathlib
import re
import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from asyncopd import trace
from asyncopd.scheduler import Scheduler, SchedulerConfig
from asyncopd.rollout import Trajectory
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from sim.run import SimConfig, run
from sim.specs import Specs, costs_from_specs

SMALL = ["cluster.rollout_replicas=2", "costs.max_batch=8", "workload.batch_size=8", "workload.prompt_len=16",
         "workload.length.mean=32", "workload.length.max=64", "steps=12"]


def sim(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "sim.run", f"hydra.run.dir={tmp_path}", *overrides],
                          capture_output=True, text=True)


def test_cli_writes_outputs_and_prints_one_line(tmp_path):
    p = sim(tmp_path, *SMALL, "scheduler.max_staleness=2", "schedule=true")
    assert p.returncode == 0, p.stderr
    assert "samples/s" in p.stdout and len(p.stdout.strip().splitlines()) == 1
    assert p.stderr == "" and not (tmp_path / "summary.csv").exists()    # the multirun table's callback is silent
    s = json.loads((tmp_path / "summary.json").read_text())
    for key in ("samples_per_s", "tokens_per_s", "staleness_mean", "staleness_max", "util_rollout", "util_teacher",
                "util_learner", "in_flight_mean", "latency_mean_s", "n_events", "staleness_hist"):
        assert key in s
    assert s["staleness_in_flight_mean"] == 0.0                       # no in-flight weight updates in the sim
    assert s["staleness_in_queue_mean"] == pytest.approx(s["staleness_mean"])
    assert s["config"]["cluster"]["rollout_replicas"] == 2 and s["config"]["scheduler"]["batch_size"] == 8
    events = trace.read(tmp_path / "trace.csv")
    assert len(events) == s["n_events"]
    hist = pd.read_csv(tmp_path / "staleness_hist.csv")
    assert hist["count"].sum() == 12 * 8 and hist["staleness"].max() == s["staleness_max"] <= 2
    assert hist["fraction"].sum() == pytest.approx(1.0)
    # the batches' staleness in the trace agree with the histogram
    steps = events[events.kind == "learner_step"]
    assert (steps.staleness * 8).sum() == pytest.approx((hist.staleness * hist["count"]).sum())
    sched = json.loads((tmp_path / "schedule.json").read_text())
    assert sched["scheduler"]["max_staleness"] == 2 and sched["steps"] == 12
    assert {str(k): v for k, v in s["staleness_hist"].items()} == sched["staleness_hist"]
    assert not list(tmp_path.glob(".*.tmp"))                          # atomic writes leave no temporary behind


def test_schedule_replays_on_a_bare_scheduler(tmp_path):
    """The op log alone reproduces the run's scheduler decisions: every admit gets the logged version and
    every batch the logged size, and the trained staleness histogram matches."""
    cfg = SimConfig(cluster=ClusterShape(rollout_replicas=2), costs=CostModel(max_batch=8),
                    workload=Workload(batch_size=4, prompt_len=8, length=LengthDist("lognormal", 20, 1.0, 80)),
                    scheduler=SchedulerConfig(batch_size=4, max_staleness=1, on_stale="drop"), steps=30, schedule=True)
    summary = run(cfg, tmp_path)
    doc = json.loads((tmp_path / "schedule.json").read_text())
    sched, trajs, hist = Scheduler(SchedulerConfig(**doc["scheduler"])), {}, {}
    for op, a in doc["ops"]:
        if op == "admit":
            assert sched.try_admit() == a
            trajs[sched.n_admitted - 1] = Trajectory.fake(sched.n_admitted - 1, 3, a)
        elif op == "done":
            sched.on_rollout_done(trajs.pop(a))
        elif op == "batch":
            batch = sched.next_batch()
            assert len(batch) == a
            for s in batch.staleness:
                hist[s] = hist.get(s, 0) + 1
        else:
            assert sched.on_learner_step() == a
    assert hist == summary["staleness_hist"] and summary["n_dropped"] == sched.n_dropped > 0


def run_bounded(out_dir, bound: int) -> dict:
    """8 rollout replicas and 4 teachers, 6 steps: 200 events on 22 threads."""
    cfg = SimConfig(cluster=ClusterShape(rollout_replicas=8, teacher_replicas=4), costs=CostModel(max_batch=4),
                    workload=Workload(batch_size=8, prompt_len=8, length=LengthDist("lognormal", 20, 1.0, 80)),
                    scheduler=SchedulerConfig(batch_size=8, max_staleness=1), steps=6, trace_json_max_events=bound)
    return run(cfg, out_dir)


def test_trace_json_keeps_whole_threads_within_the_bound(tmp_path):
    """Below the event count, trace.json holds at most the bound (counting trace events, not the "M" name
    records): every learner step and weight sync, and every event of each kept worker, as trace.csv has them."""
    s = run_bounded(tmp_path, 120)
    csv = trace.read(tmp_path / "trace.csv")
    assert len(csv) == s["n_events"] > 120                            # trace.csv keeps every event
    doc = json.loads((tmp_path / "trace.json").read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    other = doc["otherData"]
    assert len(events) == other["events_written"] <= 120 and other["events_total"] == s["n_events"]
    assert other["sampled"] is True and other["workers_total"]["rollout"] == 8
    kept = other["kept_workers"]
    assert kept["learner"] == [0] and kept["sync"] == [0] and 0 < len(kept["rollout"]) < 8
    names = [e["name"] for e in events]
    for kind in ("learner_step", "weight_sync"):
        assert names.count(kind) == (csv.kind == kind).sum() == 6
    in_kept = pd.Series([w in kept.get(r, []) for r, w in zip(csv.role, csv.worker)], index=csv.index)
    assert in_kept.sum() == len(events)                               # the kept workers' events, all of them
    trace.to_perfetto(csv[in_kept], tmp_path / "kept.json")           # ... and exactly those
    assert json.loads((tmp_path / "kept.json").read_text())["traceEvents"] == doc["traceEvents"]


def test_trace_json_bound_zero_and_above_the_count(tmp_path):
    s = run_bounded(tmp_path / "off", 0)
    assert (tmp_path / "off" / "trace.csv").exists() and not (tmp_path / "off" / "trace.json").exists()
    run_bounded(tmp_path / "fits", s["n_events"])                     # exactly the count: nothing is cut
    trace.to_perfetto(trace.read(tmp_path / "off" / "trace.csv"), tmp_path / "all.json")
    assert (tmp_path / "fits" / "trace.json").read_text() == (tmp_path / "all.json").read_text()


CONF = str(pathlib.Path(__file__).parents[1] / "conf")


def compose_sim(*overrides) -> SimConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose("sim", overrides=list(overrides)))


@pytest.mark.parametrize("override, field", [
    ("cluster.rollout_replicas=0", "rollout_replicas"),
    ("costs.decode_step_s=-1", "decode_step_s"),
    ("costs.weight_sync_s=-0.5", "weight_sync_s"),
    ("workload.batch_size=17", "in-flight capacity"),        # 2 replicas × 8 slots = 16
    ("scheduler.batch_size=4", "scheduler.batch_size"),
    ("workload.length.dist=gamma", "LengthDist.dist"),
    ("steps=0", "steps"),
    ("trace_json_max_events=-1", "trace_json_max_events"),
    ("cluster.placement=teacher_with_rollout", "teacher_replicas must be 0"),
])
def test_bad_input_is_rejected_naming_the_field(override, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        compose_sim(*SMALL, override)


def test_cli_exits_non_zero_on_bad_input(tmp_path):
    p = sim(tmp_path, *SMALL, "workload.batch_size=17")
    assert p.returncode != 0 and "in-flight capacity" in p.stderr and not (tmp_path / "summary.json").exists()


def test_shipped_cluster_and_workload_files_load():
    conf = pathlib.Path(CONF)
    names = sorted(p.stem for p in (conf / "cluster").glob("*.yaml"))
    assert len(names) >= 3
    for name in [n for n in names if n != "from_specs"]:
        for workload in sorted(p.stem for p in (conf / "workload").glob("*.yaml")):
            cfg = compose_sim(f"cluster={name}", f"workload={workload}")
            assert cfg.cluster.gpus >= 8 and cfg.scheduler.batch_size == cfg.workload.batch_size


def test_from_specs_cluster_needs_the_gpu_and_models_and_derives_the_costs():
    with pytest.raises(ValueError, match="specs.gpu must be one of .*got 'required'"):
        compose_sim("cluster=from_specs")
    shape = ("cluster.rollout_replicas=4", "cluster.gpus_per_teacher_replica=2", "cluster.learner_gpus=2")
    cfg = compose_sim("cluster=from_specs", "specs.gpu=h100-sxm", "specs.student=qwen3-1.7b",
                      "specs.teacher=qwen3-30b-a3b", *shape)
    assert cfg.costs == costs_from_specs(Specs("h100-sxm", "qwen3-1.7b", "qwen3-30b-a3b"), cfg.cluster, cfg.workload)
    with pytest.raises(ValueError, match="cluster.learner_gpus=1 cannot hold qwen3-8b"):
        compose_sim("cluster=from_specs", "specs.gpu=l40s", "specs.student=qwen3-8b", "specs.teacher=qwen3-8b",
                    "cluster.rollout_replicas=4", "cluster.learner_gpus=1")
