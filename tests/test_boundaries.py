"""The import rules of STYLE.md, checked: the core stays pure, and heavy GPU packages stay optional."""

import subprocess
import sys

RUNTIME_PACKAGES = {"simpy", "vllm", "ray", "hydra", "omegaconf"}


def imported_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(*sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_core_imports_no_runtime():
    mods = imported_modules("import asyncopd.estimators, asyncopd.scheduler, asyncopd.trace, asyncopd.cache, "
                            "asyncopd.rollout, asyncopd.protocols")
    assert "asyncopd" in mods and "torch" in mods          # the probe really imported the core
    assert not mods & RUNTIME_PACKAGES, mods & RUNTIME_PACKAGES
