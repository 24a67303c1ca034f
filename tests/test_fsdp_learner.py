"""FSDP2 learner over 2 gloo processes: the same loss, gradients and updated weights as one process."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from transformers import GPT2Config, GPT2LMHeadModel

from asyncopd.objective import ObjectiveConfig, cache_layout
from asyncopd.rollout import Batch
from backends.toy_engine import ToyRolloutEngine
from backends.toy_learner import ToyLearner
from backends.toy_teacher import ToyTeacher
from backends.vllm_fsdp.fsdp_learner import FSDPLearner, shard_gpt2

V = 11
OBJECTIVES = {"forward_kl_topk": ObjectiveConfig("forward_kl_topk", topk=4),
              "reverse_kl_sampled": ObjectiveConfig("reverse_kl_sampled", signal="recompute")}


def model(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=V - 1)
    return GPT2LMHeadModel(cfg)


def batch_and_scores(objective):
    student, teacher = model(0), model(1)
    engine = ToyRolloutEngine(student, max_batch=8, max_new_tokens=7, eos_id=V - 1, seed=3, capture_samples=0)
    prompts = [torch.tensor([1, 2, 3, 4][:n]) for n in (1, 2, 3, 4, 2, 1, 3)]    # 7: uneven over 2 ranks
    trajs = engine.generate(prompts, list(range(7)))
    topk, M = cache_layout(objective)
    return Batch(trajs, version=0), ToyTeacher(teacher).score(trajs, topk=topk, n_samples=M)


def grads_and_weights(m):
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    return ({n: full(p.grad).tolist() for n, p in m.named_parameters()},
            {n: full(p.detach()).tolist() for n, p in m.named_parameters()})


def _worker(rank, world, init, out, name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        objective = OBJECTIVES[name]
        batch, scores = batch_and_scores(objective)
        m = shard_gpt2(model(0), mesh=init_device_mesh("cpu", (world,)))
        learner = FSDPLearner(m, objective, lr=1e-2, pad_id=0, grad_clip=1e9)
        metrics = learner.step(batch, scores)
        grads, weights = grads_and_weights(m)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"loss": metrics["loss"], "grads": grads, "weights": weights}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_ranks_match_one_process(tmp_path, name):
    out = tmp_path / "rank0.json"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(out), name), nprocs=2, join=True)
    got = json.loads(out.read_text())
    batch, scores = batch_and_scores(OBJECTIVES[name])
    single = model(0)
    metrics = ToyLearner(single, OBJECTIVES[name], lr=1e-2, pad_id=0, grad_clip=1e9).step(batch, scores)
    grads, weights = grads_and_weights(single)
    assert got["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    for n in grads:
        assert torch.allclose(torch.tensor(got["grads"][n]), torch.tensor(grads[n]), atol=1e-7), n
        assert torch.allclose(torch.tensor(got["weights"][n]), torch.tensor(weights[n]), atol=1e-6), n
