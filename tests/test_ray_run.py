"""backends.ray_run: learner, rollout and teacher as Ray actors; config checks, a run's trace and counts, resume,
a crashing actor, and no Ray process left behind.

The slow tests use the tiny models (model_cache) and two torch actors at most: the learner and one rollout actor
with the teacher colocated. `fresh_run` lets run() start and stop its own local Ray instance; the tests after it
share one module-scoped instance (`shared_ray`), which run() joins and leaves running."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from asyncopd import trace
from asyncopd.objective import ObjectiveConfig
from backends.ray_actors import TeacherActor
from backends.ray_run import RayConfig, check_fits, run
from backends.run import RunConfig
from backends.toy import ToyConfig, ToyRoles, build_models
from backends.toy_concurrent import CRASH_ENV, ConcurrentConfig
from backends.toy_engine import ToyRolloutEngine
from backends.toy_teacher import ToyTeacher, scored_tokens
from test_toy_concurrent import check_conservation
from test_toy_run import TINY

os.environ.setdefault("RAY_AUTH_MODE", "disabled")          # no token file for a throwaway local instance
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ETA, STEPS = 1, 3


def tiny(model_cache, steps=STEPS, resume=False) -> RunConfig:
    cfg = RunConfig(exec="concurrent", staleness=str(ETA), steps=steps, resume=resume,
                    toy=ToyConfig(**{**TINY, "cache_dir": model_cache}),
                    objective=ObjectiveConfig("reverse_kl_sampled", signal="stale", correction="tis"),
                    concurrent=ConcurrentConfig(placement="colocate_teacher_with_rollout"))
    cfg.exec, cfg.ray = "ray", RayConfig(num_cpus=2)       # set after validation: RunConfig's EXECS lack "ray" yet
    return cfg


def ray_processes() -> list[str]:
    """Live processes of a Ray instance this test process started (their session folder ends in our pid), and
    live Ray workers among our descendants."""
    me, marker, out = os.getpid(), f"_{os.getpid()}/".encode(), []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            cmd, stat = (p / "cmdline").read_bytes(), (p / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if state != "Z" and (b"/tmp/ray/session_" in cmd and marker in cmd or cmd.startswith(b"ray::")
                             and _descends_from(int(ppid), me)):
            out.append(cmd.replace(b"\0", b" ")[:120].decode(errors="replace"))
    return out


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except OSError:
            return False
    return False


# --- fast: configuration --------------------------------------------------------------------------------------

def test_ray_config_validation():
    for address in (None, "auto", "ray://head:10001", "10.0.0.1:6379"):
        assert RayConfig(address=address).address == address
    for kw, match in (({"address": "head"}, "ray.address"), ({"num_cpus": 0}, "ray.num_cpus must be >= 1"),
                      ({"num_gpus": -1}, "ray.num_gpus"), ({"sync_port": 70000}, r"ray.sync_port must be in \[0"),
                      ({"learner_cpus": -1.0}, "ray.learner_cpus"), ({"rollout_gpus": 1.5}, "whole number"),
                      ({"sync_bucket_bytes": 0}, "ray.sync_bucket_bytes")):
        with pytest.raises(ValueError, match=match):
            RayConfig(**kw)


def test_a_local_instance_must_hold_every_actor():
    colocated = ConcurrentConfig(placement="colocate_teacher_with_rollout")
    check_fits(RayConfig(num_cpus=2), colocated)                           # learner 1 + rollout 1
    with pytest.raises(ValueError, match=r"ray.num_cpus=2 .* need cpus=3;"):    # + a separate teacher
        check_fits(RayConfig(num_cpus=2), ConcurrentConfig(placement="separate"))
    with pytest.raises(ValueError, match=r"2 rollout actor\(s\) need cpus=2.5;"):
        check_fits(RayConfig(num_cpus=2, rollout_cpus=0.75), ConcurrentConfig(rollout_workers=2,
                                                                          placement="colocate_teacher_with_rollout"))
    with pytest.raises(ValueError, match=r"ray.num_gpus=0 .* need gpus=1;"):
        check_fits(RayConfig(num_cpus=2, learner_gpus=1), colocated)
    check_fits(RayConfig(num_cpus=1, address="auto"), ConcurrentConfig(rollout_workers=8))   # the cluster decides


def test_default_placement_fits_the_default_local_instance():
    check_fits(RayConfig(), ConcurrentConfig())              # learner + rollout actor + teacher on 3 logical CPUs


def test_teacher_actor_scores_like_the_toy_teacher(model_cache):
    """The separate teacher's actor body, in this process (a Ray run with it needs a third torch actor)."""
    cfg = tiny(model_cache)
    task, teacher, student, _ = build_models(cfg.toy)
    engine = ToyRolloutEngine(student, max_new_tokens=task.max_response_len, eos_id=task.eos_id)
    trajs = engine.generate(task.make_prompts(5, seed=3), list(range(5)))
    got, events = TeacherActor(cfg, ToyRoles.of(cfg, student, teacher)).score(trajs)
    want = ToyTeacher(teacher, batch_size=8).score(trajs, topk=0, n_samples=0)
    assert [torch.equal(g.sampled_logp, w.sampled_logp) for g, w in zip(got, want)] == [True] * 5
    assert [(e.kind, e.n_seqs, e.tokens) for e in events] == [("teacher", 5, scored_tokens(trajs))]


