"""VLLMTeacher: scores rollouts with a vLLM engine into `TeacherScores`, through prompt log-probs.

The one idea: vLLM scores a sequence it is given, not one it samples, through `prompt_logprobs`. Each
trajectory becomes one request over prompt + response with `prompt_logprobs=topk` and `max_tokens=1`; entry i
of `RequestOutput.prompt_logprobs` (entry 0 is None) is the dict {token id: Logprob(logprob, rank)} holding
prompt token i and the top-k of π_T(· | tokens < i). With P prompt tokens, entry P + j is response token j:

    sampled_logp[j] = entry[P + j][y_j].logprob            topk = entries of rank 1..k, by rank
    tail_mass[j]    = 1 − Σ exp(topk_logp[j])              (as ToyTeacher)

`batch_size` trajectories go to the engine at once; scores carry `version` as teacher_version.

**Temperature.** Prompt log-probs are log_softmax of the raw logits in float32 (`Sampler.compute_logprobs` in
the model runner), whatever the temperature or `logprobs_mode`: the teacher at T = 1, as ToyTeacher. The MC
pass below reads *sampler* log-probs, which are the raw T = 1 ones only under logprobs_mode="raw_logprobs"
(vLLM's default; `from_config` sets it and the constructor checks it) and are requested at temperature 1.

**MC samples** (`n_samples = M`: the trajectory's captured `sample_ids[:, :M]`, drawn from π_β). Prompt
log-probs report only the token actually in the prompt, so each response position j becomes an alternate
request over the prefix prompt + response[:j] with `max_tokens=1, logprob_token_ids=<the distinct samples at
j>` and `logprobs` unset: the log-probs at its first generated position are log π_T(· | s_j) of exactly those
ids, all M in one request. Read them by token id only: vLLM then reports positions 1..M as their "ranks", and
it refuses `logprobs=0` beside `logprob_token_ids` (logprobs must equal len(logprob_token_ids)). Cost, per
trajectory of P + L tokens:
- main pass: P + L prefill tokens. vLLM skips *reading* the prefix cache for a request with prompt_logprobs
  (`skip_reading_prefix_cache` defaults to True there: cached positions would produce no logits), but its
  full KV blocks are still written to the cache;
- MC pass (run after the main pass of the batch): L requests that do read the cache. The main pass cached the
  prefix up to its last full block, and vLLM recomputes from that block boundary (at least the last token), so
  each alternate costs 1 to block_size new tokens, (block_size + 1)/2 on average: ~(block_size + 1)/2·L extra
  prefill tokens (more if blocks were evicted meanwhile), plus attention over prefixes of P..P+L−1 tokens, for
  any M ≤ 128 (vLLM's limit on `logprob_token_ids`). Putting each sample last in the prompt instead
  (prompt + response[:j] + [y], prompt_logprobs) would cost P + j + 1 tokens per sample, M·L·(P + L/2) per
  trajectory, because such requests skip the cache read.
- The two passes never share an engine step: when any request of a step asks for `logprob_token_ids`, vLLM's
  sampler returns those columns in place of the top-k for the whole batch (`vllm/v1/sample/sampler.py`), so a
  main-pass request beside them would lose its log-probs.
- vLLM 0.32's `SamplingParams.prompt_logprob_token_ids` ([P − 1, M] ids scored at every prompt row) would score
  the M samples inside the main pass, one request per trajectory. It needs the V2 model runner, which needs
  Triton: on a CPU vLLM refuses such a request ("requires the V2 model runner") and refuses to start with
  VLLM_USE_V2_MODEL_RUNNER=1 ("Model Runner V2 requires Triton"), so it is not used here.

A trajectory is scored as one prompt of P + L tokens plus the one token vLLM must generate, so the teacher
engine's max_model_len must be >= P + L + 1 (vLLM refuses the request otherwise).

vLLM API relied on (0.32, V1; `vllm/sampling_params.py`, `vllm/v1/worker/gpu_model_runner.py`
`_get_prompt_logprobs_dict`, `vllm/v1/sample/sampler.py` `gather_specific_token_logprobs`,
`vllm/v1/core/kv_cache_manager.py` `get_computed_blocks`): `SamplingParams(max_tokens=1, temperature=1.0,
prompt_logprobs=k, logprob_token_ids=[...], detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)`,
`LLMEngine.add_request / step / has_unfinished_requests`, `RequestOutput.prompt_logprobs`,
`.outputs[0].logprobs`. vllm itself is imported only by `from_config`; tests/test_vllm_real.py checks this
module against vLLM 0.32 on a CPU.
"""

from __future__ import annotations

import itertools

import torch

