"""sim.calibrate: a hand-built trace with known linear costs is fitted back exactly; bad input names the problem."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from asyncopd import trace
from asyncopd.trace import Event
from sim.calibrate import CalibrateConfig, calibrate, load_run, moved, poor_fits
from sim.specs import Specs, costs_from_specs

D0, DSEQ, DPRE = 2e-3, 3e-5, 1e-5          # decode: 2 ms + 30 µs per extra sequence + 10 µs per prefilled token
OVERHEAD = 1e-4                            # loop overhead between decode iterations
L0, LTOK = 0.02, 5e-5                      # learner: 20 ms + 50 µs per token
TCALL, TSEQ, TTOK = 3e-3, 2e-4, 7e-5      # teacher: 3 ms per call + 0.2 ms per sequence + 70 µs per token
SYNC = 0.01                                # learner step end -> worker's load done
PUBLISH = 0.004                            # learner step end -> its next admission


def synthetic_run(tmp_path, placement="separate", steps=12, B=8, learner_noise_s=0.0, ttok=TTOK):
    """A trace with known costs; learner_noise_s adds uniform noise to the learner steps (a poor fit), ttok sets
    the teacher's per-token cost."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng, noise = np.random.default_rng(0), np.random.default_rng(1)
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
        ev.append(Event(t=0.02 * c, kind="teacher", n_seqs=n, tokens=tok, dur_s=TCALL + TSEQ * n + ttok * tok))
    t = 0.0
    for v in range(1, steps + 1):
        tok = int(rng.integers(50, 300))
        dur = L0 + LTOK * tok + learner_noise_s * noise.uniform()
        ev.append(Event(t=t, kind="learner_step", version=v, n_seqs=B, tokens=tok, dur_s=dur))
        end = t + dur
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


def cli(run_dir, out, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim.calibrate", f"trace={run_dir}", f"hydra.run.dir={out}",
                           *overrides], capture_output=True, text=True)


def test_run_info_is_checked(tmp_path):
    synthetic_run(tmp_path)
    info_file = tmp_path / "run_info.json"
    info = json.loads(info_file.read_text())
    cases = [
        ({k: v for k, v in info.items() if k != "staleness"} | {"eta": 1},
         "missing keys ['staleness'] that calibration reads (it has 'eta': the knob is now 'staleness', e.g. \"1\")"),
        ({**info, "placement": "colocate"}, "placement must be one of ('separate', 'colocate_teacher_with_rollout'), "
                                            "got 'colocate'"),
        ({**info, "batch_size": "8"}, "batch_size must be an int >= 1, got '8'"),
        ({**info, "staleness": "one"}, "staleness spec must be 'fixed:<k>' or an integer η, got 'one'"),
    ]
    for doc, message in cases:
        info_file.write_text(json.dumps(doc))
        with pytest.raises(ValueError) as e:
            load_run(tmp_path)
        assert str(e.value) == f"{info_file}: {message}"
    info_file.write_text('{"placement": "separate", "rollout_')
    with pytest.raises(ValueError, match=f"^{info_file}: not valid JSON \\(Unterminated string"):
        load_run(tmp_path)
    info_file.unlink()
    with pytest.raises(ValueError) as e:
        load_run(tmp_path)
    assert str(e.value).startswith(f"{info_file}: no such file; calibration needs")


def test_trace_is_checked_for_what_the_fits_need(tmp_path):
    synthetic_run(tmp_path)
    trace_file = tmp_path / "trace.csv"
    full = trace.read(trace_file)
    cases = [
        (full.iloc[:0], "the trace has no events"),
        (full[~full.kind.isin(["teacher", "rollout"])], "no teacher, rollout events; calibration fits from "
         "decode_iter, teacher, learner_step, rollout (the trace of a python -m backends.run exec=concurrent run has "
         "them all)"),
        (full[(full.kind != "teacher") | (full.t < 0.07)], "4 teacher events after the warmup (0 learner steps); the "
         "teacher fit has 3 unknowns and needs at least 5: calibrate on a longer run"),
        (full[(full.kind != "learner_step") | (full.version <= 3)], "the trace has 3 learner steps; calibration needs "
         "at least warmup_steps + 4 = 4: run more steps"),
    ]
    for df, message in cases:
        trace.write(df, trace_file)
        with pytest.raises(ValueError) as e:
            calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=0))
        assert str(e.value) == f"{trace_file}: {message}"
    header, first, rest = trace_file.read_text().split("\n", 2)
    trace_file.write_text("\n".join([header, "zero," + first.split(",", 1)[1], rest]))   # corrupted: read's message
    p = cli(tmp_path, tmp_path / "cal")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"sim.calibrate: {trace_file}: column 't' must hold finite numbers; row 0 (line 2) has 'zero'"


