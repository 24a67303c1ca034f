"""ToyRolloutEngine: a continuous-batching KV-cache sampler for tiny HF GPT-2 models (CPU or one GPU).

The one idea: a fixed number of slots (`max_batch`) share a preallocated KV cache
`[n_layer, slots, n_head, max_len, head_dim]`; every `step()` admits waiting requests into free slots, then
feeds one token per running slot, so a slot freed by a short answer is refilled at the next step instead of
idling until the longest answer of a static batch is done. The forward is written by hand over the HF model's
own weights (ln_1, fused c_attn, c_proj, ln_2, c_fc, act, c_proj, ln_f, lm_head, learned wpe) and matches
`model(full_sequence).logits` to float32 rounding. One forward per step carries both kinds of rows: one decode
row per slot, and the newly admitted prompts packed without padding (prefill). Running slots are kept in the
low rows, so the hot path slices buffers instead of gathering them, and rows stop costing compute as the
batch drains.

    engine = ToyRolloutEngine(model, max_batch=64, max_new_tokens=32, eos_id=EOS, seed=0)
    trajs = engine.generate(prompts, uids)                 # lockstep; or add() / step() / load_weights() in flight

Semantics (see the tests in tests/test_toy_engine.py):
- **RNG.** Token draws use Gumbel-max with noise from a counter-based hash of (engine seed, uid, position,
  draw index, vocab id), so a request's samples do not depend on which slot it got or who shared its batch:
  continuous batching returns the same ids as one-at-a-time generation. The same (seed, uid, prompt) gives the
  same sample, so several samples of one prompt need distinct uids.
- **Temperature.** `behav_logp` is log π_β of the distribution actually sampled from: log_softmax(logits / T).
  The learner computes log π_θ at T = 1, so only T = 1 (the default) gives IS ratios of exactly 1 at zero
  staleness; at T ≠ 1 the recorded log-probs, the captured top-k and the extra samples all belong to the
  tempered distribution. T = 0 is greedy: the sampled distribution is a point mass, so `behav_logp` holds
  the model's own T = 1 log-prob of the argmax, and `capture_samples` must be 0.
- **Weight updates.** `load_weights` may be called between steps; tokens sampled afterwards carry the new
  version. With `kv_on_update="keep"` (default, PipelineRL-style in-flight update) running sequences keep the
  KV cache written by the old weights, so their next tokens come from the new weights attending to old keys
  and values; with `"recompute"` the prefixes of running sequences are re-prefilled with the new weights, so
  every token is an exact sample of π_version(· | prefix) (one extra batched forward per update).

Speed (`benchmarks/rollout_speed.py`, one thread, the toy pair's shapes, 512 long-tailed requests): 3.6–4.0x the
tokens/s of the real vLLM 0.32 for CPUs on the 0.1M student and 1.9–2.0x on the 0.8M teacher, 4.6–5.6x HF
`generate`, and it starts in milliseconds where vLLM's first engine takes ~16 s. So the studies keep this engine;
vLLM (backends/vllm_fsdp) is the engine for real models.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from asyncopd.rollout import Trajectory

MASK32 = 0xFFFFFFFF


def hash32(x):
    """Wellons' lowbias32 finaliser on values in [0, 2^32); works on Python ints and int64 tensors.
    Both multipliers are < 2^31, so int64 products never overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def request_key(seed: int, uid: int) -> int:
    """The per-request RNG key. The noise word for position t, draw j, vocab id v is hash32(key ^ t ^ (j·V + v) << 12):
    with t < 4096 the inputs are distinct for one request, so the bijective hash gives distinct, well-mixed words."""
    return hash32(hash32(hash32(seed & MASK32) ^ (uid & MASK32)) ^ ((uid >> 32) & MASK32))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new, 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))), in place on a fresh tensor (fewer passes)."""
    u = torch.addcmul(x, x * x, x, value=0.044715).mul_(0.7978845608028654).tanh_()
    return u.add_(1.0).mul_(x).mul_(0.5)


@dataclass
class EngineStats:
    """Counters for a cost model. A slot-step is one slot for one decode step, used or not."""

    steps: int = 0                 # decode steps (one token per running slot)
    slot_steps: int = 0            # max_batch per step
    decode_rows: int = 0           # decode rows actually computed (running slots + holes below the highest)
    tokens: int = 0                # response tokens sampled (useful decode slots)
    prefill_tokens: int = 0        # prompt tokens prefilled (all but the last of each prompt; packed, no padding)
    recompute_tokens: int = 0      # prefix tokens re-prefilled by kv_on_update="recompute"
    finished: int = 0              # trajectories returned

    @property
    def slot_utilisation(self) -> float:
        return self.tokens / max(self.slot_steps, 1)


class ToyRolloutEngine:
    def __init__(self, model, *, max_batch: int = 64, max_new_tokens: int = 32, temperature: float = 1.0,
                 eos_id: int | None = None, seed: int = 0, version: int = 0, capture_topk: int = 0,
                 capture_samples: int = 0, kv_on_update: str = "keep", max_len: int | None = None,
                 device: str | torch.device = "cpu"):
        if max_batch < 1 or max_new_tokens < 1:
            raise ValueError(f"max_batch and max_new_tokens must be >= 1, got {max_batch}, {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if capture_topk < 0 or capture_samples < 0:
            raise ValueError(f"capture_topk and capture_samples must be >= 0, got {capture_topk}, {capture_samples}")
        if temperature == 0 and capture_samples:
            raise ValueError("capture_samples needs temperature > 0: greedy decoding has no distribution to sample")
        if kv_on_update not in ("keep", "recompute"):
            raise ValueError(f"kv_on_update must be 'keep' or 'recompute', got {kv_on_update!r}")
        cfg = model.config
        if capture_topk > cfg.vocab_size:
            raise ValueError(f"capture_topk={capture_topk} exceeds the vocabulary ({cfg.vocab_size})")
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).to(self.device, torch.float32).eval().requires_grad_(False)  # our own copy
        self.max_batch, self.max_new_tokens, self.temperature = max_batch, max_new_tokens, temperature
        self.eos_id, self.seed, self.version = eos_id, seed, version
        self.k, self.M, self.kv_on_update = capture_topk, capture_samples, kv_on_update
        self.max_len = max_len or cfg.n_positions
        if self.max_len > min(cfg.n_positions, 4096) or (capture_samples + 1) * cfg.vocab_size > 2 ** 20:
            raise ValueError(f"max_len={self.max_len} must be <= n_positions (and 4096, the RNG counter's range), "
                             f"and (capture_samples + 1) * vocab_size <= 2^20")
        self.L, self.H, self.D, self.V = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size
        self.hd, self.eps, self.act = self.D // self.H, cfg.layer_norm_epsilon, ACT2FN[cfg.activation_function]
        if cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh"):
            self.act = gelu_tanh
        self.scales = [(self.hd ** -0.5 if cfg.scale_attn_weights else 1.0)
                       / ((i + 1) if cfg.scale_attn_by_inverse_layer_idx else 1) for i in range(self.L)]
        self._pack_weights()

        # device state; per-token buffers are indexed [slot, position in prompt + response]
        S, T, dev = max_batch, self.max_len, self.device
        self.kv = torch.zeros(self.L, 2, S, self.H, T, self.hd, device=dev)  # one write per layer for K and V
        # views [n_layer, slots, n_head, max_len, head_dim]
        self.k_cache, self.v_cache = self.kv[:, 0], self.kv[:, 1]
        self._kv_views = [(self.kv[i], self.k_cache[i], self.v_cache[i]) for i in range(self.L)]
        self.tokens = torch.zeros(S, T + 1, dtype=torch.long, device=dev)
        self.logp_buf = torch.zeros(S, T + 1, device=dev)
        self.topk_ids = torch.zeros(S, T + 1, self.k, dtype=torch.long, device=dev)
        self.topk_logp = torch.zeros(S, T + 1, self.k, device=dev)
        self.sample_ids = torch.zeros(S, T + 1, self.M, dtype=torch.long, device=dev)
        self.sample_logp = torch.zeros(S, T + 1, self.M, device=dev)
        self.token_buffers = {"response_ids": self.tokens, "behav_logp": self.logp_buf}  # -> Trajectory fields
        if self.k:
            self.token_buffers.update(student_topk_ids=self.topk_ids, student_topk_logp=self.topk_logp)
        if self.M:
            self.token_buffers.update(sample_ids=self.sample_ids, sample_behav_logp=self.sample_logp)
        self.pos = torch.zeros(S, dtype=torch.long, device=dev)        # position of the token fed next
        self.last_tok = torch.zeros(S, dtype=torch.long, device=dev)   # the token fed next
        self.key = torch.zeros(S, dtype=torch.long, device=dev)        # request_key of the slot's request
        self._slots = torch.arange(S, device=dev)
        self._positions = torch.arange(T, device=dev)
        self._draw_counter = torch.arange((self.M + 1) * self.V, device=dev).view(self.M + 1, self.V) << 12

        # host bookkeeping (numpy, so the hot path has no per-slot Python loop)
        self.active = np.zeros(S, dtype=bool)
        self.uid = np.zeros(S, dtype=np.int64)
        self.prompt_len = np.zeros(S, dtype=np.int64)
        self.n_gen = np.zeros(S, dtype=np.int64)
        self.max_new = np.zeros(S, dtype=np.int64)
        self.start_step = np.zeros(S, dtype=np.int64)
        self.prompts: list[torch.Tensor | None] = [None] * S
        self.waiting: deque = deque()                  # (uid, prompt [P] int64 on CPU, max_new_tokens)
        self._uids_in_flight: set[int] = set()
        self._version_steps, self._versions = [0], [version]  # version in force from step _version_steps[i]
        self.stats = EngineStats()

    def _pack_weights(self):
        """References to the model's parameters, in decode order (load_state_dict updates them in place)."""
        tf = self.model.transformer
        self.wte, self.wpe, self.lm_w = tf.wte.weight, tf.wpe.weight, self.model.lm_head.weight
        self.ln_f = (tf.ln_f.weight, tf.ln_f.bias)
        self.layers = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                        b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                        b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in tf.h]

    # --- public API -------------------------------------------------------------------------------------------

    @property
    def n_running(self) -> int:
        return int(self.active.sum())

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    @property
    def n_unfinished(self) -> int:
        """Requests added and not yet returned (running or waiting for a slot): StreamingEngine's count."""
        return self.n_running + self.n_waiting

    def add(self, prompt_ids: torch.Tensor, uid: int, max_new_tokens: int | None = None) -> None:
        """Queue one request; it is admitted into a free slot at a later `step()`."""
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).cpu().reshape(-1)
        if len(prompt_ids) < 1 or n < 1:
            raise ValueError(f"request {uid}: needs a non-empty prompt and max_new_tokens >= 1")
        if len(prompt_ids) + n > self.max_len:
            raise ValueError(f"request {uid}: prompt ({len(prompt_ids)}) + max_new_tokens ({n}) "
                             f"> max_len {self.max_len}")
        if uid in self._uids_in_flight:
            raise ValueError(f"request uid {uid} is already queued or running")
        self._uids_in_flight.add(uid)
        self.waiting.append((uid, prompt_ids, n))

    @torch.inference_mode()
    def step(self) -> list[Trajectory]:
        """One engine iteration: admit waiting requests into free slots, then one forward that prefills their
        prompts and decodes one token for every running slot; returns the trajectories finished at this step."""
        n_new = min(len(self.waiting), self.max_batch - int(self.active.sum()))
        n = int(self.active.sum()) + n_new
        if n == 0:
            return []
        # Rows [0, B) are computed, so the hot path slices and never gathers. Admission fills the lowest free
        # slots; a hole left below the highest running slot computes a wasted row, so once holes exceed a
        # quarter of the rows, the running slots above n move down into them (a copy of their cache rows).
        B = int(max(np.flatnonzero(self.active)[-1] + 1 if self.active.any() else 0,
                    np.flatnonzero(~self.active)[n_new - 1] + 1 if n_new else 0))
        if B - n > B // 4:
            self._compact(n)
            B = n
        packed = self._admit(n_new) if n_new else None
        act = self.active[:B]
        T = int((self.prompt_len[:B] + self.n_gen[:B])[act].max())  # attention width: the longest running sequence
        y = self._sample(self._forward(B, T, packed), B)

        self.n_gen[:B] += act
        self.stats.steps += 1
        self.stats.slot_steps += self.max_batch
        self.stats.decode_rows += B
        self.stats.tokens += n
        stopped = act & (y.cpu().numpy() == self.eos_id) if self.eos_id is not None else np.zeros(B, dtype=bool)
        done = stopped | (act & (self.n_gen[:B] >= self.max_new[:B]))
        return self._finish(np.flatnonzero(done), stopped[done]) if done.any() else []

    def generate(self, prompts: list[torch.Tensor], uids: list[int]) -> list[Trajectory]:
        """Sample one response per prompt; results in the order of `uids`. The engine must be idle."""
        if self.waiting or self.active.any():
            raise RuntimeError("generate() needs an idle engine; drive add()/step() yourself for mixed use")
        for p, u in zip(prompts, uids, strict=True):
            self.add(p, u)
        out: dict[int, Trajectory] = {}
        while self.waiting or self.active.any():
            out.update((t.uid, t) for t in self.step())
        return [out[u] for u in uids]

    @torch.inference_mode()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the sampling weights between steps; tokens sampled afterwards carry `version`. Running
        sequences keep their KV cache (kv_on_update="keep") or have it recomputed with the new weights."""
        self.model.load_state_dict(state_dict)
        self._pack_weights()
        self.version = version
        self._version_steps.append(self.stats.steps)
        self._versions.append(version)
        rows = np.flatnonzero(self.active)
        fed = self.prompt_len[rows] + self.n_gen[rows] - 1        # tokens fed so far: positions 0 .. fed-1
        if self.kv_on_update == "recompute" and fed.sum() > 0:
            packed = self._pack(rows, fed)
            packed = (self.tokens[packed[2], packed[1]], *packed[1:])
            self._forward(0, 0, packed)
            self.stats.recompute_tokens += int(fed.sum())

    # --- internals --------------------------------------------------------------------------------------------

    def _compact(self, B: int):
        """Move the running slots at or above B into the lowest free slots below it (KV cache rows included)."""
        src = np.flatnonzero(self.active[B:]) + B
        dst = np.flatnonzero(~self.active[:B])[: len(src)]
        s, d = torch.as_tensor(src, device=self.device), torch.as_tensor(dst, device=self.device)
        T = int((self.prompt_len[src] + self.n_gen[src]).max())
        self.kv[:, :, d, :, :T] = self.kv[:, :, s, :, :T]
        for buf in (*self.token_buffers.values(), self.pos, self.last_tok, self.key):
            buf[d] = buf[s]
        for arr in (self.active, self.uid, self.prompt_len, self.n_gen, self.max_new, self.start_step):
            arr[dst] = arr[src]
        self.active[src] = False
        for i, j in zip(src, dst):
            self.prompts[j], self.prompts[i] = self.prompts[i], None

    def _admit(self, n: int):
        """Place the next n waiting requests into the lowest free slots; returns their packed prefill rows."""
        slots = np.flatnonzero(~self.active)[:n]
        reqs = [self.waiting.popleft() for _ in range(n)]
        P = np.array([len(p) for _, p, _ in reqs])
        rows = torch.as_tensor(slots, device=self.device)
        ids = torch.zeros(n, int(P.max()), dtype=torch.long)
        for i, (_, p, _) in enumerate(reqs):
            ids[i, : len(p)] = p
            self.prompts[slots[i]] = p
        ids = ids.to(self.device)
        self.tokens[rows, : ids.shape[1]] = ids
        last = torch.as_tensor(P - 1, device=self.device)
        self.pos[rows], self.last_tok[rows] = last, ids[torch.arange(n, device=self.device), last]
        self.key[rows] = torch.tensor([request_key(self.seed, u) for u, _, _ in reqs], device=self.device)
        self.active[slots] = True
        self.uid[slots] = [u for u, _, _ in reqs]
        self.max_new[slots] = [m for _, _, m in reqs]
        self.prompt_len[slots], self.n_gen[slots], self.start_step[slots] = P, 0, self.stats.steps
        if P.max() == 1:
            return None
        # the prompt minus its last token is prefilled; the last one is fed as the slot's first decode token
        packed = self._pack(slots, P - 1)
        self.stats.prefill_tokens += int((P - 1).sum())
        return torch.cat([p[:-1] for _, p, _ in reqs]).to(self.device), *packed[1:]

    def _pack(self, slots: np.ndarray, lengths: np.ndarray, chunk: int = 256):
        """Packed rows prefilling positions 0..lengths[i]-1 of `slots`: (tokens, pos, slot, chunks); the caller
        supplies the tokens. Matmuls run on all N packed rows at once, with no padding. Attention runs per chunk
        of whole consecutive prompts (≤ `chunk` rows unless one prompt is longer) as one GEMM with a
        block-diagonal causal mask: a few large GEMMs are much faster on CPU than one tiny GEMM per prompt, and
        chunking bounds the quadratic waste. chunks = [(start, end, additive mask [end-start, end-start])]."""
        seg = np.repeat(np.arange(len(slots)), lengths)
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(len(seg)) - np.repeat(starts, lengths)
        bounds, lo = [], 0
        for st, n in zip(starts, lengths):
            if st + n - lo > chunk and st > lo:  # this prompt would overflow a non-empty chunk: close it
                bounds.append((lo, st))
                lo = st
        bounds.append((lo, len(seg)))
        to = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        chunks = []
        for lo, hi in bounds:
            sg, ps = seg[lo:hi], pos[lo:hi]
            m = (sg[:, None] == sg[None, :]) & (ps[None, :] <= ps[:, None])
            chunks.append((lo, hi, torch.where(to(m), 0.0, float("-inf"))))
        return None, to(pos), to(slots[seg]), chunks

    def _forward(self, B: int, T: int, packed) -> torch.Tensor | None:
        """One forward over B decode rows (slot b feeds `last_tok[b]` at `pos[b]` and attends to its cache
        positions [0, T) up to pos[b]) and N packed prefill rows (`packed`, see `_pack`: each attends causally
        within its own prompt). Every row's K/V is written into the cache at (slot, pos). Rows of free slots
        (holes) compute garbage in their own cache row, which admission overwrites before anything reads it.
        Returns the decode rows' logits [B, V] (None when B == 0)."""
        H, hd, D = self.H, self.hd, self.D
        tok, pos, slot = self.last_tok[:B], self.pos[:B], self._slots[:B]
        if packed is not None:
            tok, pos, slot = torch.cat([tok, packed[0]]), torch.cat([pos, packed[1]]), torch.cat([slot, packed[2]])
        x = F.embedding(tok, self.wte) + F.embedding(pos, self.wpe)                  # [R, D], R = B + N
        if B:  # additive mask over cache positions, shared by all layers: -inf past each slot's own length
            dmask = torch.where(self._positions[:T] <= pos[:B, None], 0.0, float("-inf"))
            dmask = dmask.unsqueeze(1).expand(B, H, T).reshape(B * H, 1, T)
        for i, (g1, b1, wqkv, bqkv, wo, bo, g2, b2, wfc, bfc, wpr, bpr) in enumerate(self.layers):
            kv, kc, vc = self._kv_views[i]
            h = F.layer_norm(x, (D,), g1, b1, self.eps)
            qkv = torch.addmm(bqkv, h, wqkv).view(-1, 3, H, hd)                      # [R, q|k|v, H, hd]
            kv[:, slot, :, pos] = qkv[:, 1:]
            if i == self.L - 1:  # the prefill rows' last-layer output is not needed, only their K/V
                if not B:
                    break
                x, qkv, packed = x[:B], qkv[:B], None
            parts = []
            if B:  # q_len = 1 per slot: two batched GEMMs against the cache (faster than SDPA's CPU kernel here)
                s = torch.baddbmm(dmask, qkv[:B, 0].reshape(B * H, 1, hd),
                                  kc[:B, :, :T].reshape(B * H, T, hd).transpose(1, 2), alpha=self.scales[i])
                parts.append(torch.bmm(torch.softmax(s, -1), vc[:B, :, :T].reshape(B * H, T, hd)).view(B, D))
            for lo, hi, mask in packed[3] if packed is not None else ():  # causal within each prompt
                q, k, v = qkv[B + lo:B + hi].permute(1, 2, 0, 3)                       # each [H, n, hd]
                s = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=self.scales[i])   # [H, n, n]
                parts.append(torch.bmm(torch.softmax(s, -1), v).transpose(0, 1).reshape(-1, D))
            x = x + torch.addmm(bo, parts[0] if len(parts) == 1 else torch.cat(parts), wo)
            h = F.layer_norm(x, (D,), g2, b2, self.eps)
            x = x + torch.addmm(bpr, self.act(torch.addmm(bfc, h, wfc)), wpr)
        return F.linear(F.layer_norm(x, (D,), *self.ln_f, self.eps), self.lm_w) if B else None

    def _sample(self, logits: torch.Tensor, B: int) -> torch.Tensor:
        """Draw the next token (plus M extra samples) for slots [0, B) and write them to the buffers."""
        rows, pos = self._slots[:B], self.pos[:B]
        if self.temperature == 0:
            logp = torch.log_softmax(logits, -1)
            y = logits.argmax(-1)
        else:
            logp = torch.log_softmax(logits if self.temperature == 1 else logits / self.temperature, -1)
            # Gumbel-max: the noise depends only on (request key, position, draw, vocab id), never on the slot
            h = hash32((self.key[:B] ^ pos)[:, None, None] ^ self._draw_counter)          # [B, M+1, V]
            u = ((h >> 8).float() + 0.5) * 2.0 ** -24
            draws = (logp[:, None, :] - torch.log(-torch.log(u))).argmax(-1)               # [B, M+1]
            y = draws[:, 0]
        w = pos + 1
        self.tokens[rows, w] = y
        self.logp_buf[rows, w] = logp.gather(1, y[:, None]).squeeze(1)
        if self.k:
            v, i = logp.topk(self.k, -1)
            self.topk_ids[rows, w], self.topk_logp[rows, w] = i, v
        if self.M:
            s = draws[:, 1:]
            self.sample_ids[rows, w], self.sample_logp[rows, w] = s, logp.gather(1, s)
        self.last_tok[:B] = y
        self.pos[:B] = w.clamp_max_(self.max_len - 1)  # only free slots (holes) ever reach the clamp
        return y

    def _finish(self, slots: np.ndarray, stopped: np.ndarray) -> list[Trajectory]:
        """Copy the finished slots' buffers out (one gather each), free the slots, build the trajectories. Their
        tensors are views of those per-call copies, never of the engine's buffers."""
        r = torch.as_tensor(slots, device=self.device)
        got = {name: buf[r].cpu() for name, buf in self.token_buffers.items()}
        P, n = self.prompt_len[slots], self.n_gen[slots]
        at = self.start_step[slots, None] + np.arange(n.max())   # token i was sampled at step start_step + i
        versions = torch.from_numpy(np.asarray(self._versions)[np.searchsorted(self._version_steps, at, "right") - 1])
        out = []
        for j, s in enumerate(slots):
            a, b, uid = P[j], P[j] + n[j], int(self.uid[s])
            f = {name: g[j, a:b] for name, g in got.items()}
            out.append(Trajectory.from_tokens(uid, self.prompts[s], f.pop("response_ids"), f.pop("behav_logp"),
                                              versions[j, : n[j]], "stop" if stopped[j] else "length", **f))
            self._uids_in_flight.discard(uid)
            self.prompts[s] = None
        self.active[slots] = False
        self.stats.finished += len(slots)
        return out
