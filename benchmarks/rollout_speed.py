"""Rollout speed: ToyRolloutEngine (continuous batching, hand-written KV-cache decode) vs HF `generate`.

Same model (student- and teacher-sized GPT-2 from a config, random init), same requests, same long-tailed
length distribution: answer lengths L ~ P(L) ∝ L^-1.3 on 1..24, prompt `[BOS] x_1..x_L [SEP]` (L + 2 tokens),
and every request generates exactly L + 1 tokens (the answer and EOS) in both implementations: HF gets a
LogitsProcessor that bans EOS before each row's target and forces it there (so a static batch waits for its
longest answer, as it really would); the engine gets a per-request `max_new_tokens = L + 1` and no stop token.
HF runs batches of `max_batch` requests in arrival order, with the dynamic cache and (if it works on this
device) `cache_implementation="static"`. All implementations run in one process, interleaved (who goes first
rotates), `--repeats` times after one warm-up; the table reports median tokens/s and, per baseline, the median
over repeats of the engine/baseline ratio measured back to back. One intra-op thread by default (`--threads`).

Deliberately left out: HF returns no log-probs here (the engine computes behaviour log-probs, so the
comparison favours HF), and the engine skips its per-step EOS check (no stop token; a [B] copy to the host).

    python benchmarks/rollout_speed.py                       # full run; writes benchmarks/results/rollout_speed.csv
    python benchmarks/rollout_speed.py --repeats 1 --n-requests 16 --models student
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backends.toy_engine import ToyRolloutEngine  # noqa: E402

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


def run_hf(model, prompts, targets, max_batch: int, cache: str | None) -> tuple[int, int, int]:
    """HF generate in static batches; returns (useful tokens, decode slot-steps, decode rows computed)."""
    tokens = slots = 0
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
        slots += len(ps) * int(tg.max())  # every row of a static batch decodes until its longest answer is done
    return tokens, slots, slots


def run_engine(engine: ToyRolloutEngine, prompts, targets) -> tuple[int, int, int]:
    s0, t0, r0 = engine.stats.slot_steps, engine.stats.tokens, engine.stats.decode_rows
    for uid, (p, n) in enumerate(zip(prompts, targets)):
        engine.add(p, uid, max_new_tokens=int(n))
    trajs = []
    while engine.n_waiting or engine.n_running:
        trajs += engine.step()
    assert sum(t.n_tokens for t in trajs) == int(np.sum(targets))
    return engine.stats.tokens - t0, engine.stats.slot_steps - s0, engine.stats.decode_rows - r0


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-requests", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads, the same for all implementations (0 = torch default). At these "
                         "sizes a second thread mostly adds synchronisation, and on a shared machine it stalls")
    ap.add_argument("--no-static", action="store_true", help="skip HF generate with a static cache")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_speed.csv"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    impls = ["engine", "hf_dynamic"] + ([] if args.no_static else ["hf_static"])
    rows, broken = [], set()
    for name in args.models:
        model = build_model(name).to(args.device)
        print(f"{name}: GPT-2 {MODELS[name]}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        engine = ToyRolloutEngine(model, max_batch=args.max_batch, max_new_tokens=25, eos_id=None,
                                  device=args.device)
        for n_req in args.n_requests:
            prompts, targets = sample_requests(n_req, seed=n_req)
            fns = {"engine": lambda: run_engine(engine, prompts, targets),
                   "hf_dynamic": lambda: run_hf(model, prompts, targets, args.max_batch, None),
                   "hf_static": lambda: run_hf(model, prompts, targets, args.max_batch, "static")}
            for rep in range(-1, args.repeats):  # rep -1 is a warm-up, not recorded
                order = impls[rep % len(impls):] + impls[:rep % len(impls)]  # rotate who goes first
                for impl in order:
                    if (name, impl) in broken:
                        continue
                    try:
                        t0 = time.perf_counter()
                        with torch.inference_mode():
                            tokens, slot_steps, rows_computed = fns[impl]()
                        if args.device != "cpu":
                            torch.cuda.synchronize()
                        dt = time.perf_counter() - t0
                    except Exception as e:  # noqa: BLE001 -- a baseline that does not run here is reported, not fatal
                        print(f"{impl} failed on {name}: {type(e).__name__}: {e}", file=sys.stderr)
                        broken.add((name, impl))
                        continue
                    if rep >= 0:
                        rows.append(dict(model=name, n_requests=n_req, impl=impl, repeat=rep, seconds=dt,
                                         tokens=tokens, tokens_per_s=tokens / dt, slot_utilisation=tokens / slot_steps,
                                         rows_utilisation=tokens / rows_computed))
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)

    key, impls = ["model", "n_requests"], [i for i in impls if i in set(df.impl)]  # minus baselines that failed
    med = df.groupby(key + ["impl"])[["tokens_per_s", "slot_utilisation", "rows_utilisation"]].median().reset_index()
    table = med.pivot_table(index=key, columns="impl", values="tokens_per_s")[impls]
    per_rep = df.pivot_table(index=key + ["repeat"], columns="impl", values="tokens_per_s")
    for b in impls[1:]:  # ratio within each repeat (run back to back), then the median over repeats
        table[f"ratio_vs_{b}"] = (per_rep["engine"] / per_rep[b]).groupby(level=key).median()
    util = med.pivot_table(index=key, columns="impl", values="slot_utilisation")[impls]
    util["engine_rows"] = med[med.impl == "engine"].set_index(key)["rows_utilisation"]
    pd.set_option("display.width", 200)
    print(f"median tokens/s over {args.repeats} interleaved repeats; ratio = median of per-repeat ratios "
          f"(threads={torch.get_num_threads()}, device={args.device}, max_batch={args.max_batch})")
    print(table.round(2).to_string())
    print("\nuseful decode tokens / slot-steps (engine: continuous batching over max_batch slots; hf: static batches)."
          "\nengine_rows: useful / decode rows computed (finished slots stop costing compute as the batch drains)")
    print(util.round(3).to_string())
    worst = np.nanmin(table.filter(like="ratio_vs_").to_numpy())
    print(f"\nratio engine/HF (min over rows and baselines): {worst:.2f}x")
    print(f"wrote {args.out}")
    return df


if __name__ == "__main__":
    main()
