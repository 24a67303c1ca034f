"""The driver contract, checked across every execution mode: lockstep, schedule replay, concurrent processes,
Ray actors, and the simulator all write the same metrics columns and the same trace, because they all go
through asyncopd.driver and backends.session. Each assertion here is one of the drifts the run loops had
before that layer existed (lockstep admits without uids, replay syncs without bytes, TensorBoard in one mode
only, ess/n_dropped in some modes only, three names for the staleness knob)."""

import dataclasses

import pandas as pd
import pytest

from asyncopd import trace
from asyncopd.scheduler import SchedulerConfig
from backends.run import RunConfig, run
from backends.session import MODE_EXTRAS
from backends.toy import ToyConfig
from backends.toy_concurrent import ConcurrentConfig
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from sim.model import simulate
from sim.run import SimConfig, run as sim_run
from test_toy_run import TINY, tiny

STEPS, B = 4, 8
CHECKED_KINDS = ("admit", "rollout", "drop", "teacher", "learner_step", "weight_sync")


@pytest.fixture(scope="module")
def schedule(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    sim_run(SimConfig(cluster=ClusterShape(rollout_replicas=3), workload=Workload(
        batch_size=B, prompt_len=8, length=LengthDist("lognormal", 40, 1.0, 400)),
        costs=CostModel(max_batch=8, learner_step_s=0.2, weight_sync_s=0.05),
        scheduler=SchedulerConfig(batch_size=B, max_staleness=1, on_stale="drop"), steps=STEPS, schedule=True), out)
    return out / "schedule.json"


@pytest.fixture(scope="module")
def runs(model_cache, schedule, tmp_path_factory):
    """mode -> (metrics, trace) of one tiny run per execution mode, each with logger=tensorboard."""
    pytest.importorskip("ray")
    base = tiny(model_cache, steps=STEPS, logger="tensorboard")
    configs = {"lockstep": base,
               "replay": dataclasses.replace(base, staleness=f"schedule:{schedule}"),
               "concurrent": dataclasses.replace(base, exec="concurrent", staleness="1"),
               "ray": dataclasses.replace(base, exec="ray", staleness="1",
                                          concurrent=ConcurrentConfig(placement="colocate_teacher_with_rollout"))}
    out = {}
    for mode, cfg in configs.items():
        d = tmp_path_factory.mktemp(mode)
        out[mode] = (run(cfg, d), trace.read(d / "trace.csv"), d)
    return out


def filled_columns(df: pd.DataFrame, kind: str) -> set[str]:
    """Columns an event kind fills (differs from the schema default in some row); t and worker always differ."""
    rows = df[df.kind == kind]
    return {c for c in trace.COLUMNS if c not in ("t", "kind", "role", "worker")
            and (rows[c] != trace.DEFAULTS[c]).any()}


@pytest.mark.slow
def test_every_mode_writes_the_same_metric_columns(runs, schedule):
    columns = {mode: set(m.columns) - set(MODE_EXTRAS[mode]) for mode, (m, _, _) in runs.items()}
    assert columns["lockstep"] == columns["replay"] == columns["concurrent"] == columns["ray"], columns
    for mode, (m, _, _) in runs.items():
        assert {"objective", "staleness", "ess", "n_dropped", "staleness_in_flight", "staleness_in_queue",
                "sched_n_admitted", "accuracy"} <= set(m.columns), mode
        assert m.step.tolist() == list(range(STEPS + 1)), mode
    specs = {mode: set(m.staleness) for mode, (m, _, _) in runs.items()}  # one column, the knob as given
    assert specs == {"lockstep": {"fixed:2"}, "replay": {f"schedule:{schedule}"}, "concurrent": {"1"}, "ray": {"1"}}


@pytest.mark.slow
def test_every_mode_and_the_simulator_write_the_same_trace(runs):
    sim_events, _ = simulate(ClusterShape(rollout_replicas=2), CostModel(max_batch=8),
                             Workload(batch_size=B, prompt_len=8, length=LengthDist("lognormal", 20, 1.0, 100)),
                             SchedulerConfig(batch_size=B, max_staleness=1, on_stale="drop"), STEPS)
    traces = {mode: t for mode, (_, t, _) in runs.items()} | {"sim": trace.to_frame(sim_events)}
    for mode, t in traces.items():
        admitted = t.uid[t.kind == "admit"].tolist()
        assert sorted(admitted) == list(range(len(admitted))), mode          # uid = admission index
        assert set(t.uid[t.kind.isin(["rollout", "drop"])]) <= set(admitted), mode
        assert t[t.kind == "learner_step"].version.tolist() == list(range(1, STEPS + 1)), mode
    for kind in CHECKED_KINDS:
        seen = {mode: filled_columns(t, kind) for mode, t in traces.items() if (t.kind == kind).any()}
        if "sim" in seen and kind == "weight_sync":
            assert seen.pop("sim") == seen["lockstep"] - {"bytes"}   # the simulator models the time, not the bytes
        assert len({frozenset(c) for c in seen.values()}) == 1, (kind, seen)


@pytest.mark.slow
def test_tensorboard_scalars_in_every_mode(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for mode, (m, _, d) in runs.items():
        acc = EventAccumulator(str(d / "tb"))
        acc.Reload()
        assert {"loss", "accuracy", "staleness_mean"} <= set(acc.Tags()["scalars"]), mode
        assert [e.step for e in acc.Scalars("loss")] == list(range(1, STEPS + 1)), mode
        assert [e.value for e in acc.Scalars("loss")] == pytest.approx(m.loss.dropna().tolist()), mode


@pytest.mark.slow
def test_staleness_histogram_and_split_agree_with_the_batches(runs):
    for mode, (m, _, d) in runs.items():
        hist = pd.read_csv(d / "staleness_hist.csv")
        trained = m[m.step > 0]
        assert hist["count"].sum() == STEPS * B, mode
        assert (hist.staleness * hist["count"]).sum() / (STEPS * B) == pytest.approx(trained.staleness_mean.mean())
        assert (trained.staleness_in_flight + trained.staleness_in_queue).tolist() == pytest.approx(
            trained.staleness_mean.tolist()), mode


def test_the_staleness_knob_is_parsed_once():
    assert RunConfig(staleness="fixed:3").scheduler == SchedulerConfig(batch_size=64, fixed_staleness=3)
    assert RunConfig(exec="concurrent", staleness="2").scheduler.max_staleness == 2
    assert RunConfig(toy=ToyConfig(**{**TINY, "mixture_frac": 0.25})).scheduler.batch_size == 6
    for spec in ("fixed:0", "fixed:7", "0", "5"):
        assert SchedulerConfig.parse(spec).spec == spec                       # one grammar, both ways
