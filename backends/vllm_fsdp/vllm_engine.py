"""VLLMRolloutEngine: the RolloutEngine protocol on a vLLM V1 `LLMEngine`, driven one step at a time.

The one idea: a token's weight version is the version in force at the `engine.step()` that returned it. The
engine is stepped by hand (`add_request` / `step()` / `has_unfinished_requests()`), so between two steps nothing
runs and weights can be swapped there: that is an in-flight update; called on an idle engine it is an update
between rollouts. Outputs come back as deltas (`RequestOutputKind.DELTA`), so every new token is tagged with
`self.version` the moment it arrives.

    engine = VLLMRolloutEngine.from_config(VLLMConfig(model_path="/ckpt/student"), max_new_tokens=512, eos_id=EOS)
    trajs = engine.generate(prompts, uids)                 # lockstep; or add() / step() / load_weights() in flight

Semantics (tests/test_vllm_adapters.py, against the fake engine of tests/fake_vllm.py):
- **Behaviour log-probs.** vLLM returns, per sampled token, a dict {token id: Logprob(logprob, rank)} holding the
  sampled token and the top-`logprobs`. Which distribution they come from is the engine's `logprobs_mode`: the
  default "raw_logprobs" is log_softmax of the raw logits, i.e. the model at T = 1 *before* temperature,
  penalties, top-k/top-p; "processed_logprobs" is log_softmax after them, the distribution actually sampled.
  So behav_logp = log π_β(y_t) of the sampled distribution needs "processed_logprobs" whenever T ∉ {0, 1}
  (`logprobs_mode_for`; `from_config` sets it and the constructor checks it). At T = 1 with no top-k/top-p the
  two coincide; at T = 0 (greedy) behav_logp is the model's T = 1 log-prob of the argmax, as in the toy engine.
  The captured top-k (`capture_topk`) is the entries of rank 1..k of the same dict, so it belongs to the same
  distribution.
- **In-flight weight updates (PipelineRL-style).** `load_weights` copies the new tensors into the running
  model in place, between two steps. Running sequences keep the KV cache their earlier tokens wrote with the
  old weights: their next tokens come from the new weights attending to old keys and values, and carry the new
  version; `behav_version` is the oldest version among a trajectory's tokens. A sequence that vLLM preempts
  (KV-cache pressure) is recomputed later from its tokens with the weights then in force, so its cache is
  refreshed silently; its token versions stay those of the steps that sampled them.
- **Prefix cache.** Cached blocks hold KV written by the weights of their time, so every update calls
  `reset_prefix_cache()`. vLLM only resets when no running request holds KV blocks (it returns False
  otherwise, and `reset_running_requests=True` would preempt the running sequences, i.e. recompute them:
  not done here). While a reset is pending, new requests are added with `skip_reading_prefix_cache=True`, so
  no new request starts from stale cached prompt KV; the reset is retried whenever the engine is idle. With
  continuous in-flight updates that means prefix caching is off until the engine drains.
- **Finish reasons.** `eos_id` is passed as a stop token; vLLM checks stop tokens before the length cap, so an
  EOS at the last allowed position is "stop" (as in the toy engine). Any other vLLM reason (abort, error)
  raises. A stop token vLLM takes from the model folder (generation_config.json) also ends with "stop".
- **Seeds.** With `seed` set, request `uid` is sampled with seed (seed·2^32 + uid) mod 2^63, so its draws do
  not depend on which requests share its steps (up to batch-dependent float rounding of the logits); vLLM
  then loops over seeded requests when sampling, a small cost. `seed=None` (default) uses the engine's RNG.
- **Not supported:** extra MC samples per position (`capture_samples`: vLLM draws one token per position of a
  sequence), top-k/top-p/penalties, and the toy engine's `kv_on_update="recompute"`.

vLLM API relied on (vLLM 0.31 / 0.32, V1 engine; `vllm/v1/engine/llm_engine.py`, `vllm/sampling_params.py`,
`vllm/v1/sample/sampler.py`, `vllm/v1/engine/logprobs.py`): `EngineArgs(..., logprobs_mode=, max_logprobs=,
skip_tokenizer_init=True, async_scheduling=False)`, `LLMEngine.from_engine_args`, `LLMEngine.add_request(
request_id, {"prompt_token_ids": ids} (a TokensPrompt), SamplingParams(n=1, temperature=, max_tokens=,
logprobs=k, seed=, stop_token_ids=, detokenize=False, output_kind=RequestOutputKind.DELTA,
skip_reading_prefix_cache=))`, `step() -> list[RequestOutput]` (`.request_id`, `.finished`,
`.outputs[0].token_ids / .logprobs / .finish_reason`), `has_unfinished_requests()`, `reset_prefix_cache() ->
bool`, `apply_model(func) -> list` (func(model) on every worker) with the model's own
`load_weights(weights=iterable of (HF name, tensor))`, the call RL frameworks and vLLM's RLHF examples use.
The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) without async scheduling: otherwise
it runs ahead of `step()` and a token could be sampled with old weights but read after the update.

vllm is imported only in `build_llm_engine`; the adapter takes the engine, the two vLLM names it uses
(`api.SamplingParams`, `api.RequestOutputKind`) and optionally a weight loader by injection.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from asyncopd.rollout import Trajectory
from backends.vllm_fsdp.config import DTYPES   # torch-free there, so RealConfig checks vllm_fsdp.dtype early

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")   # vLLM's logits modes would return logits, not log-probs
INSTALL_HINT = 'backends.vllm_fsdp needs vLLM: pip install -e ".[gpu]"'


@dataclass(frozen=True)
class VLLMConfig:
    model_path: str = ""                    # local Hugging Face folder (config.json + safetensors); required
    dtype: str = "bfloat16"                 # one of DTYPES
    tensor_parallel_size: int = 1           # GPUs one engine spans
    gpu_memory_utilization: float = 0.85    # fraction of GPU memory vLLM may take (weights + KV cache)
    max_model_len: int = 4096               # prompt + response tokens per sequence
    max_num_seqs: int = 256                 # sequences decoded together (continuous batching)
    max_logprobs: int = 64                  # largest top-k a request may ask for (capture_topk, teacher topk)
    seed: int = 0                           # engine seed (the rollout adapter's own `seed` seeds each request)
    enforce_eager: bool = False             # True: no CUDA graphs (slower decode, faster start)
    trust_remote_code: bool = False         # run a model folder's own Python code: only for folders you trust
    enable_prefix_caching: bool = True      # reuse KV blocks of shared prompt prefixes

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("VLLMConfig.model_path is required: a local Hugging Face model folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"VLLMConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"VLLMConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("tensor_parallel_size", "max_model_len", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"VLLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_logprobs", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"VLLMConfig.{name} must be >= 0, got {getattr(self, name)}")


def logprobs_mode_for(temperature: float) -> str:
    """The vLLM logprobs_mode whose log-probs are those of the distribution sampled at `temperature`."""
    return "raw_logprobs" if temperature in (0, 1) else "processed_logprobs"


def build_llm_engine(cfg: VLLMConfig, *, logprobs_mode: str):
    """A real vLLM `LLMEngine` for `cfg`, stepped in this process, plus the vLLM names the adapters use."""
    try:
        import vllm
        from vllm.sampling_params import RequestOutputKind
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    if not Path(cfg.model_path).is_dir():
        raise FileNotFoundError(f"VLLMConfig.model_path {cfg.model_path!r} is not a local folder")
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"    # engine core in this process: nothing runs between steps
    args = vllm.EngineArgs(
        model=cfg.model_path, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs, max_logprobs=cfg.max_logprobs, seed=cfg.seed,
        enforce_eager=cfg.enforce_eager, trust_remote_code=cfg.trust_remote_code,
        enable_prefix_caching=cfg.enable_prefix_caching, logprobs_mode=logprobs_mode,
        skip_tokenizer_init=True,           # token ids in, token ids out: no tokenizer needed in model_path
        async_scheduling=False)             # a step's tokens are sampled within that step
    api = SimpleNamespace(SamplingParams=vllm.SamplingParams, RequestOutputKind=RequestOutputKind)
    return vllm.LLMEngine.from_engine_args(args), api


@dataclass
class LoadWeights:
    """`apply_model` callable: copy a state dict (HF parameter names) into a worker's vLLM model in place.
    The model's `load_weights` maps HF names onto vLLM's fused and sharded parameters; in-place copies keep
    the parameter addresses that captured CUDA graphs read."""

    state_dict: dict[str, torch.Tensor]

    def __call__(self, model) -> set[str]:
        return model.load_weights(weights=self.state_dict.items())


def check_logprobs_mode(engine, allowed: tuple[str, ...], why: str) -> None:
    mode = engine.model_config.logprobs_mode
    if mode not in allowed:
        raise ValueError(f"the vLLM engine runs with logprobs_mode={mode!r}; {why} needs one of {allowed}")


def topk_of(entries: list[dict], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of vLLM log-prob dicts ({token id: Logprob}): the entries of rank 1..k, in rank order (a
    sampled or prompt token outside the top-k has rank > k). Returns ids [L, k] int64 and log-probs [L, k]."""
    rows = [sorted((lp.rank, tok, lp.logprob) for tok, lp in d.items() if lp.rank <= k) for d in entries]
    if any(len(row) != k for row in rows):
        raise RuntimeError(f"vLLM returned fewer than top-{k} log-probs at a position")
    return (torch.tensor([[tok for _, tok, _ in row] for row in rows], dtype=torch.long).reshape(len(rows), k),
            torch.tensor([[lp for *_, lp in row] for row in rows], dtype=torch.float32).reshape(len(rows), k))


