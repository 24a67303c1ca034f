"""Weight sync from the learner to the rollout engines: a bucketed broadcast over torch.distributed.

The one idea: every tensor is viewed as raw bytes (`Tensor.view(torch.uint8)`, any dtype, bf16 and NaN payloads
included), tensors are packed in order into buckets of at most `bucket_bytes` (a larger tensor travels alone),
and each bucket is one `torch.distributed.broadcast` of a uint8 tensor from the learner's rank. Receivers cut
the buckets back into tensors with the layout the sender announced first (names, dtypes, shapes: one
`broadcast_object_list`), so what arrives is bit-identical to what was sent. Few large collectives instead of
one per tensor: a 1.7B model has ~300 tensors, and each collective has a fixed latency.

Backend: NCCL (tensors on the current CUDA device) or gloo (CPU), whatever the process group uses. The caller
records the returned `SyncStats` (bytes, seconds, buckets) as a `weight_sync` trace event.

`SyncGroup` is a gloo group outside torch.distributed's default group (a TCPStore and a `ProcessGroupGloo` of
its own, as vLLM's `StatelessProcessGroup` and verl's weight-sync groups do): the Ray run's learner and rollout
actors join one beside whatever default group their process has: vLLM initialises a one-rank default group in
every process that runs an engine in-process, and the FSDP2 learner has its own.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from backends.config import DEFAULT_BUCKET_BYTES   # ray.sync_bucket_bytes' default, defined torch-free there


@dataclass(frozen=True)
class SyncStats:
    bytes: int          # payload bytes broadcast (the sum of the tensors' sizes)
    seconds: float      # wall time of the whole sync on this rank, layout included
    buckets: int        # broadcast calls for the payload


class SyncGroup:
    """A gloo group of `world` ranks outside the default process group. Rank 0 hosts the TCPStore at
    `init_method` (tcp://<host>:<port>); every rank calls the constructor, which returns once all have joined."""

    def __init__(self, init_method: str, rank: int, world: int, timeout_s: float = 300.0):
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(f"SyncGroup needs init_method tcp://<host>:<port>, got {init_method!r}")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world = rank, world
        self.store = dist.TCPStore(url.hostname, url.port, world, is_master=rank == 0, timeout=timeout)
        self.pg = dist.ProcessGroupGloo(self.store, rank, world, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def broadcast_object(self, obj, src: int):
        """`obj` from rank src (pickled; only live processes of one run exchange it), returned on every rank."""
        payload = pickle.dumps(obj) if self.rank == src else b""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self.broadcast(size, src)
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == src
                else torch.empty(int(size), dtype=torch.uint8))
        self.broadcast(data, src)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())


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
    """Broadcast `state` (given on rank `src`, None elsewhere) to every rank of `group` (a torch.distributed
    group, None = the default one, or a `SyncGroup`). Returns the state dict
    (on src: `state` itself; elsewhere: new CPU tensors, or CUDA tensors with NCCL) and this rank's SyncStats."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    t0 = time.perf_counter()
    stateless = isinstance(group, SyncGroup)
    rank = group.rank if stateless else dist.get_rank(group) if group is not None else dist.get_rank()
    is_src = rank == src
    if is_src and state is None:
        raise ValueError(f"broadcast_state_dict: rank {rank} is the source and needs a state dict")
    if stateless:
        device, bcast = "cpu", group.broadcast
        layout = group.broadcast_object(_layout(state) if is_src else None, src)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        meta = [_layout(state) if is_src else None]
        dist.broadcast_object_list(meta, src=src, group=group)
        layout = meta[0]

        def bcast(tensor, src):
            dist.broadcast(tensor, src=src, group=group)
    out: dict[str, torch.Tensor] = {}
    buckets = _buckets(layout, bucket_bytes)
    for idx in buckets:
        size = sum(layout[i][3] for i in idx)
        if is_src:
            flat = torch.cat([state[layout[i][0]].detach().contiguous().reshape(-1).view(torch.uint8).to(device)
                              for i in idx])
        else:
            flat = torch.empty(size, dtype=torch.uint8, device=device)
        bcast(flat, src)
        if not is_src:
            offset = 0
            for i in idx:
                name, dtype, shape, n = layout[i]
                out[name] = flat[offset:offset + n].clone().view(dtype).reshape(shape)
                offset += n
    stats = SyncStats(bytes=sum(n for *_, n in layout), seconds=time.perf_counter() - t0, buckets=len(buckets))
    return (state if is_src else out), stats
