"""backends.weight_sync: a bucketed broadcast over gloo delivers bit-identical tensors (2 processes)."""

import hashlib
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backends.weight_sync import SyncGroup, _buckets, _layout, broadcast_state_dict


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bf = torch.randn(33, 7, generator=g).to(torch.bfloat16)
    bf[3, 2] = float("nan")
    return {"w": torch.randn(64, 40, generator=g),                    # 10,240 bytes: larger than a bucket
            "b": torch.randn(5, generator=g), "bf16": bf, "ids": torch.arange(-3, 9),
            "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 4),
            "mask": torch.tensor([True, False, True]), "t": torch.randn(8, 8, generator=g).t()}   # not contiguous


def digest(state) -> dict[str, list]:
    return {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8)
                                                              .numpy().tobytes()).hexdigest()]
            for k, v in state.items()}


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        state, stats = broadcast_state_dict(make_state() if rank == 0 else None, src=0, bucket_bytes=1000)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"digest": digest(state), "bytes": stats.bytes, "buckets": stats.buckets}, f)
    finally:
        dist.destroy_process_group()


def test_broadcast_is_bit_identical_across_two_processes(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["digest"] == r0["digest"] == digest(make_state())
    state = make_state()
    assert r0["bytes"] == r1["bytes"] == sum(v.numel() * v.element_size() for v in state.values())
    assert r0["buckets"] == r1["buckets"] == len(_buckets(_layout(state), 1000))


def _stateless_worker(rank: int, world: int, init: str, port: int, out_dir: str) -> None:
    """The Ray run's layout: every process already has a default group of its own (one rank, as vLLM and the
    FSDP2 learner make), and the sync group spans the processes beside it."""
    dist.init_process_group("gloo", init_method=f"{init}-{rank}", rank=0, world_size=1)
    try:
        group = SyncGroup(f"tcp://127.0.0.1:{port}", rank, world, timeout_s=60)
        state, stats = broadcast_state_dict(make_state() if rank == 0 else None, src=0, group=group,
                                            bucket_bytes=1000)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"digest": digest(state), "bytes": stats.bytes, "buckets": stats.buckets,
                       "default_world": dist.get_world_size()}, f)
    finally:
        dist.destroy_process_group()


def test_sync_group_broadcasts_beside_each_process_default_group(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_stateless_worker, args=(3, f"file://{tmp_path / 'rdzv'}", port, str(tmp_path)), nprocs=3, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert all(r["digest"] == digest(make_state()) for r in ranks)
    assert [r["default_world"] for r in ranks] == [1, 1, 1]          # the default groups were left alone
    assert {r["buckets"] for r in ranks} == {len(_buckets(_layout(make_state()), 1000))}


def test_sync_group_refuses_a_non_tcp_address():
    with pytest.raises(ValueError, match="tcp://<host>:<port>"):
        SyncGroup("file:///tmp/x", 0, 1)


def test_buckets_close_before_overflow_and_big_tensors_travel_alone():
    layout = [("a", torch.float32, (1,), n) for n in (400, 400, 300, 2000, 100, 0, 900)]
    # 400+400 | +300 overflows | 2000 alone | 100+0+900 = 1000 fits exactly
    assert _buckets(layout, 1000) == [[0, 1], [2], [3], [4, 5, 6]]
    assert _buckets(layout, 999) == [[0, 1], [2], [3], [4, 5], [6]]
    assert _buckets(layout, 10_000) == [list(range(7))]
    with pytest.raises(ValueError, match="bucket_bytes"):
        broadcast_state_dict({}, bucket_bytes=0)