def test_poor_fits_are_refused_or_written_with_a_warning(tmp_path, caplog):
    synthetic_run(tmp_path, learner_noise_s=0.2)
    trace_file = tmp_path / "trace.csv"
    *_, diag = calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=0, on_poor_fit="warn"))
    r2 = diag["r2_learner"]
    assert r2 < 0.5 and diag["r2_decode"] == pytest.approx(1) and diag["r2_teacher"] == pytest.approx(1)
    assert diag["poor_fits"][0] == f"the learner fit has R² {r2:.2f} < min_r2 0.5 over 12 learner_step events"
    assert "!!!" in caplog.text and "on_poor_fit=warn" in caplog.text
    message = (f"{trace_file}: poor calibration fits (R² decode 1.00, teacher 1.00, learner {r2:.2f}): "
               f"{'; '.join(diag['poor_fits'])}. Calibrate on a longer run (more steps: more events, less noise), or "
               f"pass on_poor_fit=warn to write the YAML anyway (or lower min_r2=0.5)")
    with pytest.raises(ValueError) as e:
        calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=0))
    assert str(e.value) == message
    calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=0, min_r2=0.0))     # accepted below the bar...
    p = cli(tmp_path, tmp_path / "cal", "warmup_steps=0")
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.strip() == f"sim.calibrate: {message}"
    assert not (tmp_path / "cal" / "cluster").exists()
    p = cli(tmp_path, tmp_path / "cal", "warmup_steps=0", "on_poor_fit=warn")      # ...or written, loudly
    assert p.returncode == 0, p.stderr
    assert "(R² 1.00), learner" in p.stdout and "WARNING: poor fits" in p.stdout
    assert "# WARNING, poor fit (on_poor_fit=warn): the learner fit" in (tmp_path / "cal" / "cluster" /
                                                                          "calibrated.yaml").read_text()
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["poor_fits"] == diag["poor_fits"]


def test_a_needed_cost_fitted_as_zero_is_refused(tmp_path):
    synthetic_run(tmp_path, ttok=0.0)                    # the teacher's time does not grow with tokens: R² 1, cost 0
    with pytest.raises(ValueError) as e:
        calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=0))
    assert str(e.value).startswith(f"{tmp_path / 'trace.csv'}: poor calibration fits (R² decode 1.00, teacher 1.00, "
                                   f"learner 1.00): the teacher fit (R² 1.00) gives teacher_s_per_token = 0, which the "
                                   f"model needs > 0. Calibrate on a longer run")
    assert poor_fits({"decode": 0.9, "teacher": 0.4, "learner": 1.0}, {"decode": 1e-3, "teacher": 0.0, "learner": 1e-4},
                     {"decode": 9, "teacher": 8, "learner": 7}, 0.5) == [
        "the teacher fit has R² 0.40 < min_r2 0.5 over 8 teacher events",
        "the teacher fit (R² 0.40) gives teacher_s_per_token = 0, which the model needs > 0"]
    with pytest.raises(ValueError, match="on_poor_fit must be one of"):
        CalibrateConfig(on_poor_fit="ignore")
    with pytest.raises(ValueError, match=r"min_r2 must be in \[0, 1\]"):
        CalibrateConfig(min_r2=1.5)


def test_the_gap_before_a_prefilling_iteration_joins_the_prefill_rate(tmp_path):
    """Taking new requests in happens between iterations (vLLM's add_request: ~0.1 ms each on a CPU); the gap before
    an iteration that prefills, beyond the loop overhead, is charged to prefill_s_per_token (the model's cost of a
    sequence joining a replica). Iterations that prefill nothing keep the plain overhead."""
    admit_per_token = 2e-5
    synthetic_run(tmp_path)
    df = trace.read(tmp_path / "trace.csv")
    dec = df[(df.kind == "decode_iter") & (df.worker == 1)].sort_values("t")
    first = dec.index[0]                          # no gap before it in the trace: it prefills nothing here
    df.loc[first, "dur_s"] -= DPRE * df.loc[first, "tokens"]
    df.loc[first, "tokens"] = 0
    dec = df.loc[dec.index]
    t, starts = 0.0, []
    for dur, p in zip(dec.dur_s, dec.tokens):
        t += admit_per_token * p                  # the worker queues the new requests, then steps
        starts.append(t)
        t += dur + OVERHEAD
    df.loc[dec.index, "t"] = starts
    trace.write(df, tmp_path / "trace.csv")
    _, costs, _, diag = calibrate(*load_run(tmp_path), CalibrateConfig(warmup_steps=0))
    assert costs.prefill_s_per_token == pytest.approx(DPRE + admit_per_token, rel=1e-6)
    assert costs.decode_step_s == pytest.approx(D0 + OVERHEAD, rel=1e-6) and diag["r2_decode"] == pytest.approx(1)
    assert diag["admission_s_per_step"] > 0


def test_moved_compares_the_fit_with_a_typed_or_derived_prior(tmp_path):
    synthetic_run(tmp_path / "run")
    cluster, costs, workload, _ = calibrate(*load_run(tmp_path / "run"), CalibrateConfig(warmup_steps=0))
    typed = tmp_path / "typed.yaml"
    typed.write_text("cluster: {rollout_replicas: 2}\ncosts: {decode_step_s: 0.5, learner_s_per_token: 0.0}\n")
    t = moved(str(typed), cluster, costs, workload).set_index("cost")
    assert t.loc["decode_step_s", "prior"] == 0.5 and t.loc["decode_step_s", "fitted"] == costs.decode_step_s
    assert t.loc["decode_step_s", "ratio"] == pytest.approx(costs.decode_step_s / 0.5)
    assert math.isnan(t.loc["learner_s_per_token", "ratio"])             # a prior of 0 has no ratio
    derived = tmp_path / "specs.yaml"
    derived.write_text("specs: {gpu: h100-sxm, student: qwen3-1.7b, teacher: qwen3-30b-a3b}\n")
    t = moved(str(derived), cluster, costs, workload).set_index("cost")
    want = costs_from_specs(Specs("h100-sxm", "qwen3-1.7b", "qwen3-30b-a3b"), cluster, workload)
    assert t.loc["publish_s", "prior"] == want.publish_s and t.loc["max_batch", "fitted"] == costs.max_batch
