"""`python -m sim.calibrate trace=<run dir or trace.csv>`: fit the simulator's cost model to a measured run.

The one idea: every cost in sim.costs.CostModel is a linear form, so a measured trace (the concurrent toy run;
the same schema as any backend) fits it by non-negative least squares (scipy.optimize.nnls):

    decode iteration   dur  = decode_step_s + decode_step_s_per_seq·(n − 1) + prefill_s_per_token·p
                       over `decode_iter` events (n sequences decoded, p prompt tokens prefilled), plus the
                       worker's loop overhead: the median gap between one iteration's end and the next one's start
                       (only gaps with nothing else in between and shorter than `idle_gap_s`: longer ones are idle)
    learner step       dur  = learner_step_s + learner_s_per_token·tokens        over `learner_step` events;
                       publish_s = median time from a step's end to the learner's next admission (it hands its
                       weights out and books the step in between, and cannot train meanwhile)
    teacher call       dur  = teacher_call_s + teacher_s_per_seq·n + teacher_s_per_token·tokens   over `teacher`
                       events. Colocated scoring also pays for handing the scored batch over: the median gap after
                       a `teacher` span (shorter than idle_gap_s), less the loop overhead, joins teacher_call_s. A
                       separate toy teacher batches up to B per call (teacher_max_batch = B).
    weight sync        weight_sync_s = median time from the end of learner step v to the end of a worker's load
                       of version v (`weight_sync` events: publishing, transfer, pickup and loading), over the loads
                       of workers that were idle, waiting, when the step ended (see weight_sync_delay). In the
                       model the replicas start no request of version v before then; the learner does not wait.
The workload comes from the trace too: response lengths as an empirical distribution (`rollout` events), the
mean prompt length (scored tokens minus response tokens per sequence), B; the cluster from run_info.json
(rollout workers, placement; a colocated teacher scores in groups of B // 4 as the toy worker does).

Writes into hydra.run.dir: cluster/calibrated.yaml (`cluster` + `costs`), workload/calibrated.yaml, and
calibration.json (the fits, their R², the scheduler settings of the measured run). Use them with

    python -m sim.run --config-dir <that dir> cluster=calibrated workload=calibrated scheduler.max_staleness=<η>
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from scipy.optimize import nnls

from asyncopd import trace as trace_io
from asyncopd.scheduler import SchedulerConfig
from sim.costs import ClusterShape, CostModel, LengthDist, Workload

log = logging.getLogger(__name__)
PLACEMENT = {"separate": "separate", "colocate_teacher_with_rollout": "teacher_with_rollout"}


@dataclass
class CalibrateConfig:
    trace: str = "???"                   # a run directory (trace.csv + run_info.json) or a trace.csv inside one
    warmup_steps: int = 2                # ignore events before the end of this learner step (start-up), >= 0
    idle_gap_s: float = 0.004            # a gap between decode iterations longer than this is idle, not overhead

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.idle_gap_s > 0:
            raise ValueError(f"idle_gap_s must be > 0, got {self.idle_gap_s}")


ConfigStore.instance().store(name="calibrate_schema", node=CalibrateConfig)


def fit(y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative least squares y ≈ X·β, β ≥ 0; returns (β, R²)."""
    beta, _ = nnls(X, y)
    resid = y - X @ beta
    ss = ((y - y.mean()) ** 2).sum()
    return beta, float(1 - (resid ** 2).sum() / ss) if ss > 0 else 1.0


