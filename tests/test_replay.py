"""Sim-scheduled training: the toy lockstep run replays a sim.run schedule with the simulated staleness pattern."""


import pandas as pd
import pytest

from asyncopd import trace
from asyncopd.scheduler import SchedulerConfig
from backends import checkpoint
from backends.run import run
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from sim.run import SimConfig, run as sim_run
from test_toy_run import reproducible, tiny  # tests/ is on sys.path (pytest prepend import mode)

STEPS = 8


@pytest.fixture(scope="module")
def schedule(tmp_path_factory):
    """A drop-mode schedule with stragglers: lognormal lengths on 3 replicas, η = 1, B = 8 (the tiny run's B)."""
    out = tmp_path_factory.mktemp("sim")
    cfg = SimConfig(cluster=ClusterShape(rollout_replicas=3), workload=Workload(
        batch_size=8, prompt_len=8, length=LengthDist("lognormal", 40, 1.0, 400)),
        costs=CostModel(max_batch=8, learner_step_s=0.2, weight_sync_s=0.05),
        scheduler=SchedulerConfig(batch_size=8, max_staleness=1, on_stale="drop"), steps=STEPS, schedule=True)
    summary = sim_run(cfg, out)
    assert summary["n_dropped"] > 0 and set(summary["staleness_hist"]) == {0, 1}   # a pattern worth replaying
    return out, summary


def test_replay_trains_under_the_simulated_staleness_pattern(model_cache, schedule, tmp_path):
    sim_dir, summary = schedule
    df = run(tiny(model_cache, staleness=f"schedule:{sim_dir / 'schedule.json'}", steps=STEPS), tmp_path)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "staleness_hist.csv"),
                                  pd.read_csv(sim_dir / "staleness_hist.csv"))
    t = trace.read(tmp_path / "trace.csv")
    sim_t = trace.read(sim_dir / "trace.csv")
    steps = sim_t[sim_t.kind == "learner_step"]
    sim_drops = sim_t[(sim_t.kind == "drop") & (sim_t.t <= (steps.t + steps.dur_s).max())]   # the replay stops
    assert summary["n_dropped"] >= len(sim_drops) > 0                            # at the last step, the sim later
    assert sorted(t[t.kind == "drop"].uid) == sorted(sim_drops.uid)              # the same trajectories
    assert t[t.kind == "learner_step"].staleness.tolist() == pytest.approx(
        sim_t[sim_t.kind == "learner_step"].staleness.tolist())                        # batch by batch
    assert df.step.tolist() == list(range(STEPS + 1)) and df.staleness_max.max() == 1


def test_replay_is_deterministic_and_resumes_exactly(model_cache, schedule, tmp_path):
    path = schedule[0] / "schedule.json"
    full = run(tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS), tmp_path / "full")
    again = run(tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS), tmp_path / "again")
    pd.testing.assert_frame_equal(reproducible(full), reproducible(again), check_exact=True)
    half = run(tiny(model_cache, staleness=f"schedule:{path}", steps=4), tmp_path / "resumed")
    assert half.step.max() == 4 and (checkpoint.latest(tmp_path / "resumed" / "checkpoint") / "pending.safetensors").exists()
    resumed = run(tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS, resume=True), tmp_path / "resumed")
    pd.testing.assert_frame_equal(reproducible(resumed), reproducible(full), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / "staleness_hist.csv"),
                                  pd.read_csv(schedule[0] / "staleness_hist.csv"))


def test_bad_schedules_are_refused(model_cache, schedule, tmp_path):
    path = schedule[0] / "schedule.json"
    with pytest.raises(ValueError, match="toy.batch_size"):
        run(tiny(model_cache, staleness=f"schedule:{path}", toy={"batch_size": 4}), tmp_path / "a")
    with pytest.raises(ValueError, match="learner steps in schedule"):
        run(tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS + 1), tmp_path / "b")
    with pytest.raises(ValueError, match="no such file"):
        run(tiny(model_cache, staleness="schedule:/nonexistent.json"), tmp_path / "c")
    with pytest.raises(ValueError, match="schedule:<file>"):
        tiny(model_cache, staleness="every:2")
