"""Tiny GPT-2 teacher and student for the sort task: built from a config, trained here, cached locally.

Nothing is downloaded. `build_model` makes a `GPT2LMHeadModel` from a `GPT2Config` with every dropout at
zero (with dropout on, the sampler's and the learner's log-probs of the same tokens would disagree, which
would look like staleness). `sft` trains on ground-truth sequences; `load_or_train_teacher` and
`load_or_warmup_student` train once and then reuse a safetensors file plus a JSON sidecar. `greedy_decode`
is the plain reference decoding loop (full recomputation at every step, no KV cache) that faster rollout
engines are tested against.

    task = SortTask()
    teacher, info = load_or_train_teacher(task)         # 99% exact match; ~3.5 min on 2 idle CPU cores once
    student, _ = load_or_warmup_student(task)           # 75%, ~15 s: clearly below the teacher
    greedy_accuracy(student, task, task.make_prompts(1000, HELDOUT_SEED))

`python -m backends.toy_models` trains (or loads) both defaults and prints their accuracy and time.

Cache: `cache_dir`, else `$ASYNCOPD_CACHE`, else `~/.cache/asyncopd`. An entry is keyed by a hash of
(task, spec, steps, seed, lr, batch_size, CACHE_VERSION). Files are written to a temporary name and
renamed, weights first and sidecar last, so a killed training leaves no entry. An entry that fails to
load (truncated or corrupt file, mismatched weights) is logged as a warning and retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from asyncopd.files import atomic_write
from asyncopd.rollout import Trajectory
from backends.config import STUDENT_SFT, TEACHER_SFT   # SFT defaults: ToyConfig's too, defined torch-free there
from backends.toy_task import HELDOUT_SEED, SortTask

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when sft() or build_model() change what a given cache key produces


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int = 4         # transformer blocks
    n_embd: int = 128        # model width
    n_head: int = 4          # attention heads; must divide n_embd
    n_positions: int = 64    # context length; must hold task.max_seq_len

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelSpec.n_head must divide n_embd={self.n_embd}, got {self.n_head}")


# Defaults, measured with `python -m backends.toy_models` on 2 CPU cores: the teacher reaches ~99% greedy
# exact match on held-out prompts (~3.5 min on idle cores), the student ~75% after a ~15 s warm-up (SFT steps,
# batch and lr: TEACHER_SFT, STUDENT_SFT of backends/config.py, imported above).
TEACHER_SPEC = ModelSpec(n_layer=4, n_embd=128, n_head=4)    # 0.80M parameters
STUDENT_SPEC = ModelSpec(n_layer=2, n_embd=64, n_head=2)     # 0.11M parameters
TINY_SPEC = ModelSpec(n_layer=1, n_embd=32, n_head=2)        # 15k parameters, for tests
TINY_SFT = dict(steps=40, batch_size=32, lr=1e-2)
TINY_TASK = SortTask(n_symbols=4, max_len=4)                 # trains in a second


def build_model(spec: ModelSpec, task: SortTask, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 for `task`, all dropouts 0, the same weights for the same seed."""
    if spec.n_positions < task.max_seq_len:
        raise ValueError(f"ModelSpec.n_positions must be >= task.max_seq_len={task.max_seq_len}, "
                         f"got {spec.n_positions}")
    config = GPT2Config(
        vocab_size=task.vocab_size, n_positions=spec.n_positions, n_embd=spec.n_embd,
        n_layer=spec.n_layer, n_head=spec.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=task.bos_id, eos_token_id=task.eos_id, pad_token_id=task.pad_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied embedding / LM head counted once)."""
    return sum(p.numel() for p in model.parameters())


# --- supervised training -------------------------------------------------------------------------------

def sequence_batch(task: SortTask, prompts: list[torch.Tensor]):
    """Ground-truth sequences `prompt + answer`, right-padded. Returns ids [B, T], attention mask [B, T]
    and a response mask [B, T] that is 1 on the answer tokens (the loss targets)."""
    seqs = [torch.cat([p, task.answer(p)]) for p in prompts]
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), task.pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = s
        attn[i, :len(s)] = 1
        resp[i, len(p):len(s)] = True
    return ids, attn, resp


def response_nll(model: GPT2LMHeadModel, ids, attn, resp) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens (logits at t-1 predict token t)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]    # [B, T-1, V]
    mask = resp[:, 1:]
    return F.cross_entropy(logits[mask], ids[:, 1:][mask], reduction="sum")


def sft(model: GPT2LMHeadModel, task: SortTask, *, steps: int, batch_size: int, lr: float, seed: int,
        horizon: int = 0, desc: str = "sft", n_chunks: int = 4) -> list[float]:
    """Train on fresh ground-truth sequences for `steps` AdamW steps; returns the loss of every step.

    LR: linear warm-up over the first 5% of `horizon` steps (0: `steps`), then cosine decay to lr/10 at
    `horizon`. A horizon beyond `steps` stops the schedule partway: the model is a snapshot of a longer run, still
    learning at a high lr, not one annealed into its basin (see ToyConfig.student_warmup_horizon). Each batch is sorted by
    length and split into `n_chunks` gradient-accumulated chunks, each padded only to its own longest
    sequence: with long-tailed lengths most chunks are short, which roughly halves the cost of a step.
    The loss is the mean over the batch's response tokens; gradients are clipped to norm 1. Deterministic
    on CPU for a given seed."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    horizon = horizon or steps
    if horizon < steps:
        raise ValueError(f"sft horizon={horizon} must be 0 or >= steps={steps}")
    warmup = max(1, horizon // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, horizon - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for _ in bar:
        prompts = sorted(task.sample_prompts(batch_size, g), key=len)
        chunks = [prompts[i * batch_size // n_chunks:(i + 1) * batch_size // n_chunks] for i in range(n_chunks)]
        n_resp = sum(len(p) - 1 for p in prompts)                 # response tokens in the batch (L + 1 each)
        total = 0.0
        for chunk in filter(None, chunks):
            ids, attn, resp = (t.to(device) for t in sequence_batch(task, chunk))
            loss = response_nll(model, ids, attn, resp) / n_resp
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}", refresh=False)
    model.eval()
    return losses


# --- packing rollouts for a forward pass --------------------------------------------------------------

def pack(trajs: list[Trajectory], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response ids [B, S], attention mask [B, S], and the flat index [N] of the
    positions whose logits predict the response tokens (row b, position P_b − 1 + j for token j)."""
    seqs = [torch.cat([t.prompt_ids, t.response_ids]) for t in trajs]
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), S, dtype=torch.long)
    where = []
    for b, (t, s) in enumerate(zip(trajs, seqs)):
        ids[b, :len(s)], attn[b, :len(s)] = s, 1
        P = len(t.prompt_ids)
        where.append(b * S + torch.arange(P - 1, P - 1 + t.n_tokens))
    return ids, attn, torch.cat(where)


def response_logits(model, trajs: list[Trajectory], pad_id: int, n_chunks: int = 4) -> torch.Tensor:
    """Model logits at the response tokens, flattened in batch order: [N, V].

    Sequences are sorted by length and run in `n_chunks` groups, each padded only to its own longest
    sequence: with long-tailed lengths one padded [B, S_max] batch wastes most of its compute (as in `sft`)."""
    device = next(model.parameters()).device
    order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].prompt_ids) + trajs[i].n_tokens)
    pieces: list[torch.Tensor | None] = [None] * len(trajs)
    for group in np.array_split(np.array(order), min(n_chunks, len(trajs))):
        sub = [trajs[i] for i in group]
        ids, attn, where = pack(sub, pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits     # [b, S_g, V]
        for i, piece in zip(group, logits.flatten(0, 1)[where.to(device)].split([t.n_tokens for t in sub])):
            pieces[i] = piece
    return torch.cat(pieces)


# --- reference greedy decoding -------------------------------------------------------------------------

@torch.no_grad()
def greedy_decode(model: GPT2LMHeadModel, task: SortTask, prompts: list[torch.Tensor], *,
                  batch_size: int = 256, padding_side: str = "left",
                  max_new_tokens: int | None = None) -> list[torch.Tensor]:
    """Greedy responses (1-D int64, ending at the first EOS, or `max_new_tokens` long without EOS when
    truncated), in the order of `prompts`.

    The reference loop: each batch is padded on `padding_side`, and at every step the whole sequence is
    recomputed (no KV cache) with an attention mask and position ids counted over real tokens only, so
    padding changes nothing. Row i writes its next token at its own end index; rows that have produced
    EOS stop growing."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    max_new = task.max_response_len if max_new_tokens is None else max_new_tokens
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        B, P = len(chunk), max(len(p) for p in chunk)
        ids = torch.full((B, P + max_new), task.pad_id, dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        begin = torch.tensor([P - len(p) if padding_side == "left" else 0 for p in chunk], device=device)
        end = begin + torch.tensor([len(p) for p in chunk], device=device)   # next write index per row
        for i, p in enumerate(chunk):
            ids[i, begin[i]:end[i]] = p.to(device)
            attn[i, begin[i]:end[i]] = 1
        prompt_end = end.clone()
        done = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)
        for _ in range(max_new):
            W = int(end.max())
            pos = (attn[:, :W].cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids[:, :W], attention_mask=attn[:, :W], position_ids=pos).logits
            nxt = logits[rows, end - 1].argmax(-1)                            # [B]
            live = rows[~done]
            ids[live, end[live]] = nxt[live]
            attn[live, end[live]] = 1
            end[live] += 1
            done |= nxt == task.eos_id
            if done.all():
                break
        out += [ids[i, prompt_end[i]:end[i]].cpu() for i in range(B)]
    return out


def greedy_accuracy(model: GPT2LMHeadModel, task: SortTask, prompts: list[torch.Tensor], *,
                    batch_size: int = 256) -> float:
    """Fraction of prompts whose greedy response is exactly right (task.verify). Prompts are decoded in
    length order so that a batch of short prompts stops early."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses = greedy_decode(model, task, [prompts[i] for i in order], batch_size=batch_size)
    return sum(task.verify(prompts[i], r) for i, r in zip(order, responses)) / len(prompts)


# --- cache ---------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $ASYNCOPD_CACHE, else ~/.cache/asyncopd."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ASYNCOPD_CACHE") or Path.home() / ".cache" / "asyncopd")


def cache_key(kind: str, task: SortTask, spec: ModelSpec, *, steps: int, seed: int, lr: float,
              batch_size: int, horizon: int = 0) -> str:
    fields = dict(kind=kind, task=dataclasses.asdict(task), spec=dataclasses.asdict(spec), steps=steps,
                  seed=seed, lr=lr, batch_size=batch_size, cache_version=CACHE_VERSION)
    if horizon not in (0, steps):                          # keys of annealed models stay what they were
        fields["horizon"] = horizon
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _load_or_train(kind: str, task: SortTask, spec: ModelSpec, *, steps: int, seed: int, lr: float,
                   batch_size: int, cache_dir, n_eval: int, horizon: int = 0) -> tuple[GPT2LMHeadModel, dict]:
    root, horizon = cache_root(cache_dir), horizon or steps
    key = cache_key(kind, task, spec, steps=steps, seed=seed, lr=lr, batch_size=batch_size, horizon=horizon)
    weights, sidecar = root / f"{kind}-{key}.safetensors", root / f"{kind}-{key}.json"
    model = build_model(spec, task, seed)
    if sidecar.exists():                                   # the sidecar is written last: entry complete
        try:
            info = json.loads(sidecar.read_text())
            load_model(model, weights, strict=True)
            return model.eval(), {**info, "cached": True, "path": str(weights)}
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            log.warning("cache entry %s is unreadable (%s: %s); retraining", weights, type(err).__name__, err)
            model = build_model(spec, task, seed)          # a failed load may have written some tensors

    t0, cpu0 = time.perf_counter(), time.process_time()
    losses = sft(model, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed, horizon=horizon,
                 desc=f"sft {kind}")
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0   # CPU s: robust to busy cores
    accuracy = greedy_accuracy(model, task, task.make_prompts(n_eval, HELDOUT_SEED))
    info = dict(kind=kind, key=key, task=dataclasses.asdict(task), spec=dataclasses.asdict(spec),
                n_params=n_params(model), steps=steps, horizon=horizon, seed=seed, lr=lr,
                batch_size=batch_size, final_loss=losses[-1] if losses else None, accuracy=accuracy, n_eval=n_eval,
                train_s=round(train_s, 2), train_cpu_s=round(train_cpu_s, 2),
                torch_threads=torch.get_num_threads(), cache_version=CACHE_VERSION)
    log.info("trained %s %s: accuracy %.3f in %.1f s", kind, key, accuracy, train_s)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(weights, lambda tmp: save_model(model, str(tmp)))
    atomic_write(sidecar, json.dumps(info, indent=2))
    return model, {**info, "cached": False, "path": str(weights)}


def load_or_train_teacher(task: SortTask = SortTask(), spec: ModelSpec = TEACHER_SPEC, *,
                          steps: int = TEACHER_SFT["steps"], seed: int = 0, lr: float = TEACHER_SFT["lr"],
                          batch_size: int = TEACHER_SFT["batch_size"], cache_dir=None,
                          n_eval: int = 1000) -> tuple[GPT2LMHeadModel, dict]:
    """The teacher, trained to high accuracy on first use and loaded from the cache afterwards.
    `info` is the sidecar (accuracy on n_eval held-out prompts, train_s, ...) plus `cached` and `path`."""
    return _load_or_train("teacher", task, spec, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                          cache_dir=cache_dir, n_eval=n_eval)


def load_or_warmup_student(task: SortTask = SortTask(), spec: ModelSpec = STUDENT_SPEC, *,
                           steps: int = STUDENT_SFT["steps"], seed: int = 0, lr: float = STUDENT_SFT["lr"],
                           batch_size: int = STUDENT_SFT["batch_size"], horizon: int = STUDENT_SFT["horizon"],
                           cache_dir=None, n_eval: int = 1000) -> tuple[GPT2LMHeadModel, dict]:
    """The student after an SFT warm-up of `steps` steps of a `horizon`-step schedule: it samples well-formed
    answers but starts clearly below the teacher, leaving room for distillation. Cached like the teacher."""
    return _load_or_train("student", task, spec, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                          cache_dir=cache_dir, n_eval=n_eval, horizon=horizon)


if __name__ == "__main__":
    # Train (first run) or load the default teacher and student and report them: `python -m backends.toy_models`
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for load in (load_or_train_teacher, load_or_warmup_student):
        _, info = load()
        print(f"{info['kind']}: {info['n_params']:,} params, accuracy {info['accuracy']:.3f} on {info['n_eval']} "
              f"held-out prompts, trained in {info['train_s']:.0f} s ({info['train_cpu_s']:.0f} CPU s, "
              f"{info['torch_threads']} threads), cached={info['cached']}: {info['path']}")
