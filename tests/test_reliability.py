"""Reliability: what a run folder may contain, damaged checkpoints, collapse detection, file modes.

Each test reproduces a failure found by trying the project as a new user would (issue 18) and fails on the code
before the fix."""

import os
import pickle
import stat
from pathlib import Path

import pandas as pd
import pytest

from asyncopd.objective import ObjectiveConfig
from backends import checkpoint
from backends.health import CollapseError, HealthCheck, HealthConfig
from backends.run import run
from test_toy_run import reproducible, tiny


class Payload:
    """Unpickling this makes a directory: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def plant(folder: Path, marker: Path) -> list[str]:
    """A malicious pickle under every name the project ever read from a run folder (pending.pt: the schedule
    replay's pending trajectories, read with torch.load(weights_only=False) until safetensors replaced it), in
    every checkpoint, plus the usual torch names."""
    names = []
    for ckpt in [p for p in (folder / "checkpoint").glob("ckpt-*")]:
        for name in ("pending.pt", "optimizer.pt", "student.pt", "ring.pt", "state.pkl"):
            (ckpt / name).write_bytes(pickle.dumps(Payload(marker)))
            names.append(str(ckpt / name))
    return names


@pytest.mark.parametrize("mode", ["lockstep", "replay"])
def test_resuming_a_folder_with_malicious_pickles_runs_nothing(model_cache, tmp_path, mode, request):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))                 # the payload works: unpickling creates it
    assert marker.is_dir()
    marker.rmdir()
    kw = {}
    if mode == "replay":
        kw["staleness"] = f"schedule:{request.getfixturevalue('schedule_file')}"
    run(tiny(model_cache, steps=3, **kw), tmp_path / "run")
    assert plant(tmp_path / "run", marker)
    run(tiny(model_cache, steps=5, resume=True, **kw), tmp_path / "run")
    assert not marker.exists()


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory):
    from asyncopd.scheduler import SchedulerConfig
    from sim.costs import ClusterShape, CostModel, LengthDist, Workload
    from sim.run import SimConfig, run as sim_run
    out = tmp_path_factory.mktemp("sim")
    sim_run(SimConfig(cluster=ClusterShape(rollout_replicas=3), workload=Workload(
        batch_size=8, prompt_len=8, length=LengthDist("lognormal", 40, 1.0, 400)),
        costs=CostModel(max_batch=8, learner_step_s=0.2, weight_sync_s=0.05),
        scheduler=SchedulerConfig(batch_size=8, max_staleness=1, on_stale="drop"), steps=6, schedule=True), out)
    return out / "schedule.json"


def test_a_pending_file_that_is_not_safetensors_is_refused_not_unpickled(model_cache, schedule_file, tmp_path):
    marker = tmp_path / "pwned"
    run(tiny(model_cache, steps=3, staleness=f"schedule:{schedule_file}"), tmp_path / "run")
    for ckpt in (tmp_path / "run" / "checkpoint").glob("ckpt-*"):
        (ckpt / "pending.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(Exception):
        run(tiny(model_cache, steps=5, resume=True, staleness=f"schedule:{schedule_file}"), tmp_path / "run")
    assert not marker.exists()


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(model_cache, tmp_path, caplog):
    straight = run(tiny(model_cache, steps=6), tmp_path / "straight")
    run(tiny(model_cache, steps=5), tmp_path / "cut")
    root = tmp_path / "cut" / "checkpoint"
    assert [p.name for p in checkpoint.versions(root)] == ["ckpt-000005", "ckpt-000004", "ckpt-000003"]  # keep 3
    bad = root / "ckpt-000005" / "student.safetensors"
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(checkpoint.CheckpointError, match="student.safetensors"):
        checkpoint.verify(root / "ckpt-000005")
    resumed = run(tiny(model_cache, steps=6, resume=True), tmp_path / "cut")
    assert f"checkpoint {root / 'ckpt-000005'} is damaged" in caplog.text and str(bad) in caplog.text
    pd.testing.assert_frame_equal(reproducible(resumed), reproducible(straight), check_exact=True)


def test_when_every_checkpoint_is_damaged_the_error_names_each_file(model_cache, tmp_path):
    run(tiny(model_cache, steps=2, keep_checkpoints=2), tmp_path)
    root = tmp_path / "checkpoint"
    for ckpt in checkpoint.versions(root):
        (ckpt / "state.json").write_text("{")
    with pytest.raises(checkpoint.CheckpointError, match="ckpt-000002/state.json.*ckpt-000001/state.json"):
        run(tiny(model_cache, steps=3, resume=True, keep_checkpoints=2), tmp_path)


def collapsing(model_cache, **kw):
    """The reported collapse: stale reverse KL, k = 8, lr far too large (loss to -1e5, accuracy and gradient to 0)."""
    return tiny(model_cache, objective=ObjectiveConfig("reverse_kl_sampled", signal="stale"), staleness="fixed:8",
                steps=30, toy={"lr": 1.0, "eval_every": 5, "ckpt_every": 5}, **kw)


def test_a_collapse_stops_the_run_naming_the_signals_and_the_checkpoint(model_cache, tmp_path):
    with pytest.raises(CollapseError, match=r"collapsed at step \d+: .*gradient norm exactly 0.*The last checkpoint "
                                            rf"is {tmp_path}/checkpoint/ckpt-0000\d\d"):
        run(collapsing(model_cache), tmp_path)
    m = pd.read_csv(tmp_path / "metrics.csv")
    assert m.health.iloc[0] == "ok" and (m.health.iloc[-3:] != "ok").all()
    assert m.step.max() < 30


def test_warn_keeps_training_and_records_health(model_cache, tmp_path):
    m = run(collapsing(model_cache, health=HealthConfig(on_collapse="warn")), tmp_path)
    assert m.step.max() == 30 and m.health.iloc[-1] != "ok"
    healthy = run(tiny(model_cache, steps=6), tmp_path / "healthy")
    assert (healthy.health == "ok").all()


def test_health_signals_on_hand_built_rows():
    check = HealthCheck(HealthConfig(patience=2))
    assert check({"step": 0, "accuracy": 0.8, "eval_reverse_kl": 0.5}) == []
    assert check({"step": 1, "loss": 1.0, "grad_norm": 0.5, "response_len_mean": 10.0}) == []
    fired = check({"step": 2, "loss": -5.0, "grad_norm": 0.0, "response_len_mean": 1.0, "truncation_rate": 0.95,
                   "repetition_rate": 0.2, "accuracy": 0.1, "eval_reverse_kl": 6.0})
    assert fired == ["accuracy 0.8 -> 0.1", "held-out reverse KL 0.5 -> 6", "gradient norm exactly 0 (loss -5.0)",
                     "mean response length 10 -> 1", "truncation rate 0.95"]
    assert not check.collapsed
    assert check({"step": 3, "grad_norm": 0.0}) and check.collapsed          # eval signals hold until re-evaluated
    assert check({"step": 4, "grad_norm": 1.0, "accuracy": 0.75, "eval_reverse_kl": 0.6}) == []
    assert not check.collapsed
    weak = HealthCheck(HealthConfig())                                         # a weak student's noise is no collapse
    weak({"step": 0, "accuracy": 0.09})
    assert weak({"step": 1, "accuracy": 0.0, "response_len_mean": 3.0}) == []


def test_divergence_before_any_checkpoint_says_there_is_none(model_cache, tmp_path, monkeypatch):
    from backends import toy_learner
    monkeypatch.setattr(toy_learner.ToyLearner, "step", lambda self, b, s: (_ for _ in ()).throw(
        FloatingPointError("non-finite loss (nan)")))
    with pytest.raises(RuntimeError, match=r"diverged at step 1: non-finite loss \(nan\)\. No checkpoint was "
                                           r"written yet"):
        run(tiny(model_cache), tmp_path)


def test_output_files_follow_the_umask(model_cache, tmp_path):
    old = os.umask(0o022)
    try:
        run(tiny(model_cache, steps=2), tmp_path)
    finally:
        os.umask(old)
    for name in ("metrics.csv", "trace.csv", "trace.json", "staleness_hist.csv", "run_info.json", "models.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
