"""Checkpoints that survive `kill -9` at any instant: safetensors tensors, a JSON state, and a `latest` pointer.

A checkpoint is a directory `ckpt-<version>/` holding
    student.safetensors     the student's weights
    optimizer.safetensors   the optimiser's per-parameter state (AdamW moments and step counts)
    ring.safetensors        past weight versions a lockstep run still samples from (fixed:k keeps k+1)
    state.json              everything else: version, optimiser hyper-parameters, counters, config digest
It is written completely under a temporary name, renamed into place, and only then does the one-line file
`latest` switch to it (write + os.replace). A crash leaves either the previous checkpoint or the new one
readable, never a mix; older directories are deleted after the switch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in root.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
    """Restore model and optimizer in place from checkpoint directory `path`; returns (ring, state)."""
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(path / "student.safetensors"))
    optimizer.load_state_dict(_unflat_optimizer(load_file(path / "optimizer.safetensors"), state.pop("optimizer")))
    ring: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in load_file(path / "ring.safetensors").items():
        v, k = name.split("/", 1)
        ring.setdefault(int(v), {})[k] = t
    return ring, state


def resume(root: Path, *, digest: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Restore the latest checkpoint under `root` written by a config with this `digest`: (path, ring, state),
    or None if there is none. A checkpoint of a different config raises ValueError (only steps may change)."""
    path = latest(root)
    if path is None:
        return None
    ring, state = load(path, model=model, optimizer=optimizer)
    check_digest(path, state, digest)
    return path, ring, state


def check_digest(path: Path, state: dict, digest: str) -> None:
    """Refuse to resume from a checkpoint whose state.json names another config."""
    if state["config_digest"] != digest:
        raise ValueError(f"resume: {path} was written by a different config (digest {state['config_digest']} "
                         f"!= {digest}); only steps may change on resume")
