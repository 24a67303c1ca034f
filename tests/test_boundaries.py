"""The import rules of STYLE.md, checked: the core stays pure, heavy GPU packages stay optional, the real backend
never leans on a toy role, roles never import the loops that drive them, and no project modules import each other
in a circle.

The static checks read every project module's imports with `ast` (a lazy import inside a function counts) and
name the offending module, line and import."""

import ast
import subprocess
import sys
from pathlib import Path

RUNTIME_PACKAGES = {"simpy", "vllm", "ray", "hydra", "omegaconf"}
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("asyncopd", "backends", "sim", "studies")

TOY_ROLES = {"backends.toy", "backends.toy_learner", "backends.toy_teacher", "backends.toy_engine",
             "backends.toy_concurrent", "backends.toy_replay"}
BRIDGE = "backends.vllm_fsdp.parts"           # builds a run's roles: the one real module that may reach toy code
BRIDGE_ONLY = {"backends.toy_export", "backends.toy_task", "backends.toy_models", "backends.evaluate"}
SHARED_UTILITY = {("backends.vllm_fsdp.fsdp_learner", "backends.toy_models")}   # pack(): the sequence packing
                                                                                 # both learners share
LOOPS = {"backends.toy", "backends.lockstep", "backends.toy_replay", "backends.replay", "backends.toy_concurrent",
         "backends.concurrent", "backends.ray_run", "backends.ray_actors", "backends.run", "backends.session",
         "backends.engine_pump"}
ROLES = {"backends.toy_engine", "backends.toy_teacher", "backends.toy_learner", "backends.toy_models",
         "backends.toy_task", "backends.evaluate", "backends.optim", "backends.checkpoint", "backends.weight_sync"}


