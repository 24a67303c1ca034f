"""Loss memory: every vocabulary estimator, chunked by bytes vs unchunked, forward + backward, peak extra memory.

Inputs (the same for every estimator and both implementations): student logits [N, V] fp32 that require grad,
a support / sample id table [N, k] with the teacher's full-vocabulary log-probs on it (Σ e^logp < 1, a real
tail), sampled token ids [N], and for the exact estimators a teacher logits tensor [N, V]; every token
unmasked. Two implementations of each estimator:

  chunked    the estimator as the learner calls it: chunk_size=None, i.e. `chunk_rows(V, chunk_bytes)` rows
             per chunk (DEFAULT_CHUNK_BYTES unless --chunk-mib), one [N, V] gradient buffer;
  unchunked  the same row maths under plain autograd over the whole batch (chunk_size=0): what one writes
             first, and what keeps every [N, V] temporary alive for backward ("naive").

Each (estimator, implementation) runs in its own fresh subprocess, so none inherits another's peak:
  CPU   peak RSS (VmHWM from /proc/self/status, reset after the inputs are built when the kernel allows it
        through /proc/self/clear_refs, else ru_maxrss) minus the RSS once the inputs are allocated;
  CUDA  torch.cuda.max_memory_allocated() minus memory_allocated() after the inputs.
The figure is in units of the logits' bytes (N·V·4) and includes the [N, V] gradient, which any
implementation must allocate: 1.0 is the floor. The chunked worker then runs the unchunked version
in-process (after its own peak was read) and reports the max abs difference of loss and gradient.

    python benchmarks/loss_memory.py                            # N=4096, V=32768, k=64 (512 MiB of logits)
    python benchmarks/loss_memory.py --n 512 --v 4096 --k 16    # quick; --out PATH to write the CSV elsewhere
    python benchmarks/loss_memory.py --only forward_kl_topk/bucket --chunk-mib 64
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ["forward_kl_topk/bucket", "forward_kl_topk/renorm", "forward_kl_topk/none", "reverse_kl_topk/bucket",
              "reverse_kl_mc", "token_logp", "forward_kl_exact", "reverse_kl_exact"]
MC_SAMPLES = 4


# --- peak RSS probe (also used by fsdp_head_memory.py) ---------------------------------------------------

def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> str:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM-reset"
    except OSError:
        return "ru_maxrss"


def peak_rss_kib(method: str) -> int:
    if method == "VmHWM-reset":
        return status_kib("VmHWM")
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux


# --- worker (one estimator, one implementation per process) ---------------------------------------------

def make_inputs(n: int, v: int, k: int, device: str, *, teacher_logits: bool, seed: int = 0) -> dict:
    """Built without any [N, V] temporary, so the peak before measuring is the inputs themselves."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    step = next(s for s in range(max(1, v // k) | 1, v + 1) if math.gcd(s, v) == 1)      # coprime: distinct ids
    base = torch.randint(0, v, (n, 1), generator=g)
    inputs = dict(
        logits=(torch.randn(n, v, generator=g) * 2.0).to(device).requires_grad_(True),   # [N, V]
        ids=((base + torch.arange(k) * step) % v).to(device),                            # [N, k] int64
        logq=torch.log_softmax(torch.randn(n, k + 1, generator=g) * 2.0, -1)[:, :k].to(device),  # Σ e^· < 1
        tokens=base[:, 0].to(device),                                                    # [N]
        mask=torch.ones(n, dtype=torch.bool, device=device))
    if teacher_logits:
        inputs["teacher"] = (torch.randn(n, v, generator=g) * 2.0).to(device)
    return inputs


def estimator_loss(name: str, d: dict, chunk_size):
    """The estimator's loss (0-dim) on inputs `d`; chunk_size None = by bytes, 0 = unchunked."""
    from asyncopd.estimators import (forward_kl_exact, forward_kl_topk, reverse_kl_exact, reverse_kl_mc,
                                     reverse_kl_topk, token_logp)
    fn, _, tail = name.partition("/")
    c, x, m = chunk_size, d["logits"], d["mask"]
    if fn in ("forward_kl_topk", "reverse_kl_topk"):
        est = forward_kl_topk if fn == "forward_kl_topk" else reverse_kl_topk
        return est(x, d["ids"], d["logq"], m, tail=tail, chunk_size=c).loss
    if fn == "reverse_kl_mc":
        return reverse_kl_mc(x, d["ids"][:, :MC_SAMPLES], d["logq"][:, :MC_SAMPLES], m, chunk_size=c).loss
    if fn == "token_logp":
        return token_logp(x, d["tokens"], m, chunk_size=c).mean()
    exact = forward_kl_exact if fn == "forward_kl_exact" else reverse_kl_exact
    return exact(x, d["teacher"], m, chunk_size=c).loss


