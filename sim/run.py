"""`python -m sim.run`: simulate one cluster shape and write what a measured run would write.

    python -m sim.run cluster=h100x8_qwen3_1p7b_30b workload=math_1p7b scheduler.max_staleness=2 steps=200
    python -m sim.run --multirun scheduler.max_staleness=0,1,2,4 cluster.rollout_replicas=4,6
    python -m sim.run ... schedule=true      # also write schedule.json, replayable by the toy backend:
    python -m backends.run staleness=schedule:<dir>/schedule.json ...

`cluster=<file>` picks conf/cluster/<file>.yaml (the `cluster` node and either typed `costs` or `specs`: a GPU
type and two models from which sim/specs.py derives every cost, e.g. `cluster=from_specs specs.gpu=h100-sxm
specs.student=qwen3-8b specs.teacher=qwen3-235b-a22b cluster.gpus_per_teacher_replica=8`; a `costs.*` set on the
command line then overrides its derived value), `workload=<file>` picks
conf/workload/<file>.yaml; any field overrides as `costs.decode_step_s=0.01`, `workload.length.dist=fixed`, ...
A calibrated cost file (`python -m sim.calibrate`) is used with `--config-dir <its folder> cluster=calibrated`.

Outputs in hydra.run.dir: trace.csv + trace.json (Perfetto) in the schema of asyncopd.trace, staleness_hist.csv
(staleness of every trained trajectory), summary.json (samples_per_s, tokens_per_s, staleness_mean/max, the
staleness split staleness_in_flight_mean / staleness_in_queue_mean, util_rollout/teacher/learner,
in_flight_mean, latency_mean_s, n_events, what the staleness policy did to the data: len_generated_mean,
len_trained_mean, length_w1, length_bias, drop_rate, wasted_token_frac, staleness_by_length
(asyncopd.data_skew), ...), and with schedule=true the scheduler's operation log (schedule.json); every file
is written atomically. Prints one line of the main figures. Invalid shapes, costs or workloads raise ValueError
naming the field, so the command exits non-zero.

trace.csv keeps every event (it is the data `sim.calibrate` and the studies read). trace.json is for a viewer and
keeps at most `trace_json_max_events` events (default 30,000; 0 = no trace.json). Past that it holds whole worker
timelines: every learner step and weight sync (whenever the bound covers them), and an evenly spread share of
each role's workers (`asyncopd.trace.perfetto_subset`); its otherData says so (sampled, events_total,
events_written, kept_workers, workers_total). A 200-step run on 1,024 replicas has ~400k events: 60 MB of JSON
unbounded, 4.6 MB at 30,000.

A --multirun also writes summary.csv in hydra.sweep.dir: a row per job with its job number, its overrides
(one column per key) and the scalar figures of its summary.json (sim/sweep.py, a Hydra callback that conf/sim.yaml
registers; it prints the table when the sweep is over). Each job's own files stay in hydra.sweep.dir/<job num>/.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd import trace
from asyncopd.files import atomic_write
from asyncopd.scheduler import SchedulerConfig
from sim.costs import ClusterShape, CostModel, Workload
from sim.model import simulate
from sim.specs import Specs, costs_for, learner_state_fits

log = logging.getLogger(__name__)


@dataclass
class SimConfig:
    cluster: ClusterShape = field(default_factory=ClusterShape)
    costs: CostModel = field(default_factory=CostModel)
    workload: Workload = field(default_factory=Workload)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # batch_size follows workload.batch_size
    steps: int = 200                     # learner steps to simulate, >= 1
    seed: int = 0                        # response lengths, >= 0
    schedule: bool = False               # also write schedule.json (the scheduler's op log) for a toy replay
    trace_json_max_events: int = 30_000  # trace.json's bound, >= 0 (whole worker timelines past it); 0 = none
    specs: Specs = field(default_factory=Specs)   # specs.gpu set: costs derived from the hardware and models

    def __post_init__(self):
        if self.specs.enabled:                         # before the checks below, which read the costs
            self.costs = costs_for(self.specs, self.cluster, self.workload, self.costs)
            if not learner_state_fits(self.specs, self.cluster.learner_gpus):
                raise ValueError(f"cluster.learner_gpus={self.cluster.learner_gpus} cannot hold {self.specs.student}'s "
                                 f"training state (16 bytes per parameter on {self.specs.gpu}): raise it")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.trace_json_max_events, int) or self.trace_json_max_events < 0:
            raise ValueError(f"trace_json_max_events must be an int >= 0 (0 = no trace.json), got "
                             f"{self.trace_json_max_events!r}")
        B = self.workload.batch_size
        if self.scheduler.batch_size != B:
            raise ValueError(f"scheduler.batch_size={self.scheduler.batch_size} must equal workload.batch_size={B} "
                             f"(leave scheduler.batch_size unset: it follows the workload)")
        capacity = self.cluster.rollout_replicas * self.costs.max_batch
        if B > capacity:
            raise ValueError(f"workload.batch_size={B} is larger than the in-flight capacity cluster.rollout_replicas "
                             f"× costs.max_batch = {self.cluster.rollout_replicas} × {self.costs.max_batch} = "
                             f"{capacity}: one batch could never be generated at once; raise rollout_replicas or "
                             f"max_batch, or lower batch_size")


ConfigStore.instance().store(name="sim_schema", node=SimConfig)


def write_schedule(path: Path, sched_cfg: SchedulerConfig, ops: list[tuple[str, int]], summary: dict) -> None:
    """The scheduler's operation log with the config that produced it; `backends.replay` replays it."""
    doc = {"scheduler": asdict(sched_cfg), "steps": sum(op == "step" for op, _ in ops),
           "staleness_hist": summary["staleness_hist"], "ops": [[op, int(a)] for op, a in ops]}
    atomic_write(path, json.dumps(doc))


