"""Checkpoints that survive `kill -9` at any instant: safetensors tensors, a JSON state, and a `latest` pointer.

A checkpoint is a directory `ckpt-<version>/` holding
    student.safetensors     the student's weights
    optimizer.safetensors   the optimiser's per-parameter state (AdamW moments and step counts)
    ring.safetensors        past weight versions a lockstep run still samples from (fixed:k keeps k+1)
    state.json              everything else: version, optimiser hyper-parameters, counters, config digest
It is written completely under a temporary name, verified (every safetensors file's header read back, its
size checked against the header, state.json parsed), renamed into place, and only then does the one-line file
`latest` switch to it (write + os.replace). A crash leaves either the previous checkpoint or the new one
readable, never a mix. `prune` keeps the newest `keep` checkpoints (the run's keep_checkpoints, default 3).

Reading trusts nothing: safetensors and JSON only (nothing in a checkpoint is unpickled or executed), and a
damaged file (truncated, unreadable, missing) raises `CheckpointError` naming it. `resume` tries the
checkpoint `latest` names, then the older ones, newest first, and says which damaged file it skipped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
FILES = ("student.safetensors", "optimizer.safetensors", "ring.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint file is missing or damaged; the message names the file."""


def verify(path: Path) -> None:
    """Read back what a checkpoint directory must hold: each safetensors header (and the file size it implies)
    and state.json. Raises CheckpointError naming the first bad file."""
    for name in FILES:
        f = path / name
        try:
            if name.endswith(".json"):
                json.loads(f.read_text())
                continue
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
            with open(f, "rb") as fh:
                header = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(header))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if f.stat().st_size != 8 + header + end or len(keys) != len(meta) - ("__metadata__" in meta):
                raise CheckpointError(f"{f}: size {f.stat().st_size} B, the header describes {8 + header + end} B")
        except CheckpointError:
            raise
        except (OSError, ValueError, SafetensorError, KeyError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{f}: {type(err).__name__}: {err}") from None


def _flat_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat named tensors (safetensors) plus the JSON-able rest (param_groups)."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent contiguous copies (safetensors refuses tensors that share storage, e.g. tied embeddings)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


def save(root: Path, *, version: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         ring: dict[int, dict[str, torch.Tensor]], state: dict, extra: dict[str, bytes] | None = None) -> Path:
    """Write checkpoint `version` under `root` atomically and make it the latest. Returns its directory.
    `extra` files (name -> bytes) are written into the same directory, under the same atomic switch."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"ckpt-{version:06d}", root / f"ckpt-{version:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(model.state_dict()), tmp / "student.safetensors")
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({f"{v}/{k}": t for v, sd in ring.items() for k, t in _contiguous(sd).items()}, tmp / "ring.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "version": version, "optimizer": opt_meta}, indent=1))
    for name, data in (extra or {}).items():
        (tmp / name).write_bytes(data)
    for f in tmp.iterdir():                                   # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    verify(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    return final


def versions(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, newest first (the one `latest` names leads)."""
    found = sorted((p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp")),
                   key=lambda p: p.name, reverse=True)
    first = root / (root / "latest").read_text().strip() if (root / "latest").exists() else None
    return ([first] if first in found else []) + [p for p in found if p != first]


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names)."""
    for old in versions(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The directory the `latest` pointer names, or None if no checkpoint was ever completed."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise ValueError(f"checkpoint pointer {pointer} names {path}, which is incomplete or missing")
    return path


def load(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
         ) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """Restore model and optimizer in place from checkpoint directory `path` (verified first: a damaged file
    raises CheckpointError before anything is loaded); returns (ring, state)."""
    verify(path)
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(path / "student.safetensors"))
    optimizer.load_state_dict(_unflat_optimizer(load_file(path / "optimizer.safetensors"), state.pop("optimizer")))
    ring: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in load_file(path / "ring.safetensors").items():
        v, k = name.split("/", 1)
        ring.setdefault(int(v), {})[k] = t
    return ring, state


def resume(root: Path, *, digest: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Restore the newest loadable checkpoint under `root` written by a config with this `digest`: (path, ring,
    state), or None if there is none. A checkpoint of a different config raises ValueError (only steps may change)."""
    return first_loadable(root, lambda path: load(path, model=model, optimizer=optimizer), digest)


def first_loadable(root: Path, load_fn, digest: str):
    """(path, *load_fn(path)) for the newest checkpoint that loads, skipping damaged ones with a warning that
    names the bad file; None without checkpoints; CheckpointError when every one is damaged."""
    paths = versions(root) if root.exists() else []
    bad = []
    for path in paths:
        try:
            ring, state = load_fn(path)
        except CheckpointError as err:
            bad.append(str(err))
            log.warning("checkpoint %s is damaged (%s); falling back to an older one", path, err)
            continue
        check_digest(path, state, digest)
        if bad:
            log.warning("resuming from %s, the newest checkpoint that loads", path)
        return path, ring, state
    if bad:
        raise CheckpointError(f"no checkpoint under {root} loads: " + "; ".join(bad))
    return None


def check_digest(path: Path, state: dict, digest: str) -> None:
    """Refuse to resume from a checkpoint whose state.json names another config."""
    if state["config_digest"] != digest:
        raise ValueError(f"resume: {path} was written by a different config (digest {state['config_digest']} "
                         f"!= {digest}); only steps may change on resume")
