"""`python -m backends.run`: one training run of a backend, configured with hydra-core.

    python -m backends.run backend=toy exec=lockstep staleness=fixed:2 estimator=reverse_kl_stale steps=50 \
        seed=0 hydra.run.dir=outputs/rkl_k2
    python -m backends.run backend=toy exec=concurrent staleness=2 concurrent.weight_update=in_flight steps=50
    python -m backends.run exec=ray staleness=2 steps=50                  # the same roles as Ray actors
    python -m backends.run exec=ray ray.address=auto staleness=2 steps=50 # ... on a running Ray cluster
    python -m backends.run backend=vllm_fsdp staleness=fixed:1 steps=50   # vLLM + FSDP2 on one GPU (or the CPU)
    python -m backends.run backend=vllm_fsdp exec=concurrent staleness=1 steps=50   # vLLM engines in workers
    python -m backends.run backend=vllm_fsdp exec=ray staleness=1 steps=50          # vLLM engines in Ray actors
    python -m backends.run ... resume=true            # continue the run in hydra.run.dir from its last checkpoint
    python -m backends.run --multirun estimator=forward_kl_topk,reverse_kl_stale staleness=fixed:0,fixed:4

`estimator=<preset>` picks a file of conf/estimator/ (the objective's fields); single fields override as
`objective.correction=tis`. Writes metrics.csv, trace.csv/trace.json and checkpoint/ into hydra.run.dir.

This module imports only torch-free config schemas (asyncopd/config.py, backends/config.py, ...): `main` builds
and validates the whole config first (every `__post_init__`), so a bad value exits non-zero in about a second,
naming the field, and `run` imports the chosen runner (torch, transformers, ray) only then.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd.config import ObjectiveConfig
from asyncopd.scheduler import SchedulerConfig
from backends.config import ConcurrentConfig, RayConfig, ToyConfig, check_fits
from backends.health import HealthConfig
from backends.vllm_fsdp.config import RealConfig

log = logging.getLogger(__name__)
BACKENDS = ("toy", "vllm_fsdp")
EXECS = ("lockstep", "concurrent", "ray")
LOGGERS = ("csv", "tensorboard")


@dataclass
class RunConfig:
    backend: str = "toy"                 # toy: tiny GPT-2 engines | vllm_fsdp: vLLM rollouts + teacher, FSDP2 learner
    exec: str = "lockstep"               # lockstep: one process, deterministic | concurrent: processes, wall clock
                                         # | ray: the roles as Ray actors (local instance or a cluster)
    staleness: str = "fixed:0"           # lockstep: fixed:k = every batch k versions old, or schedule:<file> = replay
                                         # a sim.run schedule; concurrent and ray: η (0 = sync). Parsed once, by
                                         # SchedulerConfig.parse, into `scheduler`
    steps: int = 100                     # learner steps, >= 1
    seed: int = 0                        # prompts and sampling; models have their own toy.model_seed
    resume: bool = False                 # continue from the last checkpoint in the output folder
    logger: str = "csv"                  # csv | tensorboard (metrics.csv is always written)
    keep_checkpoints: int = 3            # checkpoints kept, newest first (a damaged one falls back), >= 1
    health: HealthConfig = field(default_factory=HealthConfig)              # collapse detection (backends/health.py)
    toy: ToyConfig = field(default_factory=ToyConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    concurrent: ConcurrentConfig = field(default_factory=ConcurrentConfig)   # exec=concurrent and exec=ray
    ray: RayConfig = field(default_factory=RayConfig)                        # exec=ray only
    vllm_fsdp: RealConfig = field(default_factory=RealConfig)                # backend=vllm_fsdp only

    def __post_init__(self):
        for name, allowed in (("backend", BACKENDS), ("exec", EXECS), ("logger", LOGGERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be an int >= 1, got {self.keep_checkpoints!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.backend == "vllm_fsdp" and self.schedule_file is not None:
            raise ValueError(f"staleness=schedule:<file> replays a simulator schedule on the toy backend only "
                             f"(got backend=vllm_fsdp, staleness={self.staleness}); use exec=lockstep "
                             f"staleness=fixed:<k>, or exec=concurrent / exec=ray staleness=<η>")
        self.scheduler = self._parse_staleness()       # not a field: derived, so not in asdict or the digest
        if self.exec == "ray":
            check_fits(self.ray, self.concurrent)
        if self.toy.mixture_frac and self.exec != "lockstep":
            raise ValueError(f"toy.mixture_frac > 0 (rollout mixture) runs with exec=lockstep only, got exec={self.exec!r}")

    @property
    def schedule_file(self) -> str | None:
        """The file of staleness=schedule:<file>, else None."""
        head, _, rest = str(self.staleness).partition(":")
        return rest if head == "schedule" else None

    def _parse_staleness(self) -> SchedulerConfig:
        """The scheduler of this run: fixed:k for lockstep, η for concurrent and Ray, or a schedule file's own
        config (lockstep replay). The batch the scheduler sees excludes the rollout mixture's teacher samples."""
        if self.schedule_file is not None:
            if self.toy.mixture_frac > 0:
                raise ValueError("toy.mixture_frac > 0 runs with exec=lockstep staleness=fixed:<k> only, not a "
                                 "schedule replay")
            if self.exec != "lockstep":
                raise ValueError(f"staleness=schedule:<file> replays a simulator schedule with exec=lockstep only, "
                                 f"got exec={self.exec!r}")
            from backends.replay import load_schedule
            return load_schedule(self.schedule_file, self.toy.batch_size, self.steps)["scheduler"]
        if self.exec == "lockstep" and self.concurrent.pipeline_depth is not None:
            raise ValueError(f"concurrent.pipeline_depth={self.concurrent.pipeline_depth} is for exec=concurrent or "
                             f"ray; exec=lockstep runs fixed:<k>, whose admission is fixed")
        try:
            sched = SchedulerConfig.parse(self.staleness, batch_size=self.toy.batch_size - self.toy.n_mixture,
                                          on_stale=self.concurrent.on_stale,
                                          pipeline_depth=self.concurrent.pipeline_depth)
        except ValueError as err:
            raise ValueError(f"staleness: {err}; exec=lockstep takes fixed:<k> or schedule:<file> (from python -m "
                             f"sim.run schedule=true), exec=concurrent and exec=ray take an integer η") from None
        if self.exec == "lockstep" and sched.fixed_staleness is None:
            raise ValueError(f"exec=lockstep takes staleness=fixed:<k> (every batch k versions old) or "
                             f"schedule:<file>, got {self.staleness!r}; an integer η is for exec=concurrent or ray")
        if self.exec != "lockstep" and sched.fixed_staleness is not None:
            raise ValueError(f"exec={self.exec} takes staleness=<η>, an integer >= 0 (the bounded-async "
                             f"scheduler's max_staleness; 0 = synchronous), got {self.staleness!r}; fixed:k is "
                             f"lockstep-only")
        return sched


