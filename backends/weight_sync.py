"""Weight sync from the learner to the rollout engines: a bucketed broadcast over torch.distributed.

The one idea: every tensor is viewed as raw bytes (`Tensor.view(torch.uint8)`, any dtype, bf16 and NaN payloads
included), tensors are packed in order into buckets of at most `bucket_bytes` (a larger tensor travels alone),
and each bucket is one `torch.distributed.broadcast` of a uint8 tensor from the learner's rank. Receivers cut
the buckets back into tensors with the layout the sender announced first (names, dtypes, shapes: one
`broadcast_object_list`), so what arrives is bit-identical to what was sent. Few large collectives instead of
one per tensor: a 1.7B model has ~300 tensors, and each collective has a fixed latency.

Backend: NCCL (tensors on the current CUDA device) or gloo (CPU), whatever the process group uses. The caller
records the returned `SyncStats` (bytes, seconds, buckets) as a `weight_sync` trace event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from backends.config import DEFAULT_BUCKET_BYTES   # ray.sync_bucket_bytes' default, defined torch-free there


@dataclass(frozen=True)
class SyncStats:
    bytes: int          # payload bytes broadcast (the sum of the tensors' sizes)
    seconds: float      # wall time of the whole sync on this rank, layout included
    buckets: int        # broadcast calls for the payload


def _layout(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    return [(k, v.dtype, tuple(v.shape), v.numel() * v.element_size()) for k, v in state.items()]


def _buckets(layout, bucket_bytes: int) -> list[list[int]]:
    """Indices of the tensors in each bucket: in order, a bucket closes before it would exceed bucket_bytes."""
    out, cur, size = [], [], 0
    for i, (*_, n) in enumerate(layout):
        if cur and size + n > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    return out + [cur] if cur else out


def broadcast_state_dict(state: dict[str, torch.Tensor] | None, *, src: int = 0, group=None,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[dict[str, torch.Tensor], SyncStats]:
    """Broadcast `state` (given on rank `src`, None elsewhere) to every rank of `group`. Returns the state dict
    (on src: `state` itself; elsewhere: new CPU tensors, or CUDA tensors with NCCL) and this rank's SyncStats."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    t0 = time.perf_counter()
    rank = dist.get_rank(group) if group is not None else dist.get_rank()
    is_src = rank == src
    if is_src and state is None:
        raise ValueError(f"broadcast_state_dict: rank {rank} is the source and needs a state dict")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    meta = [_layout(state) if is_src else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    layout = meta[0]
    out: dict[str, torch.Tensor] = {}
    buckets = _buckets(layout, bucket_bytes)
    for idx in buckets:
        size = sum(layout[i][3] for i in idx)
        if is_src:
            flat = torch.cat([state[layout[i][0]].detach().contiguous().reshape(-1).view(torch.uint8).to(device)
                              for i in idx])
        else:
            flat = torch.empty(size, dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=src, group=group)
        if not is_src:
            offset = 0
            for i in idx:
                name, dtype, shape, n = layout[i]
                out[name] = flat[offset:offset + n].clone().view(dtype).reshape(shape)
                offset += n
    stats = SyncStats(bytes=sum(n for *_, n in layout), seconds=time.perf_counter() - t0, buckets=len(buckets))
    return (state if is_src else out), stats
