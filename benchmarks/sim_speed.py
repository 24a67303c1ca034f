"""Simulator speed: 1,024 rollout replicas and ~100,000 trajectories on one CPU core (target ≤ 10 s).

The model advances a replica analytically between changes of its batch (sim/model.py), so the cost is a few
SimPy events per trajectory, not one per decoded token. The workload: B = 1,024 trajectories per step for 98
steps (100,352 trained), lognormal lengths (mean 512, σ 0.8, max 4,096), 64 teacher replicas, η = 2, in drop
and wait mode. Baseline measured in the same run, so the ratio survives a noisy machine: SimPy's own rate for
a bare chain of timeouts (one process, `yield env.timeout(1)` in a loop), i.e. how many events/s the
simulator's engine can do at all. `ratio` = our trace events/s ÷ bare SimPy events/s.

    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py        # writes benchmarks/results/sim_speed.csv
    python benchmarks/sim_speed.py --replicas 128 --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import simpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asyncopd.scheduler import SchedulerConfig  # noqa: E402
from sim.costs import ClusterShape, CostModel, LengthDist, Workload  # noqa: E402
from sim.model import simulate  # noqa: E402


def bare_simpy_events_per_s(n: int = 300_000) -> float:
    def ticker(env):
        for _ in range(n):
            yield env.timeout(1)
    env = simpy.Environment()
    env.process(ticker(env))
    t0 = time.perf_counter()
    env.run()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=1024)
    ap.add_argument("--teachers", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=98)
    ap.add_argument("--eta", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_speed.csv"))
    args = ap.parse_args()

    costs = CostModel(decode_step_s=0.006, decode_step_s_per_seq=5.5e-5, prefill_s_per_token=1e-5, max_batch=64,
                      teacher_s_per_token=1.2e-5, learner_s_per_token=1e-7, learner_step_s=1.0, weight_sync_s=1.5)
    workload = Workload(batch_size=args.batch_size, prompt_len=256, length=LengthDist("lognormal", 512, 0.8, 4096))
    cluster = ClusterShape(args.replicas, args.teachers)
    rows = []
    for r in range(args.repeats):
        bare = bare_simpy_events_per_s()
        for mode in ("drop", "wait"):
            t0 = time.perf_counter()
            _, s = simulate(cluster, costs, workload, SchedulerConfig(max_staleness=args.eta, on_stale=mode),
                            args.steps)
            wall = time.perf_counter() - t0
            rows.append({"on_stale": mode, "repeat": r, "replicas": args.replicas, "trained": args.steps *
                         args.batch_size, "admitted": args.steps * args.batch_size + s["n_dropped"],
                         "events": s["n_events"], "wall_s": wall, "events_per_s": s["n_events"] / wall,
                         "bare_simpy_events_per_s": bare, "ratio": s["n_events"] / wall / bare,
                         "sim_seconds_per_wall_s": s["duration_s"] / wall})
            print(f"{mode} repeat {r}: {wall:.2f} s, {s['n_events'] / wall:,.0f} events/s", flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    med = df.groupby("on_stale").median(numeric_only=True).reset_index()
    print(med[["on_stale", "replicas", "trained", "admitted", "events", "wall_s", "events_per_s",
               "bare_simpy_events_per_s", "ratio"]].to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
    print(f"target: wall_s <= 10 s -> {'met' if np.all(med.wall_s <= 10) else 'NOT met'}; -> {args.out}")


if __name__ == "__main__":
    main()
