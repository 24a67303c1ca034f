"""`python -m backends.run`: one training run of a backend, configured with hydra-core.

    python -m backends.run backend=toy exec=lockstep staleness=fixed:2 estimator=reverse_kl_stale steps=50 \
        seed=0 hydra.run.dir=outputs/rkl_k2
    python -m backends.run backend=toy exec=concurrent staleness=2 concurrent.weight_update=in_flight steps=50
    python -m backends.run exec=ray staleness=2 steps=50                  # the same roles as Ray actors
    python -m backends.run exec=ray ray.address=auto staleness=2 steps=50 # ... on a running Ray cluster
    python -m backends.run backend=vllm_fsdp staleness=fixed:1 steps=50   # vLLM + FSDP2 on one GPU
    python -m backends.run ... resume=true            # continue the run in hydra.run.dir from its last checkpoint
    python -m backends.run --multirun estimator=forward_kl_topk,reverse_kl_stale staleness=fixed:0,fixed:4

`estimator=<preset>` picks a file of conf/estimator/ (the objective's fields); single fields override as
`objective.correction=tis`. Writes metrics.csv, trace.csv/trace.json and checkpoint/ into hydra.run.dir.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asyncopd.objective import ObjectiveConfig
from backends.ray_run import RayConfig, check_fits
from backends.toy import ToyConfig, parse_staleness
from backends.toy_concurrent import ConcurrentConfig, parse_eta
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
                                         # a sim.run schedule; concurrent and ray: η (0 = sync)
    steps: int = 100                     # learner steps, >= 1
    seed: int = 0                        # prompts and sampling; models have their own toy.model_seed
    resume: bool = False                 # continue from the last checkpoint in the output folder
    logger: str = "csv"                  # csv | tensorboard (metrics.csv is always written)
    toy: ToyConfig = field(default_factory=ToyConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    concurrent: ConcurrentConfig = field(default_factory=ConcurrentConfig)   # exec=concurrent and exec=ray
    ray: RayConfig = field(default_factory=RayConfig)                        # exec=ray only
    vllm_fsdp: RealConfig = field(default_factory=RealConfig)                # backend=vllm_fsdp only

    def __post_init__(self):
        for name, allowed in (("backend", BACKENDS), ("exec", EXECS), ("logger", LOGGERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        parse_eta(self.staleness) if self.exec in ("concurrent", "ray") else parse_staleness(self.staleness)
        if self.exec == "ray":
            check_fits(self.ray, self.concurrent)
        if self.toy.mixture_frac and self.exec != "lockstep":
            raise ValueError(f"toy.mixture_frac > 0 (rollout mixture) runs with exec=lockstep only, got exec={self.exec!r}")
        if self.backend == "vllm_fsdp" and (self.exec != "lockstep" or str(self.staleness).startswith("schedule:")):
            raise ValueError(f"backend=vllm_fsdp runs with exec=lockstep and staleness=fixed:<k> (got exec={self.exec}, "
                             f"staleness={self.staleness}); exec=ray runs the toy engines only so far")


ConfigStore.instance().store(name="run_schema", node=RunConfig)


def run(cfg: RunConfig, out_dir: Path):
    if cfg.backend == "vllm_fsdp":
        from backends import toy
        from backends.vllm_fsdp.parts import lockstep_parts
        return toy.run(cfg, out_dir, parts=lockstep_parts)
    if cfg.backend == "toy" and cfg.exec == "ray":
        from backends import ray_run
        return ray_run.run(cfg, out_dir)
    if cfg.backend == "toy" and cfg.exec == "concurrent":
        from backends import toy_concurrent
        return toy_concurrent.run(cfg, out_dir)
    if cfg.backend == "toy" and str(cfg.staleness).startswith("schedule:"):
        from backends import toy_replay
        return toy_replay.run(cfg, out_dir, schedule=str(cfg.staleness).partition(":")[2])
    if cfg.backend == "toy":
        from backends import toy
        return toy.run(cfg, out_dir)
    raise ValueError(f"unknown backend {cfg.backend!r}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(dcfg: DictConfig) -> None:
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    df = run(cfg, out_dir)
    last = df.iloc[-1]
    log.info("done: %d steps, final accuracy %s, kl %.4f -> %s", int(last["step"]), last.get("accuracy"),
             last.get("kl", float("nan")), out_dir)


if __name__ == "__main__":
    main()
