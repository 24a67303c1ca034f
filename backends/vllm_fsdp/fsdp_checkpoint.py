"""Checkpoints of the FSDP2 learner in the toy backend's layout, so that a resumed run continues exactly.

It takes the learner's Hugging Face model (`learner.model.lm`, FSDP2-sharded or not) and its optimiser, never
the learner: fsdp_learner.py imports this module, not the other way round.

The one idea: gather the sharded fp32 master weights and AdamW state into full state dicts
(`torch.distributed.checkpoint.state_dict.get_state_dict`, full_state_dict=True, cpu_offload=True: only rank 0
receives them), and let rank 0 hand them to `backends.checkpoint.save`, which writes the same files a toy run
writes (student.safetensors, optimizer.safetensors, ring.safetensors, state.json) under the same atomic
`latest` switch. Every rank then reads the files back with `backends.checkpoint.load` and
`set_state_dict(full_state_dict=True)` cuts its own shards out of them.

The optimiser's full state dict names parameters by their fully qualified name; the files keep torch.optim's
layout, where a parameter is its index in `model.parameters()` order, so a toy learner on the unsharded model
can load an FSDP checkpoint and the other way round. Weights are stored under the Hugging Face model's names
(the `lm.` of `ChunkedHeadModel` removed), in fp32 whatever the compute dtype.

Exactness: restoring weights, moments and step counts bit for bit makes the next step bit-identical to an
uninterrupted run on the same world size (tests/test_fsdp_learner.py, 2 gloo ranks).

    fsdp_checkpoint.save(root, lm, optimizer, version=v, state={"config_digest": d})   # every rank calls it
    ring, state = fsdp_checkpoint.load(checkpoint.latest(root), lm, optimizer)          # every rank calls it
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from backends import checkpoint


class _StateDicts:
    """Stands in for a module or an optimiser in backends.checkpoint, which only calls state_dict() (save)
    and load_state_dict() (load): it hands over, or keeps, plain state dicts."""

    def __init__(self, sd: dict | None = None):
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd

    def load_state_dict(self, sd: dict) -> None:
        self.sd = sd


def _param_names(model: torch.nn.Module) -> list[str]:
    """Fully qualified names in optimiser order (model.parameters(), a tied weight once under its first name)."""
    return [name for name, _ in model.named_parameters()]


def _optim_by_index(osd: dict, names: list[str]) -> dict:
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: st for name, st in osd["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in osd["param_groups"]]}


def _optim_by_name(osd: dict, names: list[str]) -> dict:
    return {"state": {names[i]: st for i, st in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


def save(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, version: int, state: dict,
         ring: dict | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """Gather the full state of `model` (the HF model) and `optimizer` and write checkpoint `version` under `root`
    from rank 0 (collective: every rank calls it; returns after the checkpoint is complete on disk). Returns its
    directory."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    path = root / f"ckpt-{version:06d}"
    if dist.get_rank() == 0:
        path = checkpoint.save(root, version=version, model=_StateDicts(model_sd),
                               optimizer=_StateDicts(_optim_by_index(optim_sd, _param_names(model))),
                               ring=ring or {}, state=state, extra=extra)
    dist.barrier()                                       # no rank reads or moves on before the files exist
    return path


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore the weights of `model` (the HF model) and the state of `optimizer` from checkpoint directory
    `path` (collective: every rank calls it and reads the files). Returns (ring, state) like
    backends.checkpoint.load."""
    model_sd, optim_sd = _StateDicts(), _StateDicts()
    ring, state = checkpoint.load(path, model=model_sd, optimizer=optim_sd)
    set_state_dict(model, optimizer, model_state_dict=model_sd.sd,
                   optim_state_dict=_optim_by_name(optim_sd.sd, _param_names(model)),
                   options=StateDictOptions(full_state_dict=True))
    return ring, state


def resume(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, digest: str):
    """backends.checkpoint.resume for a sharded model (collective): restore the newest loadable checkpoint under
    `root` written by a config with this `digest` and return (path, ring, state), or None if there is none.
    Every rank reads the same files, so every rank skips the same damaged ones."""
    return checkpoint.first_loadable(root, lambda path: load(path, model, optimizer), digest)
