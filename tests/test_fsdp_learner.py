"""FSDP2 learner: the chunked lm head matches the unchunked objective (one process); 2 gloo ranks match one
process, global batch statistics included; bf16 compute keeps fp32 master weights; checkpoints resume exactly."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from transformers import GPT2Config, GPT2LMHeadModel

from asyncopd.objective import TRAINABLE, ObjectiveConfig, cache_layout, opd_loss
from asyncopd.rollout import Batch
from backends import checkpoint
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_teacher import ToyTeacher
from backends.vllm_fsdp import fsdp_checkpoint
from backends.vllm_fsdp.chunked_head import chunked_opd_loss
from backends.vllm_fsdp.fsdp_learner import FSDPLearner

V, LR = 11, 1e-2
OBJECTIVES = {   # every TRAINABLE estimator, and the corrections whose statistics span the whole batch
    "forward_kl_topk": ObjectiveConfig("forward_kl_topk", topk=4),
    "reverse_kl_topk": ObjectiveConfig("reverse_kl_topk", topk=4, tail="renorm"),
    "reverse_kl_sampled_m2po": ObjectiveConfig("reverse_kl_sampled", signal="stale", correction="m2po", m2po_tau=0.01,
                                               baseline="vcpo"),
    "reverse_kl_sampled_tis": ObjectiveConfig("reverse_kl_sampled", correction="tis", is_cap=1.1),
    "reverse_kl_mc": ObjectiveConfig("reverse_kl_mc", n_samples=4),
    "forward_kl_topk_ref": ObjectiveConfig("forward_kl_topk", topk=4, ref_kl_coef=0.5),
}
assert {o.estimator for o in OBJECTIVES.values()} == set(TRAINABLE)


def model(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=V - 1)
    return GPT2LMHeadModel(cfg)


def batch_and_scores(objective):
    """7 trajectories (uneven over 2 ranks) sampled by model(2), a stale behaviour policy for the learner's
    model(0): importance ratios ≠ 1, so IS, M2PO and ESS have work to do. Teacher: model(1)."""
    engine = ToyRolloutEngine(model(2), max_batch=8, max_new_tokens=7, eos_id=V - 1, seed=3, capture_samples=4)
    prompts = [torch.tensor([1, 2, 3, 4][:n]) for n in (1, 2, 3, 4, 2, 1, 3)]
    trajs = engine.generate(prompts, list(range(7)))
    topk, M = cache_layout(objective)
    return Batch(trajs, version=0), ToyTeacher(model(1)).score(trajs, topk=topk, n_samples=M)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads(m):
    return {n: full(p.grad).detach().clone() for n, p in m.named_parameters()}


def assert_metrics_match(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), k


# --- one process: the chunked lm head gives opd_loss's loss, gradients and metrics ----------------------

def hand_built_inputs(N=12, H=8, M=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (0.5 * torch.randn(N, H, generator=g)).requires_grad_(True)      # logits ~ N(0, 2)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (N,), generator=g)
    teacher = torch.log_softmax(2 * torch.randn(N, V, generator=g), -1)
    top = teacher.topk(4, -1)
    sample_ids = torch.randint(0, V, (N, M), generator=g)
    cache = dict(teacher_logp=teacher.gather(1, ids[:, None]).squeeze(1), topk_ids=top.indices,
                 topk_logp=top.values, sample_ids=sample_ids, sample_logp=teacher.gather(1, sample_ids),
                 sampler_logp=torch.log_softmax(torch.randn(N, V, generator=g), -1).gather(1, sample_ids))
    theta = torch.log_softmax(hidden.detach() @ weight.detach().T, -1).gather(1, ids[:, None]).squeeze(1)
    behav = (theta + 0.15 * torch.randn(N, generator=g)).clamp_max(0)     # near the student: M2PO keeps some
    ref = (theta + 0.3 * torch.randn(N, generator=g)).clamp_max(0)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[2, 3, 4, 9]] = False                  # with chunk 3 or 1, a whole chunk is masked out
    return hidden, weight, ids, cache, mask, behav, ref


@pytest.mark.parametrize("chunk", [1, 3, 5, 12])            # N = 12: 3 divides it, 5 does not
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_chunked_opd_loss_matches_opd_loss(name, chunk):
    cfg = OBJECTIVES[name]
    hidden, weight, ids, cache, mask, behav, ref = hand_built_inputs()
    want = opd_loss(cfg, hidden @ weight.T, ids, cache, mask, behav_logp=behav, ref_logp=ref)
    want_grads = torch.autograd.grad(want.loss, (hidden, weight))
    got = chunked_opd_loss(cfg, hidden, weight, ids, cache, mask, behav_logp=behav, ref_logp=ref, chunk_tokens=chunk)
    got_grads = torch.autograd.grad(got.loss, (hidden, weight))
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6, abs=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-6, rtol=0)
    assert_metrics_match(got.metrics, want.metrics)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_chunked_learner_matches_toy_learner(name):
    objective = OBJECTIVES[name]
    batch, scores = batch_and_scores(objective)
    toy = ToyLearner(model(0), objective, lr=LR, pad_id=0, grad_clip=1e9, vcpo_lr=True)
    want, want_grads = toy.step(batch, scores), grads(toy.model)
    N = want["n_tokens"]
    divides = next(c for c in range(2, N + 1) if N % c == 0)
    for chunk in (divides, 5 if N % 5 else 7):
        learner = FSDPLearner(model(0), objective, lr=LR, pad_id=0, grad_clip=1e9, vcpo_lr=True,
                              head_chunk_tokens=chunk)
        got = learner.step(batch, scores)
        assert_metrics_match(got, want)
        for n, g in grads(learner.model.lm).items():
            assert torch.allclose(g, want_grads[n], atol=1e-6, rtol=0), (chunk, n)


def test_learner_options_are_validated():
    objective = OBJECTIVES["forward_kl_topk"]
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        FSDPLearner(model(0), objective, lr=LR, pad_id=0, mixed_precision="fp16")
    with pytest.raises(ValueError, match="mixed_precision='bf16' needs an initialised process group"):
        FSDPLearner(model(0), objective, lr=LR, pad_id=0, mixed_precision="bf16")
    with pytest.raises(ValueError, match="head_chunk_tokens must be >= 1"):
        FSDPLearner(model(0), objective, lr=LR, pad_id=0, head_chunk_tokens=0)


# --- two gloo ranks: one spawn runs every check, the tests read its results ------------------------------

TWO_RANK = ("forward_kl_topk", "reverse_kl_sampled_m2po")      # a vocabulary estimator; batch statistics
RESUME = OBJECTIVES["reverse_kl_sampled_m2po"]


def _record(learner, metrics):
    return dict(metrics=metrics, grads=grads(learner.model.lm), weights=learner.state_dict())


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-a", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name in TWO_RANK:                                       # fp32: parity with one process, two steps
        batch, scores = batch_and_scores(OBJECTIVES[name])
        learner = FSDPLearner(model(0), OBJECTIVES[name], lr=LR, pad_id=0, grad_clip=1e9, vcpo_lr=True,
                              head_chunk_tokens=5, mesh=mesh)
        out[name] = [_record(learner, learner.step(batch, scores)) for _ in range(2)]
    batch, scores = batch_and_scores(OBJECTIVES["forward_kl_topk"])   # bf16 compute, fp32 master weights
    learner = FSDPLearner(model(0), OBJECTIVES["forward_kl_topk"], lr=LR, pad_id=0, grad_clip=1e9,
                          mixed_precision="bf16", head_chunk_tokens=5, mesh=mesh)
    out["bf16"] = _record(learner, learner.step(batch, scores))
    out["bf16"].update(param_dtypes={p.dtype for p in learner.model.parameters()},
                       optim_dtypes={v.dtype for st in learner.optimizer.state.values() for v in st.values()})

    batch, scores = batch_and_scores(RESUME)                    # resume: 3 steps vs 2 + checkpoint + 1
    kw = dict(lr=LR, pad_id=0, grad_clip=1e9, vcpo_lr=True, mixed_precision="bf16", head_chunk_tokens=5)
    learner = FSDPLearner(model(0), RESUME, mesh=mesh, **kw)
    for _ in range(3):
        learner.step(batch, scores)
    out["straight"] = learner.state_dict()
    learner = FSDPLearner(model(0), RESUME, mesh=mesh, **kw)
    for _ in range(2):
        learner.step(batch, scores)
    out["at_checkpoint"] = learner.state_dict()
    fsdp_checkpoint.save(tmp / "ckpt", learner.model.lm, learner.optimizer, version=2,
                         state={"config_digest": "test"})
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-b", rank=rank, world_size=world)
    learner = FSDPLearner(model(5), RESUME, mesh=init_device_mesh("cpu", (world,)), **kw)   # other init weights
    _, out["state"] = fsdp_checkpoint.load(checkpoint.latest(tmp / "ckpt"), learner.model.lm, learner.optimizer)
    learner.step(batch, scores)
    out["resumed"] = learner.state_dict()
    torch.save(out, tmp / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(2, tmp), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", TWO_RANK)
def test_two_ranks_match_one_process(two_ranks, name):
    _, ranks = two_ranks
    batch, scores = batch_and_scores(OBJECTIVES[name])
    toy = ToyLearner(model(0), OBJECTIVES[name], lr=LR, pad_id=0, grad_clip=1e9, vcpo_lr=True)
    for step in range(2):
        want = toy.step(batch, scores)
        for got in (r[name][step] for r in ranks):           # every rank reports the whole batch's metrics
            assert_metrics_match(got["metrics"], want)
            for n, p in toy.model.named_parameters():
                assert torch.allclose(got["grads"][n], p.grad, atol=1e-6, rtol=0), (step, n)
                # AdamW moves a weight by ~lr·g/(|g| + 1e-8): rounding of a gradient near 1e-8 shows as up to ~lr/1000
                assert torch.allclose(got["weights"][n], p.detach(), atol=1e-4, rtol=0), (step, n)
    if name == "reverse_kl_sampled_m2po":                      # the batch statistics had work to do
        assert 0 < want["clip_frac"] < 1 and want["lr"] < LR


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights(two_ranks):
    """bf16 has an 8-bit significand: unit roundoff u = 2^-8 ≈ 3.9e-3, ε = 2^-7. The fp32 runs above agree to
    ~1e-7 relative, so a gradient error between 1e-4 and 8u = 2^-5 is bf16 arithmetic, and only that."""
    _, ranks = two_ranks
    got, want = ranks[0]["bf16"], ranks[0]["forward_kl_topk"][0]     # the same first step in fp32
    assert got["param_dtypes"] == {torch.float32} and got["optim_dtypes"] == {torch.float32}
    assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=2**-7)   # measured: 1.7e-4
    g, w = (torch.cat([r["grads"][n].flatten() for n in want["grads"]]) for r in (got, want))
    assert 1e-4 < (g - w).norm() / w.norm() < 2**-5                                     # measured: 4.5e-3
    # AdamW's first step is −lr·g/(|g| + 1e-8) ≈ −lr·sign(g): bf16 and fp32 move a weight the same way unless
    # bf16 rounding flips the sign of its gradient, which only a gradient within rounding of 0 can do
    start = model(0).state_dict()
    d_bf16, d_fp32 = (torch.cat([(r["weights"][n] - start[n]).flatten() for n in start]) for r in (got, want))
    assert d_bf16.abs().max() <= LR * (1 + 1e-6)
    assert (d_bf16.sign() == d_fp32.sign()).float().mean() >= 0.98                     # measured: 0.995


@pytest.mark.slow
def test_resume_from_checkpoint_is_bit_identical(two_ranks):
    tmp, ranks = two_ranks
    for r in ranks:
        assert r["state"] == {"config_digest": "test", "version": 2}
        assert r["straight"].keys() == r["resumed"].keys()
        for n, w in r["straight"].items():
            assert torch.equal(r["resumed"][n], w), n
    # the files are the toy backend's: a toy learner on the unsharded model loads them as they are
    toy = ToyLearner(model(9), RESUME, lr=LR, pad_id=0)
    toy.step(*batch_and_scores(RESUME))                        # AdamW state exists, to be overwritten
    checkpoint.load(checkpoint.latest(tmp / "ckpt"), model=toy.model, optimizer=toy.optimizer)
    for n, w in toy.model.state_dict().items():
        assert w.dtype == torch.float32 and torch.equal(w, ranks[0]["at_checkpoint"][n]), n
    assert {int(st["step"]) for st in toy.optimizer.state.values()} == {2}
