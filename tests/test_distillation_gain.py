"""The headline study's toy set-up makes distillation work: a k = 0 run on kl_direction's default pair and learner
settings raises held-out accuracy beyond noise. A change that loses the gain (the student's warm-up, the learner's
lr or batch, the estimators, the evaluation) fails here before it empties the study's findings.

The run is reverse KL on the behaviour's top-8, the estimator whose k = 0 gain is large on every seed (43–56% of the
gap, +7 to +9 points). Forward top-k gains less and less reliably (19–37%; one run with 2 threads gained +2.1 points
on 1,000 prompts, inside the ±2.2 band), so a forward-KL version of this test would flake; the held-out forward KL
is checked to fall instead (docs/kl_direction_diagnosis.md).

It uses the default teacher (4 × 128, ~5 min to train on one thread) and the study's student (800 steps of a
1500-step warm-up), from the model cache: marked `study`, run by .ci/run after it trains them, and by hand with
`pytest -m study`."""

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
def test_distillation_at_k0_improves_the_default_student(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        study = compose("kl_direction", overrides=["cells_dir=unused"])
    toy = replace(OmegaConf.to_object(study).toy, eval_prompts=PROMPTS, eval_every=study.steps, threads=2)
    cfg = RunConfig(staleness="fixed:0", steps=study.steps, seed=0, toy=toy, objective=preset("reverse_kl_topk"))
    run(cfg, tmp_path)
    m = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["accuracy"]).set_index("step")
    before, after = m.accuracy.loc[0], m.accuracy.loc[study.steps]
    gain, band, sign = compare(np.array([after]), np.array([before]), PROMPTS)
    assert 0.75 < before < 0.9, f"the study's student is no longer {before:.3f}: recheck the set-up"
    assert sign == 1 and gain > 0.03, f"held-out accuracy {before:.3f} → {after:.3f} (band ±{band:.3f})"
    assert m.eval_forward_kl.loc[study.steps] < 0.7 * m.eval_forward_kl.loc[0]      # toward the teacher in KL too
