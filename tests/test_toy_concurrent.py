"""The toy backend's concurrent run: staleness bound, conservation, synchronous η=0, crash and resume handling.

Multi-process runs (spawn: each child imports torch) take a few seconds each, so they are marked slow."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import pandas as pd
import pytest

from asyncopd import trace
from asyncopd.objective import ObjectiveConfig
from backends.run import RunConfig, run
from backends.toy import ToyConfig
from backends.toy_concurrent import CRASH_ENV, ConcurrentConfig
from test_toy_run import TINY


def tiny(model_cache, eta=1, **kw):
    toy = ToyConfig(**{**TINY, "cache_dir": model_cache, **kw.pop("toy", {})})
    return RunConfig(exec="concurrent", staleness=str(eta), steps=kw.pop("steps", 4), resume=kw.pop("resume", False), toy=toy,
                     objective=ObjectiveConfig("reverse_kl_sampled", signal="stale", correction="tis"),
                     concurrent=ConcurrentConfig(**kw))


def child_pids() -> set[int]:
    """Live children of this process, except multiprocessing's resource tracker (one per interpreter, by design)."""
    pids = {int(c) for t in Path(f"/proc/{os.getpid()}/task").iterdir() for c in (t / "children").read_text().split()}
    return {p for p in pids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()}


def check_conservation(out_dir: Path, eta: int):
    df, info = trace.read(out_dir / "trace.csv"), json.loads((out_dir / "run_info.json").read_text())
    counts = info["scheduler"]
    steps = df[df.kind == "learner_step"]
    admitted, dropped = set(df.uid[df.kind == "admit"]), df.uid[df.kind == "drop"]
    # every admitted trajectory is trained, dropped, or still in flight / ready when the run ends
    assert len(admitted) == counts["n_admitted"] == (steps.n_seqs.sum() + len(dropped) + counts["in_flight"]
                                                     + counts["n_ready"])
    assert len(dropped) == counts["n_dropped"] and set(dropped) <= admitted
    assert set(df.uid[df.kind == "rollout"]) <= admitted
    # a rollout starts on weights no older than its admission (newer if they arrived first: admit_version)
    versions = df[df.kind == "rollout"].merge(df[df.kind == "admit"], on="uid", suffixes=("", "_admit"))
    assert (versions.version >= versions.version_admit).all()
    assert (df[df.kind == "drop"].staleness > eta).all()
    return df


@pytest.mark.slow
def test_bounded_async_staleness_and_conservation(model_cache, tmp_path):
    # 2 engine slots for 16 admissions: requests queue in the engine, and some usually start after a weight update
    # (behav_version > admit_version); that depends on timing, so test_engine_pump.py checks it with fixed timing
    m = run(tiny(model_cache, eta=1, kv_on_update="recompute", toy={"engine_slots": 2}), tmp_path)
    trained = m[m.step > 0]
    assert trained.step.tolist() == [1, 2, 3, 4] and (trained.staleness_max <= 1).all()
    df = check_conservation(tmp_path, eta=1)
    assert df[df.kind == "learner_step"].version.tolist() == [1, 2, 3, 4]
    assert {"decode_iter", "rollout", "teacher", "weight_sync", "admit"} <= set(df.kind)
    assert (tmp_path / "trace.json").exists() and (tmp_path / "checkpoint" / "latest").exists()
    assert not child_pids()


@pytest.mark.slow
def test_eta0_trains_only_fresh_rollouts(model_cache, tmp_path):
    m = run(tiny(model_cache, eta=0, placement="colocate_teacher_with_rollout", weight_update="between_rollouts"),
            tmp_path)
    trained = m[m.step > 0]
    assert (trained.staleness_max == 0).all() and (trained.n_dropped == 0).all()
    check_conservation(tmp_path, eta=0)
    assert json.loads((tmp_path / "run_info.json").read_text())["placement"] == "colocate_teacher_with_rollout"
    assert json.loads((tmp_path / "trace.json").read_text())["otherData"]["placement"] == "colocate_teacher_with_rollout"


@pytest.mark.slow
def test_worker_crash_names_the_worker_and_leaves_no_process(model_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "3")
    with pytest.raises(RuntimeError, match="rollout worker 0"):
        run(tiny(model_cache, eta=1, steps=50), tmp_path)
    assert not mp.active_children() and not child_pids()


@pytest.mark.slow
def test_resume_continues(model_cache, tmp_path):
    run(tiny(model_cache, eta=2, steps=2, rollout_workers=2), tmp_path)
    m = run(tiny(model_cache, eta=2, steps=4, rollout_workers=2, resume=True), tmp_path)
    assert m.step.tolist() == [0, 1, 2, 3, 4] and (m[m.step > 0].staleness_max <= 2).all()
    assert json.loads((tmp_path / "run_info.json").read_text())["resumed_from_step"] == 2
    assert trace.read(tmp_path / "trace.csv").query("kind == 'learner_step'").version.tolist() == [1, 2, 3, 4]
    assert m.staleness.tolist() == ["2"] * 5                   # the restored rows keep the knob as given
    counts = m.iloc[-1]                                        # whole-run counters: what was in flight is lost
    assert counts.sched_n_admitted == (counts.sched_in_flight + counts.sched_n_ready + counts.sched_n_trained
                                       + counts.sched_n_dropped + counts.sched_n_lost)
    assert counts.sched_n_trained == 4 * 8


