"""Learner-step memory: the FSDP learner's chunked lm head vs the toy learner's [N, V] logits, at a large vocabulary.

Both variants take one AdamW step of the same objective on the same synthetic batch (N response tokens, prompts
of 4 tokens) with the same GPT-2 student (vocabulary V, 2 layers x 64):
  unchunked  backends.toy_learner.ToyLearner: the HF forward returns logits for every position, the response
             rows are gathered into [N, V] fp32 and handed to the (row-chunked) estimator, which allocates the
             [N, V] gradient of those logits;
  chunked    backends.vllm_fsdp.fsdp_learner.FSDPLearner in one process (no process group, fp32): the forward
             stops at the final hidden states and the lm head runs `--chunk` tokens at a time under activation
             checkpointing, so a few [chunk, V] tensors exist at a time, in forward and backward (one run
             per `--chunks` size: the peak should scale with the chunk, not with N).
Each variant runs in its own fresh subprocess, after a warm-up step on a tiny batch (AdamW's state and lazily
loaded modules exist before measuring). Memory, as in benchmarks/loss_memory.py:
  CPU   peak RSS (VmHWM, reset through /proc/self/clear_refs when the kernel allows it, else ru_maxrss) minus
        the RSS before the step;
  CUDA  torch.cuda.max_memory_allocated() minus memory_allocated() before the step.
The two losses are printed side by side (they must agree to float rounding).

Deliberately left out: bf16 and sharding (they need a process group; tests/test_fsdp_learner.py covers them),
and tuning the time (the chunked path recomputes each chunk's logits in backward).

    python benchmarks/fsdp_head_memory.py                # N=4096, V=32768, forward_kl_topk k=64, chunks 1024 and 256
    python benchmarks/fsdp_head_memory.py --estimator reverse_kl_sampled --n 1024 --v 8192 --out /tmp/x.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from loss_memory import peak_rss_kib, reset_peak_rss, status_kib   # this folder: the same fresh-process peak RSS

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["impl", "device", "estimator", "n_tokens", "vocab", "k", "head_chunk_tokens", "logits_fp32_mib",
          "peak_extra_mib", "ratio_to_unchunked", "seconds", "loss", "rss_method"]
RESPONSE_LEN, PROMPT_LEN = 128, 4


# --- worker (one variant per process) ---------------------------------------------------------------------

def make_batch(n_traj: int, length: int, v: int, k: int, seed: int):
    """Random prompts/responses and a teacher cache with k distinct top ids per token (k = 0: sampled logp only)."""
    import torch

    from asyncopd.cache import TeacherScores
    from asyncopd.rollout import Batch, Trajectory
    g = torch.Generator().manual_seed(seed)
    trajs, scores = [], []
    for i in range(n_traj):
        response = torch.randint(1, v, (length,), generator=g)
        trajs.append(Trajectory(uid=i, behav_version=0, n_tokens=length, response_ids=response,
                                prompt_ids=torch.randint(1, v, (PROMPT_LEN,), generator=g),
                                behav_logp=-5 * torch.rand(length, generator=g)))
        top = {}
        if k:
            top = dict(topk_ids=torch.rand(length, v, generator=g).topk(k, -1).indices,
                       topk_logp=torch.log_softmax(2 * torch.randn(length, k + 1, generator=g), -1)[:, :k])
        scores.append(TeacherScores(sampled_logp=-5 * torch.rand(length, generator=g), **top))
    return Batch(trajs, version=0), scores


def worker(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from transformers import GPT2Config, GPT2LMHeadModel

    from asyncopd.objective import ObjectiveConfig, cache_layout
    from backends.toy_learner import ToyLearner
    from backends.vllm_fsdp.fsdp_learner import FSDPLearner

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=args.v, n_positions=RESPONSE_LEN + PROMPT_LEN, n_embd=64, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=args.v - 1)
    model = GPT2LMHeadModel(cfg).to(device)
    objective = ObjectiveConfig(args.estimator, topk=args.k)
    k = cache_layout(objective)[0]
    if args.worker == "unchunked":
        learner = ToyLearner(model, objective, lr=1e-4, pad_id=0)
    else:
        learner = FSDPLearner(model, objective, lr=1e-4, pad_id=0, head_chunk_tokens=args.chunk)
    learner.step(*make_batch(2, 8, args.v, k, args.seed + 1))          # warm-up: AdamW state, lazy imports
    batch, scores = make_batch(args.n // RESPONSE_LEN, RESPONSE_LEN, args.v, k, args.seed)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, method = torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    else:
        method = reset_peak_rss()
        base = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    metrics = learner.step(batch, scores)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_kib(method) * 1024
    return dict(impl=args.worker, device=device, peak_extra_mib=(peak - base) / 2**20,
                seconds=time.perf_counter() - t0, loss=metrics["loss"], rss_method=method, k=k)


# --- driver ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help=f"response tokens (a multiple of {RESPONSE_LEN})")
    p.add_argument("--v", type=int, default=32768, help="vocabulary size")
    p.add_argument("--k", type=int, default=64, help="teacher top-k (top-k estimators)")
    p.add_argument("--estimator", default="forward_kl_topk", help="a TRAINABLE estimator of asyncopd.objective")
    p.add_argument("--chunks", default="1024,256", help="tokens per lm-head chunk, one chunked run for each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp_head_memory.csv")
    p.add_argument("--worker", choices=["unchunked", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)      # the worker's chunk size
    args = p.parse_args()
    if args.n % RESPONSE_LEN or args.n < RESPONSE_LEN:
        p.error(f"--n must be a positive multiple of {RESPONSE_LEN}, got {args.n}")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    for impl, chunk in [("unchunked", None)] + [("chunked", int(c)) for c in args.chunks.split(",")]:
        cmd = [sys.executable, __file__, "--worker", impl, "--n", str(args.n), "--v", str(args.v), "--k", str(args.k),
               "--estimator", args.estimator, "--chunk", str(chunk or 0), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)  # one at a time, each fresh: its own peak
        if proc.returncode != 0:
            sys.exit(f"worker {impl} failed:\n{proc.stderr}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) | dict(head_chunk_tokens=chunk or ""))
    base = rows[0]["peak_extra_mib"]
    for r in rows:
        r.update(estimator=args.estimator, n_tokens=args.n, vocab=args.v, logits_fp32_mib=args.n * args.v * 4 / 2**20,
                 ratio_to_unchunked=r["peak_extra_mib"] / base if base > 0 else float("nan"))

    print(f"one learner step, {args.estimator}, N={args.n} V={args.v} k={rows[0]['k']}, device={rows[0]['device']} "
          f"({rows[0]['rss_method']}); [N, V] fp32 logits = {args.n * args.v * 4 / 2**20:.0f} MiB")
    print(f"{'impl':<10} {'chunk':>6} {'peak-before MiB':>16} {'ratio':>6} {'seconds':>8} {'loss':>14}")
    for r in rows:
        print(f"{r['impl']:<10} {r['head_chunk_tokens']:>6} {r['peak_extra_mib']:>16.1f} "
              f"{r['ratio_to_unchunked']:>6.3f} {r['seconds']:>8.2f} {r['loss']:>14.8f}")
    print("ratio chunked/unchunked peak memory: " + ", ".join(
        f"{r['ratio_to_unchunked']:.3f} (chunk {r['head_chunk_tokens']})" for r in rows[1:])
        + f"; max |loss difference| {max(abs(r['loss'] - rows[0]['loss']) for r in rows):.2e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({f: r[f] for f in FIELDS})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
