"""`python -m sim.calibrate trace=<run dir or trace.csv>`: fit the simulator's cost model to a measured run.

The one idea: every cost in sim.costs.CostModel is a linear form, so a measured trace (the concurrent toy run;
the same schema as any backend) fits it by non-negative least squares (scipy.optimize.nnls):

    decode iteration   dur  = decode_step_s + decode_step_s_per_seq·(n − 1) + prefill_s_per_token·p
                       over `decode_iter` events (n sequences decoded, p prompt tokens prefilled), plus the
                       worker's loop overhead: the median gap between one iteration's end and the next one's start
                       (only gaps with nothing else in between, before an iteration that prefills nothing, and
                       shorter than `idle_gap_s`: longer ones are idle). An iteration that prefills is fitted with
                       its admission: the gap before it less that overhead (and the handover, after a teacher
                       call), where the worker took the new requests in (vLLM's add_request: ~0.1 ms each on a
                       CPU), so prefill_s_per_token carries the cost of a sequence joining the replica
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

Checked first: the trace holds the kinds fitted from (decode_iter, teacher, learner_step, rollout), each fit has at
least its unknowns + 2 events after the warmup, and run_info.json has the keys read here. Every fit's R² is printed
and kept in calibration.json; a fit with R² < min_r2, or a cost the model scales with load (POSITIVE) that comes
out exactly 0, is refused (on_poor_fit=error) or written with a loud warning (on_poor_fit=warn). A ValueError
names the file and the problem; the CLI prints it and exits 1.

Writes into hydra.run.dir: cluster/calibrated.yaml (`cluster` + `costs`), workload/calibrated.yaml, and
calibration.json (the fits, their R², the scheduler settings of the measured run). Use them with

    python -m sim.run --config-dir <that dir> cluster=calibrated workload=calibrated scheduler.max_staleness=<η>
"""

from __future__ import annotations

import json
import logging
import sys
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
from asyncopd.config import check_finite
from asyncopd.scheduler import ON_STALE, SchedulerConfig
from sim.costs import ClusterShape, CostModel, LengthDist, Workload
from sim.specs import Specs, costs_from_specs

log = logging.getLogger(__name__)
PLACEMENT = {"separate": "separate", "colocate_teacher_with_rollout": "teacher_with_rollout"}
FITS = {"decode": ("decode_iter", 3), "teacher": ("teacher", 3), "learner": ("learner_step", 2)}  # kind, unknowns
POSITIVE = {"decode": "decode_step_s", "teacher": "teacher_s_per_token", "learner": "learner_s_per_token"}
ON_POOR_FIT = ("error", "warn")