@pytest.mark.slow
def test_pacing_admits_depth_ahead_and_drops_nothing(model_cache, tmp_path):
    """on_stale=deadline with pipeline_depth D=1 < η=3 on real processes: admission i happens at a version v with
    i < (v + D + 1)·B (the capacity rule at depth D), nothing is dropped and every batch is within η."""
    m = run(tiny(model_cache, eta=3, steps=6, rollout_workers=2, on_stale="deadline", pipeline_depth=1), tmp_path)
    trained = m[m.step > 0]
    assert trained.step.tolist() == list(range(1, 7)) and (trained.staleness_max <= 3).all()
    assert (trained.n_dropped == 0).all()
    df = check_conservation(tmp_path, eta=3)
    admits = df[df.kind == "admit"].sort_values("t", kind="stable")
    B = json.loads((tmp_path / "run_info.json").read_text())["batch_size"]
    assert (pd.Series(range(len(admits)), index=admits.index) < (admits.version + 2) * B).all()
    assert json.loads((tmp_path / "run_info.json").read_text())["pipeline_depth"] == 1


def test_concurrent_config_validation():
    with pytest.raises(ValueError, match="lockstep-only"):
        RunConfig(exec="concurrent", staleness="fixed:1")
    with pytest.raises(ValueError, match="fixed"):
        RunConfig(exec="lockstep", staleness="1")
    with pytest.raises(ValueError, match="placement"):
        ConcurrentConfig(placement="everywhere")
    assert RunConfig(exec="concurrent", staleness="3").exec == "concurrent"
    with pytest.raises(ValueError, match="concurrent.pipeline_depth must be None or an int >= 0"):
        ConcurrentConfig(pipeline_depth=-1)
    with pytest.raises(ValueError, match=r"pipeline_depth must be None or an int in \[0, max_staleness=1\]"):
        RunConfig(exec="concurrent", staleness="1", concurrent=ConcurrentConfig(pipeline_depth=2))
    with pytest.raises(ValueError, match="pipeline_depth=0 is for exec=concurrent or ray"):
        RunConfig(exec="lockstep", staleness="fixed:1", concurrent=ConcurrentConfig(pipeline_depth=0))


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_keeps_the_checkpoint(model_cache, tmp_path):
    """SIGINT to the CLI mid-run: it exits non-zero, no process of the run survives, the checkpoint loads."""
    import signal
    from backends import checkpoint
    proc, family = start_cli_run(model_cache, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert not survivors(family, within_s=10)                # zombies awaiting their reaper do not count
    assert checkpoint.latest(tmp_path / "checkpoint") is not None


EXIT_PROBE = """
import types

import torch

from backends.run import RunConfig
from backends.toy import ToyRoles
from backends.toy_concurrent import Workers
cfg = RunConfig(exec="concurrent", staleness="1")
session = types.SimpleNamespace(rec=types.SimpleNamespace(origin=0.0), start=0)
roles = ToyRoles.of(cfg, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
workers = Workers(cfg, session, roles)                  # never started: no reader
workers.publish(1, {"w": torch.zeros(1_000_000)})       # 4 MB into a pipe nobody drains
workers.shutdown()                                      # without it, this interpreter never exits
"""


def test_unread_weights_do_not_hold_the_learner_exit():
    """A worker that stops reading its weights queue (dead, or already stopping) must not hold the learner's
    exit: a multiprocessing queue's feeder thread blocks on a full pipe, and the interpreter joins it at exit
    unless shutdown releases the queue. (This was a Ctrl-C that did not end the run on a loaded machine.)"""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", EXIT_PROBE], cwd=root, timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def start_cli_run(model_cache, out: Path):
    """A concurrent CLI run, returned once it has written a checkpoint, with the pids of its children
    (workers and multiprocessing's resource tracker)."""
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "backends.run", "exec=concurrent", "staleness=1", "steps=400",
            *[f"toy.{k}={v}" for k, v in TINY.items()], f"hydra.run.dir={out}"]
    proc = subprocess.Popen(args, cwd=root, env={**os.environ, "ASYNCOPD_CACHE": model_cache},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoint" / "latest").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    family = {int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir() for c in (t / "children").read_text().split()}
    assert len(family) >= 2                                   # rollout worker, teacher (and the resource tracker)
    return proc, family


def survivors(pids: set[int], within_s: float) -> dict:
    """The pids still running (zombies awaiting their reaper do not count) after waiting up to within_s."""
    import time
    deadline = time.monotonic() + within_s
    while True:
        alive = {}
        for p in pids:
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()[:120]
            except OSError:
                continue
            if state != "Z":
                alive[p] = cmd
        if not alive or time.monotonic() > deadline:
            return alive


@pytest.mark.slow
def test_kill_9_of_the_learner_leaves_no_worker(model_cache, tmp_path):
    """kill -9 gives the learner no chance to clean up: its workers notice that their parent is gone and exit
    (the teacher used to block forever on a pipe write, ~480 MB resident, re-parented to PID 1)."""
    import signal
    proc, family = start_cli_run(model_cache, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not survivors(family, within_s=30)


@pytest.mark.slow
def test_sigterm_stops_every_process_and_keeps_the_checkpoint(model_cache, tmp_path):
    import signal
    from backends import checkpoint
    proc, family = start_cli_run(model_cache, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not survivors(family, within_s=10)
    assert checkpoint.latest(tmp_path / "checkpoint") is not None
