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
TTOK = 7e-5                                # teacher: 70 µs per scored token
SYNC = 0.01                                # learner step end -> worker's load done


def synthetic_run(tmp_path, placement="separate", steps=12, B=8):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ev, t = [], 0.0
    for i in range(400):                    # one worker's decode iterations, back to back
        n, p = int(rng.integers(1, 40)), int(rng.integers(0, 3)) * 7
        dur = D0 + DSEQ * (n - 1) + DPRE * p
        ev.append(Event(t=t, kind="decode_iter", worker=0, n_seqs=n, tokens=p, dur_s=dur))
        t += dur + OVERHEAD
    lengths = rng.integers(1, 30, size=200)
    for u, n in enumerate(lengths):
        ev.append(Event(t=0.001 * u, kind="rollout", worker=0, uid=u, tokens=int(n), dur_s=0.01))
    for c in range(40):                     # teacher calls on their own process (worker 0 of role teacher)
        tok = int(rng.integers(50, 400))
        ev.append(Event(t=0.02 * c, kind="teacher", n_seqs=tok // 20, tokens=tok, dur_s=TTOK * tok))
    t = 0.0
    for v in range(1, steps + 1):
        tok = int(rng.integers(50, 300))
        ev.append(Event(t=t, kind="learner_step", version=v, n_seqs=B, tokens=tok, dur_s=L0 + LTOK * tok))
        end = t + L0 + LTOK * tok
        ev.append(Event(t=end + SYNC - 0.002, kind="weight_sync", worker=0, version=v, dur_s=0.002))
        t = end + 0.05
    trace.write(ev, tmp_path / "trace.csv")
    (tmp_path / "run_info.json").write_text(json.dumps(
        {"placement": placement, "rollout_workers": 2, "batch_size": B, "engine_slots": 16, "eta": 1,
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
    assert costs.teacher_s_per_token == pytest.approx(TTOK, rel=1e-9)
    assert costs.weight_sync_s == pytest.approx(SYNC, rel=1e-6)
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