def worker(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from asyncopd.config import chunk_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    exact = "exact" in args.worker_estimator
    d = make_inputs(args.n, args.v, args.k, device, teacher_logits=exact, seed=args.seed)
    if args.worker == "unchunked":
        chunk = 0
    else:
        chunk = chunk_rows(args.v, int(args.chunk_mib * 2**20)) if args.chunk_mib else None   # None: the default
    rows_per_chunk = args.n if chunk == 0 else min(args.n, chunk or chunk_rows(args.v))

    warm = make_inputs(4, 64, 4, device, teacher_logits=exact, seed=args.seed)   # load lazy modules first
    estimator_loss(args.worker_estimator, warm, chunk).backward()
    del warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, method = torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    else:
        method = reset_peak_rss()
        base = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = estimator_loss(args.worker_estimator, d, chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_kib(method) * 1024
    seconds = time.perf_counter() - t0
    out = dict(device=device, peak_extra_mib=(peak - base) / 2**20, seconds=seconds, loss=loss.item(),
               rows_per_chunk=rows_per_chunk, rss_method=method)
    if args.worker == "chunked" and args.check:        # parity with the unchunked maths, after the peak was read
        grad, d["logits"].grad = d["logits"].grad, None
        ref = estimator_loss(args.worker_estimator, d, 0)
        ref.backward()
        out.update(max_abs_diff_loss=abs(ref.item() - loss.item()),
                   max_abs_diff_grad=(grad - d["logits"].grad).abs().max().item())
    return out


# --- driver ---------------------------------------------------------------------------------------------

def run_worker(args, estimator: str, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--worker-estimator", estimator, "--n", str(args.n),
           "--v", str(args.v), "--k", str(args.k), "--seed", str(args.seed)]
    cmd += (["--chunk-mib", str(args.chunk_mib)] if args.chunk_mib else []) + ([] if args.check else ["--no-check"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"worker {estimator} {impl} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    import pandas as pd
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (rows)")
    p.add_argument("--v", type=int, default=32768, help="vocabulary size")
    p.add_argument("--k", type=int, default=64, help="top-k support size (the MC estimator uses its first 4)")
    p.add_argument("--chunk-mib", type=float, default=0.0,
                   help="chunk budget in MiB per fp32 [rows, V] block (0: the estimators' DEFAULT_CHUNK_BYTES)")
    p.add_argument("--only", nargs="+", choices=ESTIMATORS, default=ESTIMATORS, help="estimators to measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_memory.csv")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the loss/grad parity check")
    p.add_argument("--worker", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    p.add_argument("--worker-estimator", choices=ESTIMATORS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    logits_mib = args.n * args.v * 4 / 2**20
    rows = []
    for estimator in args.only:           # sequential: each process's peak is its own, timings uncontended
        naive = run_worker(args, estimator, "unchunked")
        chunked = run_worker(args, estimator, "chunked")
        for impl, r in (("unchunked", naive), ("chunked", chunked)):
            rows.append(dict(estimator=estimator, impl=impl, n_tokens=args.n, vocab=args.v, k=args.k,
                             logits_mib=logits_mib, x_logits=r["peak_extra_mib"] / logits_mib,
                             ratio_to_unchunked=r["peak_extra_mib"] / naive["peak_extra_mib"], **r))
    table = pd.DataFrame(rows)
    print(f"fwd+bwd peak memory beyond the inputs, in units of the fp32 logits' bytes ({logits_mib:.0f} MiB; "
          f"N={args.n} V={args.v} k={args.k}; {table.device[0]}, {table.rss_method[0]}); the [N, V] gradient is 1.0")
    wide = table.pivot(index="estimator", columns="impl", values="x_logits").loc[args.only]
    wide["ratio"] = wide["chunked"] / wide["unchunked"]
    chunked = table[table.impl == "chunked"].set_index("estimator").loc[args.only]
    wide["rows/chunk"] = chunked["rows_per_chunk"]
    wide["s chunked"], wide["s unchunked"] = chunked["seconds"], table[table.impl == "unchunked"].set_index(
        "estimator").loc[args.only, "seconds"]
    if args.check:
        wide["max|Δgrad|"] = chunked["max_abs_diff_grad"]
    print(wide[["unchunked", "chunked", "ratio", "rows/chunk", "s unchunked", "s chunked"]
               + (["max|Δgrad|"] if args.check else [])].to_string(float_format=lambda f: f"{f:.3g}"))
    worst = wide["chunked"].max()
    print(f"worst chunked: {worst:.2f}x logits (target <= 1.5, goal <= 1.2); "
          f"worst ratio to unchunked: {wide['ratio'].max():.2f} (target <= 0.5)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
