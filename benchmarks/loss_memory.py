"""Loss memory: chunked `forward_kl_topk` (tail="bucket") vs a naive full-batch log_softmax, forward + backward.

Same inputs in both: student logits [N, V] fp32 (requires grad), the teacher's top-k ids and full-vocabulary
log-probs [N, k] with a tail mass, every token unmasked. The naive version is what one writes first:
`log_softmax` over the whole [N, V] batch, gather, and the student tail as logsumexp over the non-support
log-probs; it computes the same bucket KL with the same (stable) maths, so loss and gradient must agree.

Each implementation runs in its own fresh subprocess, so one cannot inherit the other's peak:
  CPU   peak RSS (VmHWM from /proc/self/status, reset after the inputs are built when the kernel allows it
        through /proc/self/clear_refs, else ru_maxrss) minus the RSS once the inputs are allocated;
  CUDA  torch.cuda.max_memory_allocated() minus memory_allocated() after the inputs.
Both figures include the [N, V] gradient itself, which any implementation must allocate. The chunked worker
then also runs the naive version in-process (after its own peak was read) and reports the max abs
difference of loss and gradient.

Deliberately left out: time is reported but not tuned (the chunked backward recomputes each chunk, about
one extra forward), and bf16 logits (the comparison is fp32 against fp32).

    python benchmarks/loss_memory.py                           # N=8192, V=32768, k=64 (~1 GiB of logits)
    python benchmarks/loss_memory.py --n 512 --v 4096 --k 16   # quick; --out PATH to write the CSV elsewhere
    python benchmarks/loss_memory.py --n 32 --v 256 --parallel # smoke: both workers at once
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["impl", "device", "n_tokens", "vocab", "k", "chunk_size", "input_mib", "peak_extra_mib", "seconds",
          "loss", "ratio_to_naive", "max_abs_diff_loss", "max_abs_diff_grad", "rss_method"]


# --- worker (one implementation per process) ------------------------------------------------------------

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


def make_inputs(n: int, v: int, k: int, device: str, seed: int = 0):
    """Built without any [N, V] temporary, so the peak before measuring is the inputs themselves."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 2.0).to(device).requires_grad_(True)     # [N, V]
    step = next(s for s in range(max(1, v // k) | 1, v + 1) if math.gcd(s, v) == 1)      # coprime: distinct ids
    base = torch.randint(0, v, (n, 1), generator=g)
    ids = ((base + torch.arange(k) * step) % v).to(device)                              # [N, k] int64
    logp = torch.log_softmax(torch.randn(n, k + 1, generator=g) * 2.0, -1)[:, :k]       # Σ e^logp < 1
    mask = torch.ones(n, dtype=torch.bool)
    return logits, ids, logp.to(device), mask.to(device)


def naive_forward_kl_topk(logits, ids, teacher_logp, mask):
    """Bucket forward KL with the whole-batch [N, V] log_softmax kept for backward."""
    import torch
    logp = torch.log_softmax(logits.float(), -1)                                # [N, V]
    logp_s = logp.gather(1, ids)                                                # [N, k]
    log_p_tail = logp.scatter(1, ids, float("-inf")).logsumexp(-1)              # [N] another [N, V]
    a = teacher_logp.logsumexp(-1).clamp_max(0.0)
    log_q_tail = torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    kl = (teacher_logp.exp() * (teacher_logp - logp_s)).sum(-1) + log_q_tail.exp() * (log_q_tail - log_p_tail)
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp_min(1)


def worker(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from asyncopd.estimators import forward_kl_topk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, ids, teacher_logp, mask = make_inputs(args.n, args.v, args.k, device, args.seed)
    input_bytes = sum(t.numel() * t.element_size() for t in (logits, ids, teacher_logp, mask))

    def run(impl, logits, ids, teacher_logp, mask):
        if impl == "chunked":
            return forward_kl_topk(logits, ids, teacher_logp, mask, tail="bucket", chunk_size=args.chunk_size).loss
        return naive_forward_kl_topk(logits, ids, teacher_logp, mask)

    warm = make_inputs(4, 64, 4, device, args.seed)          # load lazily imported modules before measuring
    run(args.worker, *warm).backward()
    del warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, method = torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    else:
        method = reset_peak_rss()
        base = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = run(args.worker, logits, ids, teacher_logp, mask)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_kib(method) * 1024
    seconds = time.perf_counter() - t0
    out = dict(impl=args.worker, device=device, input_mib=input_bytes / 2**20, peak_extra_mib=(peak - base) / 2**20,
               seconds=seconds, loss=loss.item(), rss_method=method)

    if args.worker == "chunked" and args.check:        # parity, after the peak was read
        grad = logits.grad
        logits.grad = None
        ref = run("naive", logits, ids, teacher_logp, mask)
        ref.backward()
        out.update(max_abs_diff_loss=abs(ref.item() - loss.item()),
                   max_abs_diff_grad=(grad - logits.grad).abs().max().item())
    return out


# --- driver ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="tokens (rows)")
    p.add_argument("--v", type=int, default=32768, help="vocabulary size")
    p.add_argument("--k", type=int, default=64, help="teacher top-k")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk for the chunked estimator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_memory.csv")
    p.add_argument("--parallel", action="store_true",
                   help="run both workers at once: peaks are per process (unchanged), timings are contended")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the loss/grad parity check")
    p.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    procs = {}
    for impl in ("naive", "chunked"):       # each in a fresh process: its own peak, nothing inherited
        cmd = [sys.executable, __file__, "--worker", impl, "--n", str(args.n), "--v", str(args.v),
               "--k", str(args.k), "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)]
        cmd += [] if args.check else ["--no-check"]
        procs[impl] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not args.parallel:
            procs[impl].wait()
    rows = {}
    for impl, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"worker {impl} failed:\n{stderr}")
        rows[impl] = json.loads(stdout.strip().splitlines()[-1])
    naive_peak = rows["naive"]["peak_extra_mib"]
    # RSS moves in pages: inputs of a few KiB may not move it at all, and then there is no ratio to report
    ratio = rows["chunked"]["peak_extra_mib"] / naive_peak if naive_peak > 0 else float("nan")

    print(f"forward_kl_topk(tail='bucket') fwd+bwd, N={args.n} V={args.v} k={args.k} "
          f"chunk_size={args.chunk_size}, device={rows['naive']['device']} ({rows['naive']['rss_method']})")
    print(f"inputs: {rows['naive']['input_mib']:.1f} MiB (fp32 logits {args.n * args.v * 4 / 2**20:.1f} MiB); "
          f"the [N, V] gradient counts in both peaks")
    print(f"{'impl':<8} {'peak-inputs MiB':>16} {'seconds':>8} {'loss':>12}")
    for impl in ("naive", "chunked"):
        r = rows[impl]
        print(f"{impl:<8} {r['peak_extra_mib']:>16.1f} {r['seconds']:>8.2f} {r['loss']:>12.6f}")
    print(f"ratio chunked/naive peak memory: {ratio:.3f}  (target <= 0.5)")
    if args.check:
        print(f"max abs diff: loss {rows['chunked']['max_abs_diff_loss']:.3e}, "
              f"grad {rows['chunked']['max_abs_diff_grad']:.3e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for impl in ("naive", "chunked"):
            w.writerow({f: rows[impl].get(f, "") for f in FIELDS} | dict(
                impl=impl, n_tokens=args.n, vocab=args.v, k=args.k, chunk_size=args.chunk_size,
                ratio_to_naive=rows[impl]["peak_extra_mib"] / rows["naive"]["peak_extra_mib"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
