"""Async speedup: the concurrent toy run at η = 0 (synchronous) vs η = 1, 2, 4, measured side by side.

Same config for every η (default toy models, the long-tail sort workload: list length L ~ L^-1.3 on 1..24, so a
batch's longest answer is several times its mean), `exec=concurrent`, one rollout worker, a teacher and the
learner, one torch thread per role. Each η is a separate run in this invocation; throughput is measured from
the trace over the steady window: from the end of learner step `--warmup` to the end of the last step
(samples/s = B · steps in window / window). Where the time goes: busy fraction of each role in that window
(sum of its span durations / window; rollout = the engine's decode iterations, teacher = scoring calls,
learner = optimiser steps, sync = weight loads in the worker), plus the learner's idle fraction.

Deliberately left out: held-out evaluation (only at the start and end, outside the window) and checkpoints
(only at the end). With `--repeats > 1` the η order rotates and the table reports medians.

    python benchmarks/async_speedup.py                      # writes benchmarks/results/async_speedup.csv
    python benchmarks/async_speedup.py --steps 6 --etas 0,1 --placement colocate_teacher_with_rollout
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asyncopd import trace  # noqa: E402
from asyncopd.objective import ObjectiveConfig  # noqa: E402
from backends.run import RunConfig, run  # noqa: E402
from backends.toy import ToyConfig  # noqa: E402
from backends.toy_concurrent import ConcurrentConfig  # noqa: E402


def measure(df: pd.DataFrame, metrics: pd.DataFrame, B: int, warmup: int) -> dict:
    steps = df[df.kind == "learner_step"].sort_values("version")
    ends = (steps.t + steps.dur_s).to_numpy()
    t0, t1 = ends[warmup - 1], ends[-1]
    n = len(ends) - warmup
    win = df[(df.t >= t0) & (df.t < t1)]
    busy = {f"busy_{role}": win[win.kind == kind].dur_s.sum() / (t1 - t0)
            for role, kind in (("rollout", "decode_iter"), ("teacher", "teacher"), ("learner", "learner_step"),
                               ("sync", "weight_sync"))}
    trained = metrics[metrics.step > warmup]
    return {"samples_per_s": B * n / (t1 - t0), "step_s": (t1 - t0) / n,
            "staleness_mean": trained.staleness_mean.mean(), "staleness_max": int(trained.staleness_max.max()),
            "n_dropped": int(metrics.n_dropped.fillna(0).sum()), **busy, "learner_idle": 1 - busy["busy_learner"],
            "decode_seqs_mean": win[win.kind == "decode_iter"].n_seqs.mean()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--etas", default="0,1,2,4")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="learner steps excluded from the window")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rollout-workers", type=int, default=1)
    ap.add_argument("--placement", default="separate")
    ap.add_argument("--weight-update", default="in_flight")
    ap.add_argument("--on-stale", default="drop")
    ap.add_argument("--threads-per-role", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "async_speedup.csv"))
    args = ap.parse_args()
    etas = [int(e) for e in args.etas.split(",")]
    rows = []
    for r in range(args.repeats):
        for eta in etas[r % len(etas):] + etas[:r % len(etas)]:
            cfg = RunConfig(exec="concurrent", staleness=str(eta), steps=args.steps,
                            toy=ToyConfig(batch_size=args.batch_size, eval_every=10 ** 6, eval_prompts=64,
                                          ckpt_every=10 ** 6),
                            objective=ObjectiveConfig("reverse_kl_sampled", signal="stale", correction="tis"),
                            concurrent=ConcurrentConfig(rollout_workers=args.rollout_workers, placement=args.placement,
                                                        weight_update=args.weight_update, on_stale=args.on_stale,
                                                        threads_per_role=args.threads_per_role))
            with tempfile.TemporaryDirectory() as tmp:
                metrics = run(cfg, Path(tmp))
                row = measure(trace.read(Path(tmp) / "trace.csv"), metrics, args.batch_size, args.warmup)
            rows.append({"eta": eta, "repeat": r, **row})
            print(f"eta={eta} repeat={r}: {row['samples_per_s']:.1f} samples/s", flush=True)
    df = pd.DataFrame(rows).groupby("eta", as_index=False).median(numeric_only=True).drop(columns="repeat")
    sync = df.loc[df.eta == 0, "samples_per_s"]
    df.insert(2, "speedup_vs_sync", df.samples_per_s / sync.iloc[0] if len(sync) else np.nan)
    for k, v in (("placement", args.placement), ("weight_update", args.weight_update), ("on_stale", args.on_stale), ("batch_size", args.batch_size),
                 ("steps", args.steps), ("rollout_workers", args.rollout_workers),
                 ("threads_per_role", args.threads_per_role)):
        df[k] = v
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    cols = ["eta", "samples_per_s", "speedup_vs_sync", "staleness_mean", "staleness_max", "n_dropped", "step_s"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\nwhere the time goes (fraction of the steady window each role is busy):")
    print(df[["eta", "busy_rollout", "busy_teacher", "busy_learner", "busy_sync", "learner_idle",
              "decode_seqs_mean"]].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