from asyncopd.cache import TeacherScores, check_scorable
from asyncopd.rollout import Trajectory
from backends.vllm_fsdp.vllm_engine import VLLMConfig, build_llm_engine, check_logprobs_mode, topk_of

MAX_LOGPROB_TOKEN_IDS = 128   # vLLM's cap on SamplingParams.logprob_token_ids


class VLLMTeacher:
    def __init__(self, engine, api, *, batch_size: int = 64, version: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        check_logprobs_mode(engine, ("raw_logprobs",), "teacher log-probs at T = 1 of the raw model")
        self.engine, self.api, self.batch_size, self.version = engine, api, batch_size, version
        self._ids = itertools.count()                       # request ids, unique for the engine's lifetime

    @classmethod
    def from_config(cls, cfg: VLLMConfig, **kwargs) -> VLLMTeacher:
        engine, api = build_llm_engine(cfg, logprobs_mode="raw_logprobs")
        return cls(engine, api, **kwargs)

    def score(self, trajs: list[Trajectory], *, topk: int, n_samples: int) -> list[TeacherScores]:
        """Teacher log-probs for every response token of every trajectory, in the order given."""
        check_scorable(trajs, topk, n_samples, max_samples=MAX_LOGPROB_TOKEN_IDS)
        out = []
        for i in range(0, len(trajs), self.batch_size):
            out += self._score_batch(trajs[i:i + self.batch_size], topk, n_samples)
        return out

    def _score_batch(self, trajs: list[Trajectory], k: int, M: int) -> list[TeacherScores]:
        main = self._run([(torch.cat([t.prompt_ids, t.response_ids]), dict(prompt_logprobs=k)) for t in trajs])
        out = []
        for t, o in zip(trajs, main):
            P, L = len(t.prompt_ids), t.n_tokens
            if len(o.prompt_logprobs) != P + L:
                raise RuntimeError(f"trajectory {t.uid}: {len(o.prompt_logprobs)} prompt log-prob entries for "
                                   f"{P + L} tokens")
            entries = o.prompt_logprobs[P:]                 # entry P + j scores response token j
            fields = dict(sampled_logp=torch.tensor([d[y].logprob for d, y in zip(entries, t.response_ids.tolist())],
                                                    dtype=torch.float32))
            if k:
                topk_ids, topk_logp = topk_of(entries, k)
                fields.update(topk_ids=topk_ids, topk_logp=topk_logp,
                              tail_mass=(1 - topk_logp.double().exp().sum(-1)).clamp_min(0).float())
            out.append(fields)
        if M:
            for t, fields, sample_logp in zip(trajs, out, self._score_samples(trajs, M)):
                fields.update(sample_ids=t.sample_ids[:, :M].clone(), sample_logp=sample_logp,
                              sampler_logp=t.sample_behav_logp[:, :M].float().clone())
        return [TeacherScores(**fields, teacher_version=self.version) for fields in out]

    def _score_samples(self, trajs: list[Trajectory], M: int) -> list[torch.Tensor]:
        """log π_T of each trajectory's first M samples at every position: one request per position j over
        prompt + response[:j], read at its first generated position. Returns [L, M] float32 per trajectory."""
        requests = [(torch.cat([t.prompt_ids, t.response_ids[:j]]),
                     dict(logprob_token_ids=sorted(set(t.sample_ids[j, :M].tolist()))))
                    for t in trajs for j in range(t.n_tokens)]
        outs = iter(self._run(requests))
        scores = []
        for t in trajs:
            rows = [next(outs).outputs[0].logprobs[0] for _ in range(t.n_tokens)]   # {token id: Logprob} per j
            samples = t.sample_ids[:, :M].tolist()
            scores.append(torch.tensor([[d[y].logprob for y in ys] for d, ys in zip(rows, samples)],
                                       dtype=torch.float32).reshape(t.n_tokens, M))
        return scores

    def _run(self, requests: list[tuple[torch.Tensor, dict]]) -> list:
        """Add every (token ids, extra SamplingParams) request, step until all finish; outputs in request order."""
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the teacher's vLLM engine has unfinished requests of someone else")
        order = []
        for ids, extra in requests:
            request_id = f"teacher-{next(self._ids)}"
            params = self.api.SamplingParams(n=1, max_tokens=1, temperature=1.0, detokenize=False,
                                             output_kind=self.api.RequestOutputKind.FINAL_ONLY, **extra)
            self.engine.add_request(request_id, {"prompt_token_ids": ids.tolist()}, params)
            order.append(request_id)
        done = {}
        while self.engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in self.engine.step() if o.finished)
        return [done[r] for r in order]