ConfigStore.instance().store(name="run_schema", node=RunConfig)


def run(cfg: RunConfig, out_dir: Path):
    if cfg.backend == "vllm_fsdp" and cfg.exec == "ray":
        from backends import ray_run
        from backends.vllm_fsdp.parts import ray_parts
        return ray_run.run(cfg, out_dir, parts=ray_parts)
    if cfg.backend == "vllm_fsdp" and cfg.exec == "concurrent":
        from backends import toy_concurrent
        from backends.vllm_fsdp.parts import concurrent_parts
        return toy_concurrent.run(cfg, out_dir, parts=concurrent_parts)
    if cfg.backend == "vllm_fsdp":
        from backends import lockstep
        from backends.vllm_fsdp.parts import lockstep_parts
        return lockstep.run(cfg, out_dir, parts=lockstep_parts)
    if cfg.backend == "toy" and cfg.exec == "ray":
        from backends import ray_run
        return ray_run.run(cfg, out_dir)
    if cfg.backend == "toy" and cfg.exec == "concurrent":
        from backends import toy_concurrent
        return toy_concurrent.run(cfg, out_dir)
    if cfg.backend == "toy" and cfg.schedule_file is not None:
        from backends import replay
        return replay.run(cfg, out_dir)
    if cfg.backend == "toy":
        from backends import lockstep
        return lockstep.run(cfg, out_dir)
    raise ValueError(f"unknown backend {cfg.backend!r}")


def take_signals() -> None:
    """The run owns its process's ending. A run started from a script or a background job may inherit an ignored
    SIGINT: Python's handler is restored (and the log says so), so Ctrl-C / kill -INT stop it. SIGTERM raises
    SystemExit(143) instead of killing the process outright, so the run's cleanup (workers stopped, Ray shut
    down) runs as it does for Ctrl-C; the session also ends at its next step if that exception is lost
    (backends.session.request_stop)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("SIGINT was ignored (inherited from a background job or a script): restored, so Ctrl-C and "
                    "kill -INT stop this run")
    def on_sigterm(signum, frame):
        from backends.session import request_stop   # imported by the running backend already; torch-free here
        request_stop(signum)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, on_sigterm)


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(dcfg: DictConfig) -> None:
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    take_signals()
    df = run(cfg, out_dir)
    last = df.iloc[-1]
    log.info("done: %d steps, final accuracy %s, kl %.4f -> %s", int(last["step"]), last.get("accuracy"),
             last.get("kl", float("nan")), out_dir)


if __name__ == "__main__":
    main()