def test_cluster_preset_validates():
    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "ray" / "cluster.yaml").read_text())
    ray_cfg, concurrent = RayConfig(**preset["ray"]), ConcurrentConfig(**preset["concurrent"])
    assert preset["exec"] == "ray" and ray_cfg.address == "auto" and concurrent.rollout_workers == 4
    check_fits(ray_cfg, concurrent)


# --- slow: runs -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fresh_run(model_cache, tmp_path_factory):
    """A 3-step run that starts and shuts down its own local Ray instance: (out_dir, metrics, cfg)."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    out_dir, cfg = tmp_path_factory.mktemp("ray_fresh"), tiny(model_cache)
    return out_dir, run(cfg, out_dir), cfg


@pytest.fixture(scope="module")
def shared_ray(fresh_run):
    """One local Ray instance for the remaining runs (after fresh_run's own instance is gone)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
    assert not ray_processes()


def idle_cpus(ray) -> float:
    """CPUs free once the run's killed actors released theirs (ray.kill is asynchronous: wait up to 20 s)."""
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


@pytest.mark.slow
def test_run_trace_counts_and_staleness(fresh_run):
    out_dir, m, cfg = fresh_run
    assert m.step.tolist() == list(range(STEPS + 1)) and (m[m.step > 0].staleness_max <= ETA).all()
    df = check_conservation(out_dir, eta=ETA)               # every admission trained, dropped, in flight or ready
    assert {"admit", "rollout", "decode_iter", "teacher", "learner_step", "weight_sync"} <= set(df.kind)
    steps = df[df.kind == "learner_step"]
    assert steps.version.tolist() == list(range(1, STEPS + 1)) and (steps.n_seqs == 8).all()
    assert (steps.staleness <= ETA).all()
    # weights: the start (version 0), then after every step but the last, each the student's whole state dict
    student = build_models(cfg.toy)[2]
    state_bytes = sum(v.numel() * v.element_size() for v in student.state_dict().values())
    syncs = df[df.kind == "weight_sync"]
    assert syncs.version.tolist() == list(range(STEPS)) and (syncs.bytes == state_bytes).all()
    assert (syncs.dur_s > 0).all() and (syncs.role == "sync").all()
    info = json.loads((out_dir / "run_info.json").read_text())
    counts = info["scheduler"]
    assert counts["n_admitted"] == counts["n_trained"] + counts["n_dropped"] + counts["in_flight"] + counts["n_ready"]
    assert counts["n_trained"] == STEPS * 8 and counts["version"] == STEPS
    assert info["exec"] == "ray" and set(info["ray"]["nodes"]) == {"learner", "rollout actor 0"}
    assert info["ray"]["weight_bytes"] == state_bytes
    hist = pd.read_csv(out_dir / "staleness_hist.csv")
    assert hist["count"].sum() == STEPS * 8 and hist.staleness.max() <= ETA
    assert json.loads((out_dir / "trace.json").read_text())["otherData"]["placement"] == "colocate_teacher_with_rollout"
    assert (out_dir / "checkpoint" / "latest").exists()


@pytest.mark.slow
def test_run_shuts_down_the_ray_it_started(fresh_run):
    import ray
    assert not ray.is_initialized() and not ray_processes()


@pytest.mark.slow
def test_resume_continues_on_a_running_cluster(fresh_run, shared_ray, tmp_path):
    out_dir = tmp_path / "resumed"
    shutil.copytree(fresh_run[0], out_dir)
    m = run(tiny(fresh_run[2].toy.cache_dir, steps=STEPS + 1, resume=True), out_dir)
    assert m.step.tolist() == list(range(STEPS + 2)) and (m[m.step > 0].staleness_max <= ETA).all()
    assert json.loads((out_dir / "run_info.json").read_text())["resumed_from_step"] == STEPS
    df = trace.read(out_dir / "trace.csv")
    assert df.query("kind == 'learner_step'").version.tolist() == list(range(1, STEPS + 2))
    assert STEPS in df.query("kind == 'weight_sync'").version.tolist()    # the restart syncs the checkpoint
    assert shared_ray.is_initialized() and idle_cpus(shared_ray) == 2     # left running, its actors killed


@pytest.mark.slow
def test_a_crashing_rollout_actor_is_named(fresh_run, shared_ray, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "3")
    with pytest.raises(RuntimeError, match="rollout actor 0 failed: .*crashes on purpose"):
        run(tiny(fresh_run[2].toy.cache_dir, steps=50), tmp_path)
    assert idle_cpus(shared_ray) == 2


@pytest.mark.slow
def test_a_dead_rollout_actor_is_named(fresh_run, shared_ray, tmp_path):
    """SIGKILL the rollout actor's process once it is built: whichever call fails first (its collect, or the
    learner's broadcast), the error names it."""
    def rollout_actors() -> set[int]:
        pids = set()
        for p in Path("/proc").iterdir():
            try:
                cmd = (p / "cmdline").read_bytes() if p.name.isdigit() else b""
            except OSError:
                continue
            if cmd.startswith(b"ray::RolloutActor") and b"__init__" not in cmd and _descends_from(int(p.name),
                                                                                                  os.getpid()):
                pids.add(int(p.name))
        return pids

    earlier = rollout_actors()                              # the previous test's, killed but maybe not gone yet

    def kill_when_built():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if ours := rollout_actors() - earlier:
                os.kill(ours.pop(), signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_built, daemon=True)
    killer.start()
    with pytest.raises(RuntimeError, match="rollout actor 0 (failed|died)"):
        run(tiny(fresh_run[2].toy.cache_dir, steps=300), tmp_path)
    killer.join()
    assert idle_cpus(shared_ray) == 2