@dataclass
class _Request:
    uid: int
    prompt_ids: torch.Tensor                                # [P] int64
    token_ids: list[int] = field(default_factory=list)      # response so far
    logprobs: list[dict] = field(default_factory=list)      # per token: {token id: Logprob}
    versions: list[int] = field(default_factory=list)       # weight version that sampled each token


@dataclass
class StepCounters:
    """What the rollout pump reads around each step for its decode_iter event (StreamingEngine.stats)."""
    tokens: int = 0                     # response tokens received
    prefill_tokens: int = 0             # prompt tokens of requests whose first token arrived


class VLLMRolloutEngine:
    def __init__(self, engine, api, *, load_weights: Callable[[dict[str, torch.Tensor]], object] | None = None,
                 max_new_tokens: int = 32, temperature: float = 1.0, eos_id: int | None = None,
                 seed: int | None = None, version: int = 0, capture_topk: int = 0):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or capture_topk < 0 or version < 0:
            raise ValueError(f"temperature, capture_topk and version must be >= 0, got {temperature}, "
                             f"{capture_topk}, {version}")
        allowed = LOGPROBS_MODES if temperature in (0, 1) else ("processed_logprobs",)
        check_logprobs_mode(engine, allowed, f"behaviour log-probs at temperature {temperature}")
        self.engine, self.api = engine, api
        self._load = load_weights or (lambda state_dict: engine.apply_model(LoadWeights(state_dict)))
        self.max_new_tokens, self.temperature, self.eos_id = max_new_tokens, temperature, eos_id
        self.seed, self.version, self.k = seed, version, capture_topk
        self._requests: dict[str, _Request] = {}            # vLLM request id -> what has arrived so far
        self._prefix_cache_stale = False                    # an update happened and the reset has not succeeded
        self.stats = StepCounters()

    @classmethod
    def from_config(cls, cfg: VLLMConfig, **kwargs) -> VLLMRolloutEngine:
        """A real vLLM engine for `cfg` (logprobs_mode chosen from the temperature) behind this adapter."""
        engine, api = build_llm_engine(cfg, logprobs_mode=logprobs_mode_for(kwargs.get("temperature", 1.0)))
        return cls(engine, api, **kwargs)

    @property
    def n_unfinished(self) -> int:
        return len(self._requests)

    def add(self, prompt_ids: torch.Tensor, uid: int, max_new_tokens: int | None = None) -> None:
        """Queue one request; vLLM admits it at a later `step()`."""
        request_id = f"rollout-{uid}"
        if request_id in self._requests:
            raise ValueError(f"request uid {uid} is already queued or running")
        max_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).cpu().reshape(-1)
        if len(prompt_ids) < 1 or max_tokens < 1:
            raise ValueError(f"request {uid}: needs a non-empty prompt and max_new_tokens >= 1")
        if self._prefix_cache_stale and not self._requests:
            self._reset_prefix_cache()
        params = self.api.SamplingParams(
            n=1, temperature=self.temperature, max_tokens=max_tokens,
            logprobs=self.k, seed=None if self.seed is None else (self.seed * 2**32 + uid) % 2**63,
            stop_token_ids=None if self.eos_id is None else [self.eos_id], detokenize=False,
            output_kind=self.api.RequestOutputKind.DELTA,
            skip_reading_prefix_cache=True if self._prefix_cache_stale else None)
        self.engine.add_request(request_id, {"prompt_token_ids": prompt_ids.tolist()}, params)
        self._requests[request_id] = _Request(uid, prompt_ids)

    def step(self) -> list[Trajectory]:
        """One vLLM engine step; tags its new tokens with the current version; returns finished trajectories."""
        finished = []
        for out in self.engine.step():
            req, o = self._requests[out.request_id], out.outputs[0]
            new = list(o.token_ids)
            if len(o.logprobs) != len(new):
                raise RuntimeError(f"request {req.uid}: {len(new)} new tokens but {len(o.logprobs)} logprob entries")
            if not req.token_ids and new:
                self.stats.prefill_tokens += len(req.prompt_ids)
            self.stats.tokens += len(new)
            req.token_ids += new
            req.logprobs += o.logprobs
            req.versions += [self.version] * len(new)
            if out.finished:
                finished.append(self._trajectory(self._requests.pop(out.request_id), o.finish_reason))
        return finished

    def generate(self, prompts: list[torch.Tensor], uids: list[int]) -> list[Trajectory]:
        """Sample one response per prompt; results in the order of `uids`. The engine must be idle."""
        if self._requests or self.engine.has_unfinished_requests():
            raise RuntimeError("generate() needs an idle engine; drive add()/step() yourself for mixed use")
        for p, u in zip(prompts, uids, strict=True):
            self.add(p, u)
        out: dict[int, Trajectory] = {}
        while self.engine.has_unfinished_requests():
            out.update((t.uid, t) for t in self.step())
        return [out[u] for u in uids]

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the sampling weights between steps; tokens sampled afterwards carry `version`. Running
        sequences keep their KV cache; the prefix cache is reset now or, if requests are running, once idle."""
        self._load(state_dict)
        self.version = version
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        self._prefix_cache_stale = not self.engine.reset_prefix_cache()   # False while running requests hold KV

    def _trajectory(self, req: _Request, finish_reason: str) -> Trajectory:
        if finish_reason not in ("stop", "length"):
            raise RuntimeError(f"request {req.uid} ended with finish_reason={finish_reason!r}")
        ids = torch.tensor(req.token_ids, dtype=torch.long)
        behav_logp = torch.tensor([d[t].logprob for d, t in zip(req.logprobs, req.token_ids)], dtype=torch.float32)
        extra = {}
        if self.k:
            extra["student_topk_ids"], extra["student_topk_logp"] = topk_of(req.logprobs, self.k)
        return Trajectory.from_tokens(req.uid, req.prompt_ids, ids, behav_logp,
                                      torch.tensor(req.versions, dtype=torch.long), finish_reason, **extra)
