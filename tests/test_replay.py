"""Sim-scheduled training: the toy lockstep run replays a sim.run schedule with the simulated staleness pattern."""


import json
import time

import pandas as pd
import pytest

from asyncopd import trace
from asyncopd.rollout import Trajectory
from asyncopd.scheduler import Scheduler, SchedulerConfig
from backends import checkpoint
from backends.run import run
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from backends.replay import load_schedule
from sim.run import SimConfig, run as sim_run, write_schedule
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


# --- every problem of a schedule file is one ValueError at RunConfig construction, before any model is built ---

def corrupt(schedule, tmp_path, edit) -> tuple[str, dict]:
    """A copy of the fixture's schedule.json changed in place by edit(doc), or cut in half (edit=None); the path
    and the original document."""
    src = schedule[0] / "schedule.json"
    doc = json.loads(src.read_text())
    path = tmp_path / "schedule.json"
    if edit is None:
        path.write_text(src.read_text()[: src.stat().st_size // 2])
    else:
        edit(doc)
        path.write_text(json.dumps(doc))
    return str(path), json.loads(src.read_text())


def first(ops, name) -> int:
    return next(i for i, (op, _) in enumerate(ops) if op == name)


def test_truncated_schedule(model_cache, schedule, tmp_path):
    path, _ = corrupt(schedule, tmp_path, None)
    try:
        json.loads(open(path).read())
    except json.JSONDecodeError as err:
        reason = str(err)
    with pytest.raises(ValueError) as e:
        tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS)
    assert str(e.value) == (f"{path}: not valid JSON ({reason}); the file may be truncated: write it again with "
                            f"python -m sim.run schedule=true")


def test_half_the_ops_removed(model_cache, schedule, tmp_path):
    path, doc = corrupt(schedule, tmp_path, lambda d: d.update(ops=d["ops"][: len(d["ops"]) // 2]))
    n = sum(op == "step" for op, _ in doc["ops"][: len(doc["ops"]) // 2])
    with pytest.raises(ValueError) as e:
        tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS)
    assert str(e.value) == (f"{path}: steps={STEPS} is more than the {n} learner steps in schedule (its header says "
                            f"steps={STEPS}: the op list is cut short)")
    with pytest.raises(ValueError) as e:                  # even a run short enough for what is left
        tiny(model_cache, staleness=f"schedule:{path}", steps=1)
    assert str(e.value) == f"{path}: its header says steps={STEPS}, but its ops hold {n} learner steps"


def test_op_renamed(model_cache, schedule, tmp_path):
    path, doc = corrupt(schedule, tmp_path, lambda d: d["ops"][5].__setitem__(0, "admitted"))
    with pytest.raises(ValueError) as e:
        tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS)
    assert str(e.value) == (f'{path}: ops[5] is ["admitted", {doc["ops"][5][1]}]; each op must be [op, int] with op '
                            f"one of admit, done, batch, step")


def test_done_for_an_unknown_uid(model_cache, schedule, tmp_path):
    def edit(d):
        d["ops"][first(d["ops"], "done")][1] = 10**6
    path, doc = corrupt(schedule, tmp_path, edit)
    i = first(doc["ops"], "done")
    n = sum(op == "admit" for op, _ in doc["ops"][:i])
    with pytest.raises(ValueError) as e:
        tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS)
    assert str(e.value) == (f"{path}: the ops do not replay on a fresh scheduler with its config: operation {i} "
                            f"['done', 1000000]: uid 1000000 was never admitted ({n} admissions so far)")


def test_wrong_batch_size(model_cache, schedule, tmp_path):
    path = schedule[0] / "schedule.json"
    with pytest.raises(ValueError) as e:
        tiny(model_cache, staleness=f"schedule:{path}", steps=STEPS, toy={"batch_size": 4})
    assert str(e.value) == f"{path}: the schedule has batch_size=8, but toy.batch_size=4: set toy.batch_size=8"


def test_inconsistent_or_malformed_schedules(schedule, tmp_path):
    """The remaining checks, at load_schedule (what RunConfig calls), each with its message."""
    doc = json.loads((schedule[0] / "schedule.json").read_text())
    ops = doc["ops"]
    a, d, b = first(ops, "admit"), first(ops, "done"), first(ops, "batch")
    dup = next(i for i, (op, u) in enumerate(ops) if op == "done" and i > d)   # a second done, made a repeat
    cases = [
        (lambda x: x.update(scheduler={**x["scheduler"], "max_staleness": -1}),
         "its scheduler config is refused: SchedulerConfig.max_staleness must be an int >= 0, got -1"),
        (lambda x: x["scheduler"].update(eta=1),
         "its scheduler config is refused: SchedulerConfig.__init__() got an unexpected keyword argument 'eta'"),
        (lambda x: x.pop("ops"), "not a schedule: expected a JSON object with keys scheduler, steps, ops (python -m "
                                 "sim.run schedule=true writes one), got ['scheduler', 'staleness_hist', 'steps']"),
        (lambda x: x["ops"].__setitem__(3, ["done", "7"]),
         'ops[3] is ["done", "7"]; each op must be [op, int] with op one of admit, done, batch, step'),
        (lambda x: x["ops"].__setitem__(a, ["admit", 3]), f"the ops do not replay on a fresh scheduler with its "
                                                         f"config: operation {a} ['admit', 3]: the scheduler admits "
                                                         f"at version 0, the schedule says 3"),
        (lambda x: x["ops"].__setitem__(dup, ["done", ops[d][1]]),
         f"the ops do not replay on a fresh scheduler with its config: operation {dup} ['done', {ops[d][1]}]: uid "
         f"{ops[d][1]} is not in flight (already done)"),
        (lambda x: x["ops"].insert(d, ["batch", 8]),
         f"the ops do not replay on a fresh scheduler with its config: operation {d} ['batch', 8]: no batch is ready "
         f"at version 0 (0 ready, {sum(op == 'admit' for op, _ in ops[:d])} in flight, B=8)"),
        (lambda x: x["ops"].__setitem__(b + 1, ["step", 2]), f"the ops do not replay on a fresh scheduler with its "
                                                            f"config: operation {b + 1} ['step', 2]: the learner step "
                                                            f"makes version 1, the schedule says 2"),
    ]
    for k, (edit, message) in enumerate(cases):
        x = json.loads(json.dumps(doc))
        edit(x)
        path = tmp_path / f"s{k}.json"
        path.write_text(json.dumps(x))
        with pytest.raises(ValueError) as e:
            load_schedule(path, 8, STEPS)
        assert str(e.value) == f"{path}: {message}", k
    for text, message in (("[1, 2]", "not a schedule: expected a JSON object with keys scheduler, steps, ops (python "
                                     "-m sim.run schedule=true writes one), got list"),
                          (b"\xff\xfe{", "not valid JSON (")):
        path = tmp_path / "t.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError) as e:
            load_schedule(path, 8, STEPS)
        assert str(e.value).startswith(f"{path}: {message}")
    with pytest.raises(ValueError) as e:
        load_schedule(tmp_path, 8, STEPS)
    assert str(e.value) == (f"{tmp_path}: not a file (staleness=schedule:<file>; write one with python -m sim.run "
                            f"schedule=true)")


def test_dry_run_is_cheap(tmp_path):
    """load_schedule replays the whole op log at config time: a 200-step, B = 64 schedule in well under a second."""
    cfg = SchedulerConfig(batch_size=64, max_staleness=1)
    sched, flying = Scheduler(cfg, record_ops=True), []
    while sched.version < 200:
        while (w := sched.try_admit()) is not None:
            flying.append(Trajectory.fake(sched.n_admitted - 1, 1, w))
        for t in flying:
            sched.on_rollout_done(t)
        flying.clear()
        sched.next_batch()
        sched.on_learner_step()
    write_schedule(tmp_path / "schedule.json", cfg, sched.ops, {"staleness_hist": {}})
    t0 = time.perf_counter()
    load_schedule(tmp_path / "schedule.json", 64, 200)
    assert time.perf_counter() - t0 < 1.0