@dataclass
class CalibrateConfig:
    trace: str = "???"                   # a run directory (trace.csv + run_info.json) or a trace.csv inside one
    warmup_steps: int = 2                # ignore events before the end of this learner step (start-up), >= 0
    idle_gap_s: float = 0.004            # a gap between decode iterations longer than this is idle, not overhead
    min_r2: float = 0.5                  # refuse a fit (decode, teacher, learner) with R² below this, in [0, 1]
    on_poor_fit: str = "error"           # error: a poor fit stops calibration | warn: write the YAML, warn loudly
    prior: str = ""                      # a cluster YAML (typed costs, or specs to derive them for the measured
                                         # shape and workload) to compare the fit with: moved.csv ("" = none)

    def __post_init__(self):
        check_finite(self)
        if not 0 <= self.min_r2 <= 1:
            raise ValueError(f"min_r2 must be in [0, 1], got {self.min_r2}")
        if self.on_poor_fit not in ON_POOR_FIT:
            raise ValueError(f"on_poor_fit must be one of {ON_POOR_FIT}, got {self.on_poor_fit!r}")
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
    """(trace frame, run_info) from a run directory or its trace.csv; the frame's attrs["source"] names its file."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    trace_file = p if p.is_file() else p / "trace.csv"
    if not trace_file.exists():
        raise ValueError(f"{path}: no trace.csv there (a run directory of python -m backends.run exec=concurrent)")
    info_file = run_dir / "run_info.json"
    if not info_file.exists():
        raise ValueError(f"{info_file}: no such file; calibration needs the run's placement, workers and batch "
                         f"size from run_info.json beside the trace (written by exec=concurrent runs)")
    info = check_run_info(info_file)
    df = trace_io.read(trace_file)
    df.attrs["source"] = str(trace_file)
    return df, info


def check_run_info(info_file: Path) -> dict:
    """run_info.json with the keys calibration reads, each of the right kind; ValueError naming the file."""
    try:
        info = json.loads(info_file.read_bytes())
    except (ValueError, OSError) as err:
        raise ValueError(f"{info_file}: not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_file}: not a JSON object")
    need = ("placement", "rollout_workers", "batch_size", "engine_slots", "staleness", "on_stale")
    if missing := [k for k in need if k not in info]:
        renamed = "eta" in info and "staleness" in missing
        hint = " (it has 'eta': the knob is now 'staleness', e.g. \"1\")" if renamed else ""
        raise ValueError(f"{info_file}: missing keys {missing} that calibration reads{hint}")
    for key in ("rollout_workers", "batch_size", "engine_slots"):
        if type(info[key]) is not int or info[key] < 1:
            raise ValueError(f"{info_file}: {key} must be an int >= 1, got {info[key]!r}")
    if info["placement"] not in PLACEMENT:
        raise ValueError(f"{info_file}: placement must be one of {tuple(PLACEMENT)}, got {info['placement']!r}")
    if info["on_stale"] not in ON_STALE:
        raise ValueError(f"{info_file}: on_stale must be one of {ON_STALE}, got {info['on_stale']!r}")
    try:
        SchedulerConfig.parse(info["staleness"])
    except ValueError as err:
        raise ValueError(f"{info_file}: {err}") from None
    return info


def check_trace(df: pd.DataFrame, source: str, warmup_steps: int) -> None:
    """What the fits need: events of every kind fitted from, and enough of them after the warmup."""
    if len(df) == 0:
        raise ValueError(f"{source}: the trace has no events")
    kinds = [k for k, _ in FITS.values()] + ["rollout"]
    if missing := [k for k in kinds if not (df.kind == k).any()]:
        raise ValueError(f"{source}: no {', '.join(missing)} events; calibration fits from {', '.join(kinds)} "
                         f"(the trace of a python -m backends.run exec=concurrent run has them all)")
    n_steps = int((df.kind == "learner_step").sum())
    if n_steps < warmup_steps + FITS["learner"][1] + 2:
        raise ValueError(f"{source}: the trace has {n_steps} learner steps; calibration needs at least warmup_steps + "
                         f"{FITS['learner'][1] + 2} = {warmup_steps + FITS['learner'][1] + 2}: run more steps")


def calibrate(df: pd.DataFrame, info: dict, cfg: CalibrateConfig) -> tuple[ClusterShape, CostModel, Workload, dict]:
    """Fit (cluster, costs, workload) to a measured trace (from `load_run`: `info` checked, df.attrs["source"]
    its file); the dict holds the fit diagnostics. ValueError for a trace too thin to fit, or a poor fit."""
    source = df.attrs.get("source", "trace")
    check_trace(df, source, cfg.warmup_steps)
    steps = df[df.kind == "learner_step"].sort_values("t")
    t_start = float((steps.t + steps.dur_s).iloc[cfg.warmup_steps - 1]) if cfg.warmup_steps else 0.0
    df = df[df.t >= t_start]
    steps = steps[steps.t >= t_start]
    for name, (kind, k) in FITS.items():
        if (n := int((df.kind == kind).sum())) < k + 2:
            raise ValueError(f"{source}: {n} {kind} events after the warmup ({cfg.warmup_steps} learner steps); the "
                             f"{name} fit has {k} unknowns and needs at least {k + 2}: calibrate on a longer run")
    if not (df.kind == "rollout").any():
        raise ValueError(f"{source}: no rollout events after the warmup ({cfg.warmup_steps} learner steps), so no "
                         f"response lengths: calibrate on a longer run")
    colocated = info["placement"] == "colocate_teacher_with_rollout"
    B = int(info["batch_size"])

    # the workers' gaps: loop overhead between decode iterations, the colocated teacher's handover, and the gap
    # before an iteration that prefills (the worker took its new requests in and queued them in its engine)
    it = df[df.kind == "decode_iter"]
    calls = df[(df.kind == "decode_iter") | ((df.kind == "teacher") & colocated)]      # each worker's own calls
    overheads, handovers, admissions = [], [], []                   # admissions: (decode_iter index, gap, after)
    for w, ev in pd.concat([calls, df[df.kind == "weight_sync"]]).groupby("worker"):
        ev = ev.sort_values("t")
        kinds, t, end = ev.kind.to_numpy(), ev.t.to_numpy(), (ev.t + ev.dur_s).to_numpy()
        prefills = (ev.kind == "decode_iter").to_numpy() & (ev.tokens > 0).to_numpy()
        for k in range(len(ev) - 1):
            gap = t[k + 1] - end[k]
            if kinds[k] == "decode_iter" and kinds[k + 1] == "decode_iter" and not prefills[k + 1] \
                    and gap < cfg.idle_gap_s:
                overheads.append(gap)
            elif kinds[k] == "teacher" and gap < cfg.idle_gap_s:
                handovers.append(gap)
            if prefills[k + 1] and gap < cfg.idle_gap_s:
                admissions.append((ev.index[k + 1], gap, kinds[k]))
    overhead = float(np.median(overheads)) if overheads else 0.0
    handover = max(0.0, float(np.median(handovers)) - overhead) if handovers else 0.0

    # decode iterations: the step-time form by NNLS. A prefilling iteration also pays for its admission: the part
    # of the gap before it beyond the usual loop overhead (and handover, after a teacher call), so the prefill
    # rate carries the per-request cost of taking requests in (large for vLLM's add_request, ~0 for the toy)
    admission = pd.Series(0.0, index=it.index)
    for i, gap, after in admissions:
        admission[i] = max(0.0, gap - overhead - (handover if after == "teacher" else 0.0))
    X = np.column_stack([np.ones(len(it)), it.n_seqs - 1, it.tokens])
    (d0, d_seq, d_pre), r2_decode = fit((it.dur_s + admission).to_numpy(), X)

    # teacher: call + per sequence + per token by NNLS; colocated, each call also hands its batch over
    te = df[df.kind == "teacher"]
    (t_call, t_seq, t_tok), r2_teacher = fit(te.dur_s.to_numpy(),
                                             np.column_stack([np.ones(len(te)), te.n_seqs, te.tokens]))

    # learner: the step by NNLS, then what it does per step before admitting again (publishing its weights)
    (l0, l_tok), r2_learner = fit(steps.dur_s.to_numpy(), np.column_stack([np.ones(len(steps)), steps.tokens]))
    admits = np.sort(df[df.kind == "admit"].t.to_numpy())
    ends = (steps.t + steps.dur_s).to_numpy()
    k = np.searchsorted(admits, ends)
    publish_s = float(np.median(admits[k[k < len(admits)]] - ends[k < len(admits)])) if len(admits) else 0.0
    ws = df[df.kind == "weight_sync"]
    step_end = dict(zip(steps.version, steps.t + steps.dur_s))
    weight_sync_s, sync_diag = weight_sync_delay(calls, ws, step_end, publish_s)

    # the fits' quality, before the model takes them
    r2 = {"decode": r2_decode, "teacher": r2_teacher, "learner": r2_learner}
    n = {name: int((df.kind == kind).sum()) for name, (kind, _) in FITS.items()}
    poor = poor_fits(r2, {"decode": d0 + overhead, "teacher": t_tok, "learner": l_tok}, n, cfg.min_r2)
    if poor:
        what = (f"{source}: poor calibration fits (R² {', '.join(f'{k} {v:.2f}' for k, v in r2.items())}): "
                f"{'; '.join(poor)}")
        if cfg.on_poor_fit == "error" or d0 + overhead == 0:         # a free decode step cannot be simulated
            raise ValueError(f"{what}. Calibrate on a longer run (more steps: more events, less noise)" +
                             (f", or pass on_poor_fit=warn to write the YAML anyway (or lower min_r2={cfg.min_r2})"
                              if d0 + overhead > 0 else ""))
        log.warning("!!! %s. on_poor_fit=warn: writing the calibration anyway; predictions from it are unreliable "
                    "!!!", what)

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
    diag = {"r2_decode": r2_decode, "r2_teacher": r2_teacher, "r2_learner": r2_learner, "poor_fits": poor,
            "decode_loop_overhead_s": overhead, "teacher_handover_s": handover,
            "admission_s_per_step": float(admission.sum() / max(1, len(steps))),
            "n_decode_iters": len(it), "n_overhead_gaps": len(overheads), "n_teacher_calls": len(te),
            "n_learner_steps": len(steps), "n_rollouts": len(ro), **sync_diag,
            "measured": {"eta": SchedulerConfig.parse(info["staleness"]).max_staleness, "on_stale": info["on_stale"],
                         "pipeline_depth": info.get("pipeline_depth"),
                         "batch_size": B}}
    return cluster, costs, workload, diag


def poor_fits(r2: dict[str, float], positive: dict[str, float], n: dict[str, int], min_r2: float) -> list[str]:
    """One line per fit with R² < min_r2 or its POSITIVE cost (value in `positive`) fitted as exactly 0: NNLS
    clips a cost it cannot see to 0, and the model then makes that load free."""
    out = []
    for name, (kind, _) in FITS.items():
        if r2[name] < min_r2:
            out.append(f"the {name} fit has R² {r2[name]:.2f} < min_r2 {min_r2} over {n[name]} {kind} events")
        if positive[name] == 0:
            out.append(f"the {name} fit (R² {r2[name]:.2f}) gives {POSITIVE[name]} = 0, which the model needs > 0")
    return out


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
            + "".join(f"# WARNING, poor fit (on_poor_fit=warn): {p}\n" for p in diag["poor_fits"])
            + OmegaConf.to_yaml(OmegaConf.create(body)))
    (out_dir / "calibration.json").write_text(json.dumps({**diag, "costs": asdict(costs), "cluster": asdict(cluster),
                                                          "prompt_len": workload.prompt_len}, indent=1))


def moved(prior: str, cluster: ClusterShape, costs: CostModel, workload: Workload) -> pd.DataFrame:
    """Each cost of the `prior` cluster YAML (its `costs`, or the costs its `specs` give for the measured shape
    and workload) against the fit: how far the measurement moved each assumption (ratio = fitted / prior)."""
    node = OmegaConf.to_container(OmegaConf.load(prior))
    base = (costs_from_specs(Specs(**node["specs"]), cluster, workload) if "specs" in node
            else CostModel(**node["costs"]))
    before, after = asdict(base), asdict(costs)
    return pd.DataFrame([dict(cost=k, prior=before[k], fitted=after[k],
                              ratio=after[k] / before[k] if before[k] else float("nan")) for k in after])


@hydra.main(version_base="1.3", config_path="../conf", config_name="calibrate")
def main(dcfg: DictConfig) -> None:
    try:                                                 # a bad input is one message and exit 1, no traceback
        cfg: CalibrateConfig = OmegaConf.to_object(dcfg)
        cluster, costs, workload, diag = calibrate(*load_run(cfg.trace), cfg)
    except ValueError as err:
        sys.exit(f"sim.calibrate: {err}")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    write(out_dir, cluster, costs, workload, diag, cfg.trace)
    if cfg.prior:
        table = moved(cfg.prior, cluster, costs, workload)
        table.to_csv(out_dir / "moved.csv", index=False)
        print(f"fitted vs {cfg.prior} (ratio = fitted / prior):\n{table.to_string(index=False)}")
    print(f"decode {costs.decode_step_s * 1e3:.3f} ms + {costs.decode_step_s_per_seq * 1e6:.2f} µs/seq "
          f"(R² {diag['r2_decode']:.2f}), teacher {costs.teacher_call_s * 1e3:.3f} ms/call + "
          f"{costs.teacher_s_per_token * 1e6:.2f} µs/token (R² {diag['r2_teacher']:.2f}), learner "
          f"{costs.learner_step_s * 1e3:.1f} ms + {costs.learner_s_per_token * 1e6:.2f} µs/token (R² "
          f"{diag['r2_learner']:.2f}), sync {costs.weight_sync_s * 1e3:.2f} ms -> {out_dir}\n"
          + (f"WARNING: poor fits, written anyway (on_poor_fit=warn): {'; '.join(diag['poor_fits'])}\n"
             if diag["poor_fits"] else "")
          + f"use: python -m sim.run --config-dir {out_dir} cluster=calibrated workload=calibrated")


if __name__ == "__main__":
    main()
