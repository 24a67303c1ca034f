"""sim.calibrate: a hand-built trace with known linear costs is fitted back exactly; bad input names the problem."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from asyncopd import trace
from asyncopd.trace import Event
from sim.calibrate import CalibrateConfig, calibrate, load_run

D0, DSEQ, DPRE = 2e-3, 3e-5, 1e-5          # decode: 2 ms + 30 µs per extra sequence + 10 µs per prefilled token
OVERHEAD = 1e-4                            # loop overhead between decode iterations
L0, LTOK = 0.02, 5e-5                      # learner: 20 ms + 50 µs per token
TCALL, TSEQ, TTOK = 3e-3, 2e-4, 7e-5      # teacher: 3 ms per call + 0.2 ms per sequence + 70 µs per token
SYNC = 0.01                                # learner step end -> worker's load done
PUBLISH = 0.004                            # learner step end -> its next admission


def synthetic_run(tmp_path, placement="separate", steps=12, B=8):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ev, t = [], 0.0
    for i in range(400):                    # one worker's decode iterations, back to back
        n, p = int(rng.integers(1, 40)), int(rng.integers(0, 3)) * 7
        dur = D0 + DSEQ * (n - 1) + DPRE * p
        ev.append(Event(t=t, kind="decode_iter", worker=1, n_seqs=n, tokens=p, dur_s=dur))
        t += dur + OVERHEAD
    lengths = rng.integers(1, 30, size=200)
    for u, n in enumerate(lengths):
        ev.append(Event(t=0.001 * u, kind="rollout", worker=0, uid=u, tokens=int(n), dur_s=0.01))
    for c in range(40):                     # teacher calls on their own process (worker 0 of role teacher)
        tok, n = int(rng.integers(50, 400)), int(rng.integers(1, 20))
        ev.append(Event(t=0.02 * c, kind="teacher", n_seqs=n, tokens=tok, dur_s=TCALL + TSEQ * n + TTOK * tok))
    t = 0.0
    for v in range(1, steps + 1):
        tok = int(rng.integers(50, 300))
        ev.append(Event(t=t, kind="learner_step", version=v, n_seqs=B, tokens=tok, dur_s=L0 + LTOK * tok))
        end = t + L0 + LTOK * tok
        if v % 3:
            ev.append(Event(t=end + SYNC - 0.002, kind="weight_sync", worker=0, version=v, dur_s=0.002))
        else:                               # worker 0 busy across the step's end: its late load is not sync time
            ev.append(Event(t=end - 0.001, kind="decode_iter", worker=0, n_seqs=300, dur_s=D0 + DSEQ * 299))
            ev.append(Event(t=end + SYNC + 0.02, kind="weight_sync", worker=0, version=v, dur_s=0.002))
        ev += [Event(t=end + PUBLISH + 1e-4 * k, kind="admit", uid=1000 * v + k, version=v) for k in range(3)]
        t = end + 0.05
    trace.write(ev, tmp_path / "trace.csv")
    (tmp_path / "run_info.json").write_text(json.dumps(
        {"placement": placement, "rollout_workers": 2, "batch_size": B, "engine_slots": 16, "staleness": "1",
         "on_stale": "drop"}))
    return lengths


def test_known_costs_are_recovered(tmp_path):
    lengths = synthetic_run(tmp_path)
    cluster, costs, workload, diag = calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=0))
    assert costs.decode_step_s == pytest.approx(D0 + OVERHEAD, rel=1e-6)
    assert costs.decode_step_s_per_seq == pytest.approx(DSEQ, rel=1e-6)
    assert costs.prefill_s_per_token == pytest.approx(DPRE, rel=1e-6)
    assert diag["decode_loop_overhead_s"] == pytest.approx(OVERHEAD, rel=1e-6) and diag["r2_decode"] == pytest.approx(1)
    assert costs.learner_step_s == pytest.approx(L0, rel=1e-6)
    assert costs.learner_s_per_token == pytest.approx(LTOK, rel=1e-6)
    assert costs.teacher_s_per_token == pytest.approx(TTOK, rel=1e-6)
    assert costs.teacher_s_per_seq == pytest.approx(TSEQ, rel=1e-6)
    assert costs.teacher_call_s == pytest.approx(TCALL, rel=1e-6) and diag["r2_teacher"] == pytest.approx(1)
    assert costs.teacher_max_batch == 8 and costs.publish_s == pytest.approx(PUBLISH, rel=1e-6)
    assert costs.weight_sync_s == pytest.approx(SYNC, rel=1e-6)
    assert diag["n_weight_loads_idle"] == 12 - 4 and diag["n_weight_loads_busy"] == 4
    assert costs.max_batch == 16
    assert cluster.rollout_replicas == 2 and cluster.teacher_replicas == 1 and cluster.placement == "separate"
    assert workload.batch_size == 8 and sorted(workload.length.values) == sorted(lengths.tolist())
    assert workload.length.max == lengths.max()


def test_cli_writes_yaml_usable_by_sim_run(tmp_path):
    synthetic_run(tmp_path / "run")
    out = tmp_path / "cal"
    p = subprocess.run([sys.executable, "-m", "sim.calibrate", f"trace={tmp_path / 'run'}", "warmup_steps=0",
                        f"hydra.run.dir={out}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    costs = yaml.safe_load((out / "cluster" / "calibrated.yaml").read_text())["costs"]
    assert costs["learner_step_s"] == pytest.approx(L0, rel=1e-6)
    p = subprocess.run([sys.executable, "-m", "sim.run", "--config-dir", str(out), "cluster=calibrated",
                        "workload=calibrated", "steps=5", f"hydra.run.dir={tmp_path / 'sim'}"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["config"]["costs"]["teacher_s_per_token"] == pytest.approx(TTOK)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no trace.csv"):
        load_run(tmp_path)
    synthetic_run(tmp_path, steps=3)
    with pytest.raises(ValueError, match="at least warmup_steps"):
        calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=2))
    with pytest.raises(ValueError, match="idle_gap_s"):
        CalibrateConfig(idle_gap_s=0)


def test_weight_sync_of_an_always_busy_worker_is_publish_plus_pickup():
    # steps end at 1, 2, 3; the worker is in a call across each end, until end + 0.004, and loads 0.003 later:
    # no idle load, so weight_sync_s = publish_s + the median pickup-and-load time 0.003
    from sim.calibrate import weight_sync_delay
    ev = []
    for v in (1, 2, 3):
        ev.append(Event(t=v - 0.01, kind="decode_iter", worker=0, n_seqs=1, dur_s=0.014))
        ev.append(Event(t=v + 0.006, kind="weight_sync", worker=0, version=v, dur_s=0.001))
    df = trace.to_frame(ev)
    calls, loads = df[df.kind == "decode_iter"], df[df.kind == "weight_sync"]
    delay, diag = weight_sync_delay(calls, loads, {1: 1.0, 2: 2.0, 3: 3.0}, 0.002)
    assert delay == pytest.approx(0.002 + 0.003) and diag == {"n_weight_loads_idle": 0, "n_weight_loads_busy": 3}