def imported_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(*sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_core_imports_no_runtime():
    mods = imported_modules("import asyncopd.estimators, asyncopd.scheduler, asyncopd.trace, asyncopd.cache, "
                            "asyncopd.rollout, asyncopd.protocols")
    assert "asyncopd" in mods and "torch" in mods          # the probe really imported the core
    assert not mods & RUNTIME_PACKAGES, mods & RUNTIME_PACKAGES


def test_simulator_imports_no_torch():
    """The simulator moves content-free trajectories through the core's driver and scheduler: importing its CLI,
    planner and calibration pulls in no torch (0.8 s of start-up, ~8% of a 200-step cluster-scale run)."""
    mods = imported_modules("import sim.run, sim.plan, sim.calibrate, asyncopd.driver, asyncopd.rollout")
    assert {"sim", "asyncopd", "simpy"} <= mods                      # the probe really imported the simulator
    assert "torch" not in mods and "transformers" not in mods


HEAVY_PACKAGES = {"torch", "transformers", "ray", "vllm", "pandas", "simpy"}
CONFIG_PROBE = f"""
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
import asyncopd.config, asyncopd.scheduler, backends.config, backends.health, backends.vllm_fsdp.config, backends.run
with initialize_config_dir(config_dir={str(ROOT / "conf")!r}, version_base="1.3"):
    runs = [OmegaConf.to_object(compose("run", overrides=o)) for o in ([], ["exec=ray", "staleness=2"])]
assert [type(r).__name__ for r in runs] == ["RunConfig", "RunConfig"] and runs[1].scheduler.max_staleness == 2"""


def test_config_schemas_import_no_heavy_package():
    """`python -m backends.run` composes and validates the whole config (every schema's __post_init__) before it
    imports a runner: the schemas, RunConfig and the validation import none of torch, transformers, ray, vllm,
    pandas, simpy (a config error then shows up in about a second)."""
    mods = imported_modules(CONFIG_PROBE)
    assert {"asyncopd", "backends", "hydra"} <= mods                 # the probe really built the configs
    assert not mods & HEAVY_PACKAGES, mods & HEAVY_PACKAGES


# --- static import graph ------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def parse_imports(source: str, package: str) -> list[tuple[str, int]]:
    """(imported name, line) for every import statement in `source`, at any depth; `from a import b` names
    a.b when that is a module of the project, else a. Relative imports are resolved against `package`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return list(dict.fromkeys(out))                 # `from a import x, y` of one module: once


def imports_of(module: str) -> list[tuple[str, int]]:
    path = MODULES[module]
    return parse_imports(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def _in(name: str, targets: set[str]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in targets)


def _graph() -> dict[str, dict[str, int]]:
    """Project module -> {project module it imports: first line}."""
    graph = {}
    for m in MODULES:
        edges = {}
        for name, line in imports_of(m):
            if name in MODULES and name != m:
                edges.setdefault(name, line)
        graph[m] = edges
    return graph


GRAPH = _graph()


def _reach(start: str, forbidden: set[str]) -> list[str]:
    """Import chains from `start` to a module in `forbidden`, each as 'a (line i) -> b (line j) -> c': a imports b
    at its line i, b imports c at its line j (breadth first: the shortest chain to each module)."""
    found, seen, frontier = [], {start}, [[start]]
    while frontier:
        nxt = []
        for chain in frontier:
            for dep, _ in GRAPH[chain[-1]].items():
                if dep in seen:
                    continue
                seen.add(dep)
                if _in(dep, forbidden):
                    found.append(chain + [dep])
                else:
                    nxt.append(chain + [dep])
        frontier = nxt
    return [" -> ".join(f"{a} (line {GRAPH[a][b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}" for c in found]


def test_import_scan_sees_lazy_relative_and_submodule_imports():
    source = ("import torch\nfrom backends import checkpoint, optim\nfrom .chunked_head import ChunkedHeadModel\n"
              "def f():\n    from backends.toy_models import pack\n")
    assert parse_imports(source, "backends.vllm_fsdp") == [
        ("torch", 1), ("backends.checkpoint", 2), ("backends.optim", 2), ("backends.vllm_fsdp.chunked_head", 3),
        ("backends.toy_models", 5)]
    assert {"asyncopd.cache", "backends.optim", BRIDGE} <= MODULES.keys()


def test_real_backend_imports_no_toy_role():
    """backends/vllm_fsdp/ never imports a toy role; only parts.py, the bridge that builds a run's roles, imports
    the toy exporter, task and models and the shared evaluator (and through them whatever they import). The
    other modules reach no toy role through another module either."""
    bad = []
    for m in sorted(MODULES):
        if not m.startswith("backends.vllm_fsdp"):
            continue
        bad += [f"{m} line {line}: imports {name}" for name, line in imports_of(m) if _in(name, TOY_ROLES)]
        if m != BRIDGE:
            bad += [f"{m} line {line}: imports {name} (only {BRIDGE} may)" for name, line in imports_of(m)
                    if _in(name, BRIDGE_ONLY) and (m, name) not in SHARED_UTILITY]
            bad += [f"{m} reaches a toy role: {chain}" for chain in _reach(m, TOY_ROLES)]
    assert not bad, "the real backend reaches toy roles:\n" + "\n".join(bad)


def test_roles_import_no_loop():
    """Roles (the toy ones, the shared optimiser, checkpoints, weight sync, and the real ones but parts.py) never
    import a run loop, directly or through another module."""
    roles = sorted(ROLES | {m for m in MODULES if m.startswith("backends.vllm_fsdp") and m != BRIDGE})
    assert not set(roles) - MODULES.keys(), set(roles) - MODULES.keys()
    bad = [f"{m} reaches a loop: {chain}" for m in roles for chain in _reach(m, LOOPS)]
    assert not bad, "roles import run loops:\n" + "\n".join(bad)


def test_core_imports_nothing_from_drivers():
    bad = [f"{m} line {line}: imports {name}" for m in sorted(MODULES) if m.startswith("asyncopd")
           for name, line in imports_of(m) if _in(name, {"backends", "sim", "studies"})]
    assert not bad, "asyncopd imports a driver:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a list of modules."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                comp.append(w)
            on_stack.discard(v)
            if comp:
                out.append(sorted(comp + [v]))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    bad = [", ".join(f"{a} imports {b} (line {line})" for a in comp for b, line in GRAPH[a].items() if b in comp)
           for comp in _cycles()]
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_cycle_finder_finds_a_cycle():
    global GRAPH
    saved, GRAPH = GRAPH, {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    try:
        assert _cycles() == [["a", "b", "c"]]
        assert _reach("d", {"c"}) == ["d (line 4) -> a (line 1) -> b (line 2) -> c"]
    finally:
        GRAPH = saved