def run(cfg: SimConfig, out_dir: Path) -> dict:
    """Simulate, write the outputs into out_dir, return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ops: list | None = [] if cfg.schedule else None
    events, summary = simulate(cfg.cluster, cfg.costs, cfg.workload, cfg.scheduler, cfg.steps, cfg.seed, ops_out=ops)
    frame = trace.to_frame(events)                     # once for both files
    trace.write(frame, out_dir / "trace.csv")
    if cfg.trace_json_max_events > 0:
        trace.to_perfetto(frame, out_dir / "trace.json", max_events=cfg.trace_json_max_events)
    else:
        (out_dir / "trace.json").unlink(missing_ok=True)   # a reused folder: no trace.json of another run
    hist = trace.staleness_hist(summary["staleness_hist"])
    atomic_write(out_dir / "staleness_hist.csv", lambda tmp: hist.to_csv(tmp, index=False))
    if ops is not None:
        write_schedule(out_dir / "schedule.json", cfg.scheduler, ops, summary)
    atomic_write(out_dir / "summary.json", json.dumps(
        {**summary, "config": OmegaConf.to_container(OmegaConf.structured(cfg))}, indent=1))
    return summary


def one_line(s: dict) -> str:
    return (f"{s['samples_per_s']:.3g} samples/s, {s['tokens_per_s']:.3g} tok/s, staleness mean "
            f"{s['staleness_mean']:.2f} max {s['staleness_max']}, util rollout {s['util_rollout']:.0%} teacher "
            f"{s['util_teacher']:.0%} learner {s['util_learner']:.0%}, latency {s['latency_mean_s']:.3g} s, "
            f"dropped {s['n_dropped']}, {s['n_events']} events")


@hydra.main(version_base="1.3", config_path="../conf", config_name="sim")
def main(dcfg: DictConfig) -> None:
    cfg: SimConfig = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run(cfg, out_dir)
    print(f"{one_line(summary)} -> {out_dir}")


if __name__ == "__main__":
    main()
