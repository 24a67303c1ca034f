"""The toy backend's lockstep run: determinism, exact staleness, kill -9 and resume, divergence, validation."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from asyncopd.objective import ObjectiveConfig
from backends import checkpoint
from backends.run import RunConfig, run
from backends.session import WALL_CLOCK_COLUMNS
from backends.toy import ToyConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_symbols=4, max_len=4, teacher_layers=1, teacher_width=32, student_layers=1, student_width=16,
            head_dim=8, teacher_steps=40, student_warmup_steps=5, sft_batch_size=32, batch_size=8, eval_prompts=32,
            eval_every=2, ckpt_every=1, lr=3e-3, threads=1)


def tiny(model_cache, **kw):
    objective = kw.pop("objective", ObjectiveConfig("reverse_kl_sampled", signal="stale", correction="tis"))
    toy = ToyConfig(**{**TINY, "cache_dir": model_cache, **kw.pop("toy", {})})
    return RunConfig(toy=toy, objective=objective, **{"staleness": "fixed:2", "steps": 6, **kw})


def reproducible(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=list(WALL_CLOCK_COLUMNS), errors="ignore").reset_index(drop=True)


def test_same_seed_same_metrics_and_exact_staleness(model_cache, tmp_path):
    a = run(tiny(model_cache), tmp_path / "a")
    b = run(tiny(model_cache), tmp_path / "b")
    pd.testing.assert_frame_equal(reproducible(a), reproducible(b), check_exact=True)
    trained = a[a.step > 0]
    # batch trained at version v = step - 1 comes from weights max(0, v - k): staleness min(v, k), k = 2
    assert trained.staleness_max.tolist() == [0, 1, 2, 2, 2, 2]
    assert trained.staleness_mean.tolist() == [0, 1, 2, 2, 2, 2]
    assert a.accuracy.notna().tolist() == [True, False, True, False, True, False, True]
    c = run(tiny(model_cache, seed=1), tmp_path / "c")
    assert not reproducible(c).drop(columns="accuracy").equals(reproducible(a).drop(columns="accuracy"))


def test_trace_covers_every_rollout_and_step(model_cache, tmp_path):
    from asyncopd import trace
    run(tiny(model_cache, steps=3), tmp_path)
    df = trace.read(tmp_path / "trace.csv")
    counts = df.kind.value_counts().to_dict()
    assert counts["admit"] == counts["rollout"] == 3 * 8 and counts["learner_step"] == 3
    assert df[df.kind == "learner_step"].version.tolist() == [1, 2, 3]
    assert (tmp_path / "trace.json").stat().st_size > 0


def cli(out: Path, *overrides: str) -> list[str]:
    tiny_args = [f"toy.{k}={v}" for k, v in TINY.items()]
    return [sys.executable, "-m", "backends.run", "estimator=reverse_kl_stale_tis", "staleness=fixed:2",
            *tiny_args, f"hydra.run.dir={out}", *overrides]


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(model_cache, tmp_path):
    env = {**os.environ, "ASYNCOPD_CACHE": model_cache}
    whole = tmp_path / "whole"
    subprocess.run(cli(whole, "steps=12"), check=True, env=env, capture_output=True, cwd=ROOT)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(cli(cut, "steps=12"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:                       # kill once a mid-run checkpoint exists
        last = checkpoint.latest(cut / "checkpoint") if (cut / "checkpoint" / "latest").exists() else None
        if last is not None and 3 <= int(last.name.split("-")[1]) < 12:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoint.latest(cut / "checkpoint").name.split("-")[1])
    assert 3 <= killed_at < 12
    subprocess.run(cli(cut, "steps=12", "resume=true"), check=True, env=env, capture_output=True, cwd=ROOT)
    pd.testing.assert_frame_equal(reproducible(pd.read_csv(cut / "metrics.csv")),
                                  reproducible(pd.read_csv(whole / "metrics.csv")), check_exact=True)


def test_resume_in_process_continues_exactly(model_cache, tmp_path):
    whole = run(tiny(model_cache, steps=6), tmp_path / "whole")
    run(tiny(model_cache, steps=3), tmp_path / "cut")
    resumed = run(tiny(model_cache, steps=6, resume=True), tmp_path / "cut")
    # the 3-step run also evaluated at its end (step 3), which the 6-step run does not: mask that one cell
    assert resumed.accuracy.notna().sum() == whole.accuracy.notna().sum() + 1
    evals = ["accuracy", "eval_reverse_kl", "eval_forward_kl", "eval_response_len"]
    resumed.loc[whole.accuracy.isna(), evals] = float("nan")
    pd.testing.assert_frame_equal(reproducible(resumed), reproducible(whole), check_exact=True)
    with pytest.raises(ValueError, match="different config"):
        run(tiny(model_cache, steps=8, resume=True, seed=5), tmp_path / "cut")


def test_divergence_stops_with_message_and_keeps_last_checkpoint(model_cache, tmp_path, monkeypatch):
    from backends import toy_learner
    real_step = toy_learner.ToyLearner.step

    def step(self, batch, scores):
        if batch.version == 3:
            raise FloatingPointError("non-finite loss (nan)")
        return real_step(self, batch, scores)
    monkeypatch.setattr(toy_learner.ToyLearner, "step", step)
    with pytest.raises(RuntimeError, match="diverged at step 4"):
        run(tiny(model_cache), tmp_path)
    assert checkpoint.latest(tmp_path / "checkpoint").name == "ckpt-000003"
    assert pd.read_csv(tmp_path / "metrics.csv").step.max() == 3


@pytest.mark.parametrize("override, field", [
    ("objective.estimator=no_such_estimator", "estimator"), ("staleness=fixed:-1", "staleness"),
    ("steps=0", "steps"), ("toy.lr=0", "lr"), ("exec=async", "exec"), ("toy.batch_size=0", "batch_size"),
    ("toy.head_dim=0", "head_dim"), ("toy.head_dim=48", "toy.head_dim=48 must divide toy.teacher_width=128"),
    ("toy.head_dim=128", "toy.head_dim=128 must divide toy.student_width=64"),
    ("toy.student_warmup_horizon=10", "toy.student_warmup_horizon must be 0 or >= toy.student_warmup_steps, got 10"),
])
def test_invalid_settings_rejected_naming_field(override, field):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose("run", overrides=[override])
    from omegaconf import OmegaConf
    with pytest.raises(Exception, match=field):
        OmegaConf.to_object(dcfg)


def test_config_composes_with_estimator_preset():
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose("run", overrides=["estimator=reverse_kl_recompute_tis", "staleness=fixed:4", "steps=7"])
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, RunConfig) and cfg.steps == 7 and cfg.staleness == "fixed:4"
    assert (cfg.objective.estimator, cfg.objective.signal, cfg.objective.correction) == \
        ("reverse_kl_sampled", "recompute", "tis")


def test_cli_rejects_bad_value_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "backends.run", "steps=-3", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "steps must be >= 1" in out.stderr
    assert not (tmp_path / "metrics.csv").exists()


def test_tensorboard_logger_writes_scalars(model_cache, tmp_path):
    run(tiny(model_cache, steps=2, logger="tensorboard"), tmp_path)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_ctrl_c_stops_a_run_started_with_sigint_ignored(model_cache, tmp_path):
    """A run started from a script or a background job inherits an ignored SIGINT; the run restores Python's
    handler (and says so), so Ctrl-C / kill -INT still stop it instead of training to the end."""
    env = {**os.environ, "ASYNCOPD_CACHE": model_cache}
    proc = subprocess.Popen(cli(tmp_path, "steps=100000"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "checkpoint" / "latest").exists():
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)                     # reads while it waits: a full pipe cannot block it
    assert proc.returncode != 0 and "SIGINT was ignored" in out


def test_a_lost_sigterm_still_ends_the_run_at_the_next_step(model_cache, tmp_path):
    """The SIGTERM handler's SystemExit can be lost (raised inside a finalizer it is printed and ignored); the
    stop request it also records ends the run at its next recorded step with exit code 143, not at its last."""
    from backends.session import request_stop
    request_stop(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exc:
            run(tiny(model_cache, steps=6), tmp_path)
    finally:
        request_stop(None)
    assert exc.value.code == 143
    assert run(tiny(model_cache, steps=2), tmp_path / "after").step.tolist() == [0, 1, 2]   # cleared: runs on
