"""The headline study's toy set-up makes distillation work: a k = 0 forward-KL run on kl_direction's default pair
and learner settings raises held-out accuracy beyond noise. A change that loses the gain (the student's warm-up,
the learner's lr or batch, the estimator, the evaluation) fails here before it empties the study's findings.

It uses the default teacher (4 × 128, trained once into the model cache, ~4-6 min on 2 cores when absent) and
the study's student (800 steps of a 1500-step warm-up, ~30 s): marked `study`, run by .ci/run after the other
tests, and by hand with `pytest -m study`."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from backends.run import RunConfig, run
from studies.cells import compare, preset

CONF = Path(__file__).resolve().parents[1] / "conf" / "studies" / "kl_direction"
PROMPTS = 1000          # two binomial standard errors at ~85% accuracy: ±2.3 points


@pytest.mark.study
def test_forward_kl_at_k0_improves_the_default_student(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        study = compose("kl_direction", overrides=["cells_dir=unused"])
    toy = replace(OmegaConf.to_object(study).toy, eval_prompts=PROMPTS, eval_every=study.steps, threads=2)
    cfg = RunConfig(staleness="fixed:0", steps=study.steps, seed=0, toy=toy, objective=preset("forward_kl_topk"))
    run(cfg, tmp_path)
    acc = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["accuracy"]).set_index("step").accuracy
    before, after = acc.loc[0], acc.loc[study.steps]
    gain, band, sign = compare(np.array([after]), np.array([before]), PROMPTS)
    assert 0.75 < before < 0.9, f"the study's student is no longer {before:.3f}: recheck the set-up"
    assert sign == 1 and gain > 0.03, f"held-out accuracy {before:.3f} → {after:.3f} (band ±{band:.3f})"
