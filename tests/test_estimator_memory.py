"""Estimator memory, counted deterministically: every tensor allocated during forward + backward, by a
TorchDispatchMode (no timing, no RSS). The chunked estimators allocate exactly one [N, V] tensor (the
gradient) and nothing else larger than one fp32 [rows, V] chunk block; the unchunked reference (chunk_size=0)
allocates several, which shows that the probe sees them. benchmarks/loss_memory.py measures the same in bytes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from asyncopd.config import chunk_rows
from asyncopd.estimators import (forward_kl_exact, forward_kl_topk, logit_grad_sq, reverse_kl_exact, reverse_kl_mc,
                                 reverse_kl_topk, token_logp)
from asyncopd.objective import ObjectiveConfig, opd_loss

N, V, K, ROWS = 64, 500, 8, 4
BLOCK = ROWS * V * 4                         # bytes of one fp32 [ROWS, V] chunk block
GRAD = N * V * 4                             # bytes of the [N, V] fp32 gradient


class AllocationProbe(TorchDispatchMode):
    """Records the bytes of every new storage an op returns: not views of an input, not in-place or out=
    results (their storage is an argument's)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 2
    teacher = torch.randn(N, V, generator=g) * 2
    logq, ids = torch.log_softmax(teacher, -1).topk(K, -1)
    mask = torch.rand(N, generator=g) > 0.2
    return logits, teacher, ids, logq, mask


CALLS = {
    "forward_kl_topk/bucket": lambda x, t, ids, lq, m, c: forward_kl_topk(x, ids, lq, m, chunk_size=c).loss,
    "forward_kl_topk/renorm": lambda x, t, ids, lq, m, c: forward_kl_topk(x, ids, lq, m, tail="renorm", chunk_size=c).loss,
    "forward_kl_topk/none": lambda x, t, ids, lq, m, c: forward_kl_topk(x, ids, lq, m, tail="none", chunk_size=c).loss,
    "reverse_kl_topk/bucket": lambda x, t, ids, lq, m, c: reverse_kl_topk(x, ids, lq, m, chunk_size=c).loss,
    "reverse_kl_mc": lambda x, t, ids, lq, m, c: reverse_kl_mc(x, ids[:, :4], lq[:, :4], m, chunk_size=c).loss,
    "token_logp": lambda x, t, ids, lq, m, c: token_logp(x, ids[:, 0], m, chunk_size=c).sum(),
    "forward_kl_exact": lambda x, t, ids, lq, m, c: forward_kl_exact(x, t, m, chunk_size=c).loss,
    "reverse_kl_exact": lambda x, t, ids, lq, m, c: reverse_kl_exact(x, t, m, chunk_size=c).loss,
}


def allocations(call, chunk_size):
    logits, teacher, ids, logq, mask = inputs()
    x = logits.requires_grad_(True)
    with AllocationProbe() as probe:
        call(x, teacher, ids, logq, mask, chunk_size).backward()
    return sorted(probe.sizes, reverse=True), x.grad


@pytest.mark.parametrize("name", list(CALLS))
def test_chunked_allocates_one_gradient_and_chunk_sized_temporaries(name):
    sizes, grad = allocations(CALLS[name], ROWS)
    assert sizes[0] == GRAD and sizes[1] <= BLOCK, sizes[:4]
    ref_sizes, ref_grad = allocations(CALLS[name], 0)          # the unchunked reference: same gradient ...
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert sum(s >= GRAD for s in ref_sizes) >= 2, ref_sizes[:4]  # ... and [N, V] temporaries the probe sees


def test_default_chunk_is_sized_by_bytes():
    assert chunk_rows(V, BLOCK) == ROWS and chunk_rows(V, BLOCK - 1) == ROWS - 1 and chunk_rows(10**9, 1) == 1
    assert chunk_rows(32768) == 256                             # DEFAULT_CHUNK_BYTES = 32 MiB


@pytest.mark.parametrize("estimator, extra", [("forward_kl_topk", {}), ("reverse_kl_topk", {}),
                                              ("reverse_kl_mc", {"n_samples": 4}),
                                              ("reverse_kl_sampled", {"baseline": "vcpo", "correction": "tis"})])
def test_objective_chunk_bytes_bounds_every_temporary(estimator, extra):
    logits, teacher, ids, logq, mask = inputs(seed=1)
    cache = {"topk_ids": ids, "topk_logp": logq, "sample_ids": ids[:, :4], "sample_logp": logq[:, :4],
             "teacher_logp": logq[:, 0]}
    cfg = ObjectiveConfig(estimator, topk=K, chunk_bytes=BLOCK, **extra)
    x = logits.requires_grad_(True)
    with AllocationProbe() as probe:
        opd_loss(cfg, x, ids[:, 0], cache, mask, behav_logp=logq[:, 0] + 0.1).loss.backward()
    sizes = sorted(probe.sizes, reverse=True)
    assert sizes[0] == GRAD and sizes[1] <= BLOCK, sizes[:4]


def test_logit_grad_sq_chunks_and_unchunked_agree():
    logits, _, ids, _, mask = inputs(seed=2)
    with AllocationProbe() as probe:
        chunked = logit_grad_sq(logits, ids[:, 0], mask, chunk_size=ROWS)
    assert max(probe.sizes) <= BLOCK
    assert torch.allclose(chunked, logit_grad_sq(logits, ids[:, 0], mask, chunk_size=0), atol=1e-6)
