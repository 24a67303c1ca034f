"""A fake vLLM V1 `LLMEngine` for CPU tests: the subset of the API the vLLM adapters call, under the same names
and with the same output shapes, backed by a real Hugging Face causal LM that computes every distribution.

Modelled (vLLM 0.31 / 0.32 semantics, see backends/vllm_fsdp/vllm_engine.py for the sources):
- `add_request(request_id, {"prompt_token_ids": [...]}, SamplingParams)`, `step() -> list[RequestOutput]`,
  `has_unfinished_requests()`, `reset_prefix_cache() -> bool` (False while a running request holds KV),
  `collective_rpc("reload_weights", kwargs=dict(weights_iterator=[(name, tensor)], is_checkpoint_format=True))`
  (in-place copies by HF name), and `model_config.logprobs_mode / .max_model_len` (the model's n_positions).
- Continuous batching: at most `max_num_seqs` running; a step admits waiting requests in order (prefill and
  first token in the same step), then samples one token for every other running request.
- Each running request keeps its own KV cache (an HF DynamicCache) across steps, so after a weight load its
  next tokens come from the new weights attending to keys and values written by the old ones.
- Sample log-probs: {sampled token: Logprob(logprob, rank)} plus the top-`logprobs` (ranks 1..k; a sampled
  token inside the top-k keeps its top-k entry) plus `logprob_token_ids`; rank = #{v : logp_v >= logp_y}.
  With `logprob_token_ids`, `logprobs` must be None (then: the sampled token and those ids) or their count.
  "raw_logprobs" = log_softmax(logits), "processed_logprobs" = log_softmax(logits / T); draws always come from
  softmax(logits / T) (argmax at T = 0).
- Prompt log-probs: [None] then one such dict per prompt position, always log_softmax of the raw logits.
- Stop checks in vLLM's order: EOS (unless ignore_eos) and stop_token_ids before the length cap.
- Output kinds DELTA (each step's new tokens) and FINAL_ONLY (the whole output once, when finished).
The fake has no prefix cache (its numbers are those of exact recomputation); it records each request's
`skip_reading_prefix_cache` in `history`. Anything else raises NotImplementedError, so an adapter cannot lean
on behaviour the fake does not model.
"""

from __future__ import annotations

import copy
import enum
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from transformers import DynamicCache


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    skip_reading_prefix_cache: bool | None = None

    def __post_init__(self):
        if self.logprob_token_ids is not None and self.logprobs is not None \
                and self.logprobs != len(self.logprob_token_ids):
            raise ValueError("When both logprobs and logprob_token_ids are set, logprobs must equal "
                             "len(logprob_token_ids)")
        if self.skip_reading_prefix_cache is None:   # vLLM: prompt log-probs need every position's logits
            self.skip_reading_prefix_cache = self.prompt_logprobs is not None

    @property
    def num_logprobs(self) -> int | None:
        """Sample log-probs per token, None for none: `logprobs`, else len(logprob_token_ids) (as vLLM)."""
        return self.logprobs if self.logprobs is not None else (len(self.logprob_token_ids)
                                                                 if self.logprob_token_ids else None)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool


class FakeVLLMModel:
    """The model `reload_weights` loads into, with vLLM's `load_weights` (in-place copies by HF name)."""

    def __init__(self, hf_model):
        self.hf_model = hf_model

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        params = self.hf_model.state_dict(keep_vars=True)  # tied lm_head.weight -> the same tensor as wte
        loaded = set()
        for name, tensor in weights:
            params[name].data.copy_(tensor)                # KeyError for a name the model does not have
            loaded.add(name)
        return loaded


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    cache: DynamicCache | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    prompt_logprobs: list | None = None
    sent: int = 0                                            # tokens already returned (DELTA)