def load_run(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """(trace frame, run_info) from a run directory or its trace.csv."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    trace_file = p if p.is_file() else p / "trace.csv"
    if not trace_file.exists():
        raise ValueError(f"trace={path}: no trace.csv there (a run directory of python -m backends.run exec=concurrent)")
    info_file = run_dir / "run_info.json"
    if not info_file.exists():
        raise ValueError(f"trace={path}: no run_info.json beside the trace; calibration needs the run's placement, "
                         f"workers and batch size (written by exec=concurrent runs)")
    return trace_io.read(trace_file), json.loads(info_file.read_text())


def calibrate(df: pd.DataFrame, info: dict, cfg: CalibrateConfig) -> tuple[ClusterShape, CostModel, Workload, dict]:
    """Fit (cluster, costs, workload) to a measured trace; the dict holds the fit diagnostics."""
    steps = df[df.kind == "learner_step"].sort_values("t")
    if len(steps) < cfg.warmup_steps + 3:
        raise ValueError(f"the trace has {len(steps)} learner steps; calibration needs at least warmup_steps + 3 = "
                         f"{cfg.warmup_steps + 3}")
    t_start = float((steps.t + steps.dur_s).iloc[cfg.warmup_steps - 1]) if cfg.warmup_steps else 0.0
    df = df[df.t >= t_start]
    steps = steps[steps.t >= t_start]
    colocated = info["placement"] == "colocate_teacher_with_rollout"
    B = int(info["batch_size"])

    # decode iterations: the step-time form by NNLS, then the loop overhead between iterations
    it = df[df.kind == "decode_iter"]
    X = np.column_stack([np.ones(len(it)), it.n_seqs - 1, it.tokens])
    (d0, d_seq, d_pre), r2_decode = fit(it.dur_s.to_numpy(), X)
    calls = df[(df.kind == "decode_iter") | ((df.kind == "teacher") & colocated)]      # each worker's own calls
    overheads, handovers = [], []
    for w, ev in pd.concat([calls, df[df.kind == "weight_sync"]]).groupby("worker"):
        ev = ev.sort_values("t")
        kinds, t, end = ev.kind.to_numpy(), ev.t.to_numpy(), (ev.t + ev.dur_s).to_numpy()
        for k in range(len(ev) - 1):
            gap = t[k + 1] - end[k]
            if kinds[k] == "decode_iter" and kinds[k + 1] == "decode_iter" and gap < cfg.idle_gap_s:
                overheads.append(gap)
            elif kinds[k] == "teacher" and gap < cfg.idle_gap_s:
                handovers.append(gap)
    overhead = float(np.median(overheads)) if overheads else 0.0

    # teacher: call + per sequence + per token by NNLS; colocated, each call also hands its batch over
    te = df[df.kind == "teacher"]
    (t_call, t_seq, t_tok), r2_teacher = fit(te.dur_s.to_numpy(),
                                             np.column_stack([np.ones(len(te)), te.n_seqs, te.tokens]))
    handover = max(0.0, float(np.median(handovers)) - overhead) if handovers else 0.0

    # learner: the step by NNLS, then what it does per step before admitting again (publishing its weights)
    (l0, l_tok), r2_learner = fit(steps.dur_s.to_numpy(), np.column_stack([np.ones(len(steps)), steps.tokens]))
    admits = np.sort(df[df.kind == "admit"].t.to_numpy())
    ends = (steps.t + steps.dur_s).to_numpy()
    k = np.searchsorted(admits, ends)
    publish_s = float(np.median(admits[k[k < len(admits)]] - ends[k < len(admits)])) if len(admits) else 0.0
    ws = df[df.kind == "weight_sync"]
    step_end = dict(zip(steps.version, steps.t + steps.dur_s))
    weight_sync_s, sync_diag = weight_sync_delay(calls, ws, step_end, publish_s)

    # workload
    ro = df[df.kind == "rollout"]
    lengths = ro.tokens.astype(int).tolist()
    prompt_len = max(0, round(te.tokens.sum() / max(1, te.n_seqs.sum()) - np.mean(lengths)))
    workers = int(info["rollout_workers"])
    cluster = ClusterShape(rollout_replicas=workers, teacher_replicas=0 if colocated else 1,
                           placement=PLACEMENT[info["placement"]], score_group=max(1, B // 4))
    costs = CostModel(decode_step_s=float(d0 + overhead), decode_step_s_per_seq=float(d_seq),
                      prefill_s_per_token=float(d_pre), max_batch=int(info["engine_slots"]),
                      teacher_s_per_token=float(t_tok), teacher_s_per_seq=float(t_seq),
                      teacher_call_s=float(t_call) + handover, teacher_max_batch=B,
                      learner_s_per_token=float(l_tok), learner_step_s=float(l0), publish_s=publish_s,
                      weight_sync_s=weight_sync_s)
    workload = Workload(batch_size=B, prompt_len=prompt_len,
                        length=LengthDist("empirical", mean=float(np.mean(lengths)), max=int(max(lengths)),
                                          values=lengths))
    diag = {"r2_decode": r2_decode, "r2_teacher": r2_teacher, "r2_learner": r2_learner,
            "decode_loop_overhead_s": overhead, "teacher_handover_s": handover,
            "n_decode_iters": len(it), "n_overhead_gaps": len(overheads), "n_teacher_calls": len(te),
            "n_learner_steps": len(steps), "n_rollouts": len(ro), **sync_diag,
            "measured": {"eta": SchedulerConfig.parse(info["staleness"]).max_staleness, "on_stale": info["on_stale"],
                         "batch_size": B}}
    return cluster, costs, workload, diag


def weight_sync_delay(calls: pd.DataFrame, ws: pd.DataFrame, step_end: dict, publish_s: float,
                      min_idle: int = 5) -> tuple[float, dict]:
    """Seconds from a learner step's end until a *waiting* worker can use the new weights. A worker busy with a
    decode iteration or a teacher call when the step ends picks the weights up only after it; the model already
    has that wait (a replica admits between its own segments), so counting it here would count it twice. Hence the
    median over loads whose worker was idle when the step ended. With fewer than `min_idle` of those (a worker
    that is always busy), publish_s plus the median time from the end of the worker's busy call to its load's end
    (the learner hands the weights out, the worker picks them up and loads them). `calls`: the workers' own
    decode iterations and (colocated) teacher calls."""
    idle, after_busy = [], []
    for w, loads in ws.groupby("worker"):
        b = calls[calls.worker == w].sort_values("t")
        b_start, b_end = b.t.to_numpy(), (b.t + b.dur_s).to_numpy()
        for v, t, d in zip(loads.version, loads.t, loads.dur_s):
            if v not in step_end:
                continue
            k = np.searchsorted(b_start, t) - 1           # the worker's last call before this load
            prev_end = b_end[k] if k >= 0 else -np.inf
            (idle if prev_end <= step_end[v] else after_busy).append(t + d - max(step_end[v], prev_end))
    if len(idle) >= min_idle or not after_busy:
        delay = np.median(idle) if idle else 0.0
    else:
        delay = publish_s + np.median(after_busy)
    return float(delay), {"n_weight_loads_idle": len(idle), "n_weight_loads_busy": len(after_busy)}


def write(out_dir: Path, cluster: ClusterShape, costs: CostModel, workload: Workload, diag: dict, source: str) -> None:
    for group, package, body in (("cluster", "_global_", {"cluster": asdict(cluster), "costs": asdict(costs)}),
                                 ("workload", "workload", asdict(workload))):
        (out_dir / group).mkdir(parents=True, exist_ok=True)
        (out_dir / group / "calibrated.yaml").write_text(
            f"# @package {package}\n# fitted by python -m sim.calibrate from {source}\n"
            + OmegaConf.to_yaml(OmegaConf.create(body)))
    (out_dir / "calibration.json").write_text(json.dumps({**diag, "costs": asdict(costs), "cluster": asdict(cluster),
                                                          "prompt_len": workload.prompt_len}, indent=1))


@hydra.main(version_base="1.3", config_path="../conf", config_name="calibrate")
def main(dcfg: DictConfig) -> None:
    cfg: CalibrateConfig = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    cluster, costs, workload, diag = calibrate(*load_run(cfg.trace), cfg)
    write(out_dir, cluster, costs, workload, diag, cfg.trace)
    print(f"decode {costs.decode_step_s * 1e3:.3f} ms + {costs.decode_step_s_per_seq * 1e6:.2f} µs/seq "
          f"(R² {diag['r2_decode']:.2f}), teacher {costs.teacher_s_per_token * 1e6:.2f} µs/token, learner "
          f"{costs.learner_step_s * 1e3:.1f} ms + {costs.learner_s_per_token * 1e6:.2f} µs/token (R² "
          f"{diag['r2_learner']:.2f}), sync {costs.weight_sync_s * 1e3:.2f} ms -> {out_dir}\n"
          f"use: python -m sim.run --config-dir {out_dir} cluster=calibrated workload=calibrated")


if __name__ == "__main__":
    main()
