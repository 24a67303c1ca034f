"""The optimiser side every learner shares: AdamW, the frozen StableOPD reference, and one optimiser step.

The one idea: a learner owns its forward (how its logits and loss are computed: the toy learner's [N, V] logits,
the FSDP2 learner's chunked head over ranks) and composes the rest from here. `apply_gradients`, on the
gradients already in the model,
    clips them to `grad_clip` (the norm of an FSDP2 model is a DTensor: made a full tensor first),
    raises `FloatingPointError` on a non-finite loss or gradient norm *before* the optimiser touches the
        weights, so the caller's last checkpoint stays the last good state,
    warms the learning rate up linearly over the first `warmup_steps` learner versions (lr_v = lr · min(1,
        (v + 1) / warmup_steps), from the batch's version v, so a resumed run continues the same schedule),
    scales the learning rate by the estimator's `ess_frac` under VCPO (lr_t = lr · ESS/N),
    steps the optimiser, and returns the step's metrics.
"""

from __future__ import annotations

import copy

import torch

from asyncopd.objective import ObjectiveConfig


def check_hyperparameters(owner: str, *, lr: float, grad_clip: float, weight_decay: float,
                          warmup_steps: int = 0) -> None:
    if lr <= 0 or grad_clip <= 0 or weight_decay < 0 or warmup_steps < 0:
        raise ValueError(f"{owner} needs lr > 0, grad_clip > 0, weight_decay >= 0, warmup_steps >= 0; got lr={lr}, "
                         f"grad_clip={grad_clip}, weight_decay={weight_decay}, warmup_steps={warmup_steps}")


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `model.parameters()` (after FSDP2 sharding: over the shards)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def frozen_reference(model: torch.nn.Module, objective: ObjectiveConfig) -> torch.nn.Module | None:
    """StableOPD's reference: a frozen copy of the student as it is now (the initial student), or None when the
    objective has no divergence to it (`ref_kl_coef` = 0)."""
    return copy.deepcopy(model).eval().requires_grad_(False) if objective.ref_kl_coef > 0 else None


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, metrics: dict, *,
                    lr: float, grad_clip: float, vcpo_lr: bool, version: int, n_tokens: int,
                    warmup_steps: int = 0) -> dict[str, float]:
    """Clip, check, and take the optimiser step on the gradients already in `model` (see the module doc)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP2: DTensor
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) "
                                 f"at learner version {version}")
    lr = lr * min(1.0, (version + 1) / warmup_steps) if warmup_steps else lr
    lr = lr * metrics.get("ess_frac", 1.0) if vcpo_lr else lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "n_tokens": n_tokens, **metrics}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as detached clones (FSDP2 shards gathered into full tensors, on every rank): what a
    learner publishes to rollout engines or keeps in the ring."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