class FakeLLMEngine:
    def __init__(self, hf_model, *, logprobs_mode: str = "raw_logprobs", max_num_seqs: int = 256,
                 max_logprobs: int = 20, seed: int = 0):
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise NotImplementedError(f"logprobs_mode {logprobs_mode!r}")
        self.model = FakeVLLMModel(copy.deepcopy(hf_model).float().eval().requires_grad_(False))
        self.model_config = SimpleNamespace(logprobs_mode=logprobs_mode, max_logprobs=max_logprobs,
                                            max_model_len=hf_model.config.n_positions)
        self.eos_token_id = hf_model.config.eos_token_id
        self.max_num_seqs, self.max_logprobs = max_num_seqs, max_logprobs
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.history: list[tuple[str, int, SamplingParams]] = []   # (request id, prompt length, params) as added
        self.steps = 0
        self._seeds = itertools.count(seed * 1_000_003)

    # --- the vLLM API subset --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: dict, params: SamplingParams) -> None:
        if params.n != 1 or params.top_k not in (0, -1) or params.top_p != 1.0:
            raise NotImplementedError("the fake samples n=1 without top-k/top-p")
        if params.output_kind not in (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY):
            raise NotImplementedError(f"output_kind {params.output_kind}")
        if params.detokenize:
            raise ValueError("the engine was built with skip_tokenizer_init=True: detokenize must be False")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.max_logprobs:
                raise ValueError(f"requested {name}={getattr(params, name)} > max_logprobs={self.max_logprobs}")
        if any(r.request_id == request_id for r in self.waiting + self.running):
            raise ValueError(f"request id {request_id} already exists")
        ids = list(prompt["prompt_token_ids"])
        g = torch.Generator().manual_seed(params.seed if params.seed is not None else next(self._seeds))
        self.waiting.append(_Request(request_id, ids, params, g))
        self.history.append((request_id, len(ids), params))

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        if reset_running_requests:
            raise NotImplementedError("preempting running requests")
        return not self.running

    def collective_rpc(self, method: str, kwargs: dict) -> list:
        if method != "reload_weights" or not kwargs.get("is_checkpoint_format", True):
            raise NotImplementedError(f"collective_rpc({method!r}, {kwargs})")
        self.model.load_weights(kwargs["weights_iterator"])
        return [None]                                       # one worker

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        self.steps += 1
        n_new = min(len(self.waiting), self.max_num_seqs - len(self.running))
        admitted, self.waiting = self.waiting[:n_new], self.waiting[n_new:]
        self.running += admitted
        outputs, still = [], []
        for r in self.running:
            self._advance(r)
            reason = self._finish_reason(r)
            kind = r.params.output_kind
            if kind == RequestOutputKind.DELTA or reason is not None:
                start = r.sent if kind == RequestOutputKind.DELTA else 0
                outputs.append(RequestOutput(
                    r.request_id, r.prompt, r.prompt_logprobs if start == 0 else None,
                    [CompletionOutput(0, "", r.tokens[start:], None,
                                      r.logprobs[start:] if r.params.num_logprobs is not None else None, reason,
                                      r.tokens[-1] if reason == "stop" else None)],
                    finished=reason is not None))
                r.sent = len(r.tokens)
            if reason is None:
                still.append(r)
        self.running = still
        return outputs

    # --- internals --------------------------------------------------------------------------------------------

    def _advance(self, r: _Request) -> None:
        """Feed what the request has not fed yet (the prompt at admission, else its last token) through its own
        KV cache, then sample one token."""
        hf = self.model.hf_model
        if r.cache is None:
            r.cache = DynamicCache()
            logits = hf(torch.tensor([r.prompt]), past_key_values=r.cache, use_cache=True).logits[0].float()
            if r.params.prompt_logprobs is not None:
                raw = torch.log_softmax(logits[:-1], -1)    # row i predicts prompt token i + 1
                r.prompt_logprobs = [None] + [self._logprob_dict(raw[i], r.prompt[i + 1], r.params.prompt_logprobs)
                                              for i in range(len(r.prompt) - 1)]
            logits = logits[-1]
        else:
            logits = hf(torch.tensor([[r.tokens[-1]]]), past_key_values=r.cache, use_cache=True).logits[0, -1].float()
        T = r.params.temperature
        if T == 0:
            y = int(logits.argmax())
        else:
            y = int(torch.multinomial(torch.softmax(logits / T, -1), 1, generator=r.generator))
        if r.params.num_logprobs is not None:
            processed = self.model_config.logprobs_mode == "processed_logprobs" and T > 0
            logp = torch.log_softmax(logits / T if processed else logits, -1)
            k = 0 if r.params.logprob_token_ids else r.params.logprobs      # the ids replace the top-k
            r.logprobs.append(self._logprob_dict(logp, y, k, r.params.logprob_token_ids or ()))
        r.tokens.append(y)

    @staticmethod
    def _logprob_dict(logp: torch.Tensor, token: int, k: int, extra=()) -> dict[int, Logprob]:
        def rank(v: int) -> int:
            return int((logp >= logp[v]).sum())
        out = {token: Logprob(float(logp[token]), rank(token))}
        values, ids = logp.topk(k)
        out.update((int(i), Logprob(float(v), r)) for r, (v, i) in enumerate(zip(values, ids), start=1))
        out.update((int(v), Logprob(float(logp[v]), rank(v))) for v in extra)
        return out

    def _finish_reason(self, r: _Request) -> str | None:
        y, p = r.tokens[-1], r.params
        if (not p.ignore_eos and y == self.eos_token_id) or y in (p.stop_token_ids or ()):
            return "stop"
        if len(r.tokens) >= p.max_tokens:
            return "length"
        return None
