"""Config schemas: every float field of every config rejects NaN and ±inf, naming the field (asyncopd.config's
`check_finite`), except where the schema documents what inf means; and the list of configs checked here is every
dataclass of the project with a float field that is a config."""

import ast
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from asyncopd.config import ObjectiveConfig, check_finite
from backends.config import ConcurrentConfig, RayConfig, ToyConfig
from backends.health import HealthConfig
from backends.vllm_fsdp.config import RealConfig
from backends.vllm_fsdp.vllm_engine import VLLMConfig
from sim.calibrate import CalibrateConfig
from sim.costs import CostModel, LengthDist
from sim.planner import PlanConfig
from sim.specs import Assumptions
from studies import cache_estimators, cache_estimators_grads, length_inflation, sim_vs_real, throughput, vcpo

ROOT = Path(__file__).resolve().parents[1]

# config class -> (the keyword arguments of a valid instance, fields where inf is documented and allowed)
CONFIGS = {
    ObjectiveConfig: ({}, ()), ToyConfig: ({}, ()), ConcurrentConfig: ({}, ()), RayConfig: ({}, ()),
    RealConfig: ({}, ()), VLLMConfig: ({"model_path": "m"}, ()),
    HealthConfig: ({}, ("kl_factor",)),                  # kl_factor=inf switches the reverse-KL signal off
    CostModel: ({}, ()), LengthDist: ({}, ()), PlanConfig: ({}, ()),
    cache_estimators.Config: ({}, ()), cache_estimators_grads.SyntheticConfig: ({}, ()),
    length_inflation.Config: ({}, ()), sim_vs_real.RunSpec: ({}, ()), throughput.Config: ({}, ()),
    vcpo.Config: ({}, ()), CalibrateConfig: ({}, ()), Assumptions: ({}, ()),
}
NOT_CONFIGS = {"EstimatorOut", "Event", "Recorder", "SortTask", "SyncStats",   # results and records, not settings
               "GPU"}                                                        # a row of sim.specs' datasheet table


def float_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "float" in str(f.type)]


CASES = [(cls, name, bad) for cls in CONFIGS for name in float_fields(cls)
         for bad in (math.nan, math.inf, -math.inf)]


@pytest.mark.parametrize("cls, name, bad", CASES,
                         ids=[f"{c.__module__}.{c.__qualname__}.{n}={b}" for c, n, b in CASES])
def test_every_float_field_rejects_nan_and_inf_naming_it(cls, name, bad):
    kwargs, allow_inf = CONFIGS[cls]
    default = getattr(cls(**kwargs), name)
    value = [*default, bad] if isinstance(default, list) else bad
    if math.isinf(bad) and name in allow_inf and bad > 0:
        cls(**kwargs, **{name: value})                   # documented: inf switches the check off
        return
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls(**kwargs, **{name: value})


def test_every_config_with_a_float_field_is_checked():
    """A new dataclass with a float field must be listed: in CONFIGS (then the test above covers it) or as a
    record in NOT_CONFIGS."""
    found = set()
    for path in sorted(p for pkg in ("asyncopd", "backends", "sim", "studies") for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
                    and any(isinstance(s, ast.AnnAssign) and "float" in ast.unparse(s.annotation) for s in node.body)):
                found.add(node.name)
    listed = {c.__name__ for c in CONFIGS} | NOT_CONFIGS
    assert found - listed == set(), f"dataclasses with float fields missing from CONFIGS: {found - listed}"
    assert all(float_fields(c) for c in CONFIGS)


def test_check_finite_names_the_field_and_the_list_item():
    @dataclasses.dataclass
    class C:
        a: float = 1.0
        b: list = dataclasses.field(default_factory=lambda: [0.5, 2])
        n: int = 3
        s: str = "inf"

    check_finite(C())
    with pytest.raises(ValueError, match=r"^toy\.a must be finite, got inf$"):
        check_finite(C(a=math.inf), "toy.")
    with pytest.raises(ValueError, match=r"^b\[1\] must be finite, got nan$"):
        check_finite(C(b=[0.5, math.nan]))
    check_finite(C(a=math.inf), allow_inf=("a",))
    with pytest.raises(ValueError, match="a must be finite, got nan"):
        check_finite(C(a=math.nan), allow_inf=("a",))       # inf allowed never means NaN allowed


def test_cli_spelling_of_inf_is_rejected():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose("run", overrides=["toy.lr=inf"])
    with pytest.raises(ValueError, match=r"toy\.lr must be finite, got inf"):
        OmegaConf.to_object(dcfg)


@pytest.mark.parametrize("override, message", [("toy.lr=-1", "toy.lr must be > 0"),
                                               ("toy.lr=inf", "toy.lr must be finite")])
def test_cli_rejects_a_bad_field_before_importing_torch(override, message, tmp_path):
    """The command exits non-zero naming the field, and no heavy package was imported before (`-X importtime`
    lists every import the process made)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "backends.run", override,
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "hydra" in imported and not imported & {"torch", "transformers", "ray", "vllm", "pandas"}
    assert not (tmp_path / "metrics.csv").exists()
