"""Costs from specs: a GPU type, two models and the cluster's parallelism give every `CostModel` field.

The one idea: a roofline. Each cost is the larger of the bytes a step must move through HBM and the FLOPs it
must do, over what the hardware delivers, times a stated efficiency; the efficiencies (`Assumptions`) are the
only guesses, and `python -m sim.calibrate` replaces the costs with measurements later. With N the model's
compute parameters (active ones for MoE; the input embedding is a lookup, not compute), bytes b per parameter,
κ = 2·layers·kv_heads·head_dim·b the KV-cache bytes per token, tp the GPUs of a replica, F and W one GPU's
bf16 FLOP/s and HBM bytes/s, P the prompt and ℓ the mean response length:

    decode_step_s         = N·b / (tp·W·mem_eff) + decode_overhead_s          weights read once per step
    decode_step_s_per_seq = κ·(P + ℓ/2) / (tp·W·mem_eff) + 2N / (tp·F·mfu_decode)   one more sequence's KV read
                                                                                    at its mean context, and its
                                                                                    matmul share
    prefill_s_per_token   = (2N + a·P) / (tp·F·mfu_prefill)                   a = 2·layers·heads·head_dim:
                                                                              causal attention, mean context P/2
    max_batch             = min(max_num_seqs, ⌊(tp·HBM·kv_mem_fraction − N_total·b) / (κ·(P + ℓ))⌋)
    teacher_s_per_token   = (2N_T + a_T·(P + ℓ)) / (tp_T·F·mfu_prefill)       scoring is a prefill
    learner_s_per_token   = (6N + 3a·(P + ℓ))·(P + ℓ)/ℓ / (L·F·mfu_train)   forward + backward over prompt and
                                                                              response, per trained (response)
                                                                              token; L = learner GPUs
    learner_step_s        = optimizer_bytes·N_total / (L·W·mem_eff)           AdamW reads and writes its states
                            + 2·N_total·b·(L − 1)/L / link + learner_fixed_s  ring all-reduce of the gradients
    publish_s             = N_total·b / link                                  the learner sends one copy out
    weight_sync_s         = publish_s + N_total·b / (tp·W·mem_eff) + reload_fixed_s   engines load it

`link` is one GPU's NVLink bandwidth when the cluster fits in one node (≤ gpus_per_node GPUs), else its
network bandwidth. Left out, and said so: MoE decode reads only the active experts (a large batch touches
more), MLA's compressed KV, speculative decoding, communication of tensor parallelism inside a replica, and
the teacher's top-k/sampling work beyond its forward pass. Spec sheets are the vendors' dense bf16 figures.

    specs = Specs(gpu="a100-80gb", student="llama-3.1-8b", teacher="llama-3.1-70b")
    costs = costs_from_specs(specs, cluster, workload)
    print(derivation(specs, cluster, workload))        # every cost with the numbers that produced it
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from asyncopd.config import check_finite
from sim.costs import ClusterShape, CostModel, Workload

GiB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    flops: float            # dense bf16 FLOP/s of one GPU
    hbm_bytes_s: float      # HBM bytes/s
    hbm_bytes: float        # HBM capacity, bytes
    link_bytes_s: float     # NVLink (or PCIe) bytes/s one GPU sends to another in its node, one direction
    network_bytes_s: float  # bytes/s one GPU sends to another node (e.g. one 400 Gb/s NIC per GPU = 50 GB/s)
    gpus_per_node: int = 8


GPUS = {   # vendor datasheets (SXM parts unless named), dense bf16 without sparsity
    "h100-sxm": GPU(989e12, 3.35e12, 80e9, 450e9, 50e9),
    "h100-pcie": GPU(756e12, 2.0e12, 80e9, 64e9, 50e9),
    "h200": GPU(989e12, 4.8e12, 141e9, 450e9, 50e9),
    "b200": GPU(2250e12, 8.0e12, 180e9, 900e9, 100e9),
    "a100-80gb": GPU(312e12, 2.039e12, 80e9, 300e9, 25e9),
    "a100-40gb": GPU(312e12, 1.555e12, 40e9, 300e9, 25e9),
    "l40s": GPU(362e12, 0.864e12, 48e9, 32e9, 25e9),
}


@dataclass(frozen=True)
class Model:
    """The shape a roofline needs, as in a Hugging Face config.json (decoder-only, gated MLP)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int             # dense MLP width (0 if every layer is MoE)
    experts: int = 0              # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0  # one expert's MLP width
    shared_intermediate: int = 0  # always-on shared expert width (Qwen2-MoE), 0 if none
    tied_embeddings: bool = False

    def _per_layer(self, experts: int) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        if not self.experts:
            return attn + 3 * self.hidden * self.intermediate
        mlp = 3 * self.hidden * (experts * self.expert_intermediate + self.shared_intermediate)
        return attn + mlp + self.hidden * self.experts                       # + the router

    @property
    def params(self) -> int:
        """Every parameter (what the weights weigh)."""
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self._per_layer(self.experts) + embed

    @property
    def compute_params(self) -> int:
        """Parameters one token multiplies by: the active experts and the lm head, not the embedding lookup."""
        return self.layers * self._per_layer(self.experts_per_token) + self.vocab * self.hidden

    def kv_bytes_per_token(self, b: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * b

    def attention_flops_per_context_token(self) -> int:
        """a = 2·layers·heads·head_dim: a token attending to c positions costs 2a·c FLOPs (QKᵀ and AV), so over
        a causal sequence of T tokens (mean c = T/2) a·T FLOPs per token."""
        return 2 * self.layers * self.heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Model:
        """From a Hugging Face config.json's fields (Llama, Qwen2/3, Qwen3-MoE, Mixtral, Mistral naming)."""
        heads = cfg["num_attention_heads"]
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        return cls(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                   intermediate=0 if experts else cfg["intermediate_size"], experts=experts,
                   experts_per_token=cfg.get("num_experts_per_tok", 0) if experts else 0,
                   expert_intermediate=(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if experts else 0,
                   shared_intermediate=cfg.get("shared_expert_intermediate_size", 0) if experts else 0,
                   tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))


MODELS = {   # the fields of each model's public config.json
    "qwen3-1.7b": Model(28, 2048, 16, 8, 128, 151936, 6144, tied_embeddings=True),
    "qwen3-8b": Model(36, 4096, 32, 8, 128, 151936, 12288),
    "qwen3-30b-a3b": Model(48, 2048, 32, 4, 128, 151936, 0, 128, 8, 768),
    "qwen3-235b-a22b": Model(94, 4096, 64, 4, 128, 151936, 0, 128, 8, 1536),
    "llama-3.1-8b": Model(32, 4096, 32, 8, 128, 128256, 14336),
    "llama-3.1-70b": Model(80, 8192, 64, 8, 128, 128256, 28672),
}


def load_model(name: str) -> Model:
    """A preset name of MODELS, or the path of a Hugging Face config.json (read locally, nothing downloaded)."""
    if name in MODELS:
        return MODELS[name]
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {name!r} is neither a preset ({sorted(MODELS)}) nor a config.json file")
    return Model.from_hf_config(json.loads(path.read_text()))


@dataclass
class Assumptions:
    """The efficiencies a roofline cannot know: each is a guess until `sim.calibrate` measures the costs."""
    mem_eff: float = 0.7            # fraction of HBM bandwidth a decode step achieves, in (0, 1]
    mfu_decode: float = 0.3         # matmul efficiency of a decode step's per-sequence share, in (0, 1]
    mfu_prefill: float = 0.4        # prefill and teacher scoring, in (0, 1]
    mfu_train: float = 0.35         # learner forward + backward, in (0, 1]
    decode_overhead_s: float = 0.004   # scheduling, sampling and launch time per decode step, >= 0
    bytes_per_param: float = 2.0    # bf16 weights, > 0
    optimizer_bytes: float = 32.0   # AdamW bytes moved per parameter per step (fp32 master, m, v read + written), >= 0
    kv_mem_fraction: float = 0.9    # share of a replica's HBM the engine may use (vLLM gpu_memory_utilization), (0, 1]
    max_num_seqs: int = 256         # the engine's cap on running sequences, >= 1
    teacher_max_batch: int = 64     # sequences per teacher scoring call, >= 1
    learner_fixed_s: float = 0.3    # per learner step beyond the roofline (launches, logging), >= 0
    reload_fixed_s: float = 0.5     # per weight load in an engine beyond copying the bytes, >= 0

    def __post_init__(self):
        check_finite(self, "Assumptions.")
        for name in ("mem_eff", "mfu_decode", "mfu_prefill", "mfu_train", "kv_mem_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"specs.assume.{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("decode_overhead_s", "optimizer_bytes", "learner_fixed_s", "reload_fixed_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"specs.assume.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.bytes_per_param <= 0:
            raise ValueError(f"specs.assume.bytes_per_param must be > 0, got {self.bytes_per_param!r}")
        for name in ("max_num_seqs", "teacher_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"specs.assume.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class Specs:
    """`specs.*`: derive the costs from a GPU type and two models instead of typing them (gpu="" = typed)."""
    gpu: str = ""                   # a key of GPUS; "" = use costs.* as given
    student: str = ""               # preset name (MODELS) or a path to a HF config.json
    teacher: str = ""
    assume: Assumptions = field(default_factory=Assumptions)

    def __post_init__(self):
        if isinstance(self.assume, dict):
            self.assume = Assumptions(**self.assume)
        if self.gpu and self.gpu not in GPUS:
            raise ValueError(f"specs.gpu must be one of {sorted(GPUS)} (or empty), got {self.gpu!r}")
        if self.gpu and not (self.student and self.teacher):
            raise ValueError("specs.student and specs.teacher are required with specs.gpu: preset names "
                             f"({sorted(MODELS)}) or paths to config.json files")

    @property
    def enabled(self) -> bool:
        return bool(self.gpu)


def _terms(specs: Specs, cluster: ClusterShape, workload: Workload) -> dict[str, tuple[float, str]]:
    """Every CostModel field as (value, the formula with its numbers), per the module docstring."""
    g, a = GPUS[specs.gpu], specs.assume
    s, t = load_model(specs.student), load_model(specs.teacher)
    b, P, ell = a.bytes_per_param, workload.prompt_len, workload.length.mean
    tp_r, tp_t, L = cluster.gpus_per_rollout_replica, cluster.gpus_per_teacher_replica, cluster.learner_gpus
    gpus = cluster.gpus
    link = g.link_bytes_s if gpus <= g.gpus_per_node else g.network_bytes_s
    bw_r, w_s, w_t = tp_r * g.hbm_bytes_s * a.mem_eff, s.params * b, t.params * b
    kv = s.kv_bytes_per_token(b)
    free = tp_r * g.hbm_bytes * a.kv_mem_fraction - w_s
    if free <= 0:
        raise ValueError(f"the student's weights ({w_s / 1e9:.1f} GB) do not fit a rollout replica of "
                         f"cluster.gpus_per_rollout_replica={tp_r} × {g.hbm_bytes / 1e9:.0f} GB: raise it")
    if w_t >= tp_t * g.hbm_bytes * a.kv_mem_fraction and cluster.placement == "separate":
        raise ValueError(f"the teacher's weights ({w_t / 1e9:.1f} GB) do not fit a teacher replica of "
                         f"cluster.gpus_per_teacher_replica={tp_t} × {g.hbm_bytes / 1e9:.0f} GB: raise it")
    max_batch = max(1, min(a.max_num_seqs, math.floor(free / (kv * (P + ell)))))
    attn_s, attn_t = s.attention_flops_per_context_token(), t.attention_flops_per_context_token()
    N, NT = s.compute_params, t.compute_params
    ring = 2 * w_s * (L - 1) / L / link
    opt = a.optimizer_bytes * s.params / (L * g.hbm_bytes_s * a.mem_eff)
    publish = w_s / link
    return {
        "decode_step_s": (w_s / bw_r + a.decode_overhead_s,
                          f"{w_s / 1e9:.2f} GB weights / ({tp_r}×{g.hbm_bytes_s / 1e12:.2f} TB/s×{a.mem_eff}) "
                          f"+ {a.decode_overhead_s * 1e3:.1f} ms"),
        "decode_step_s_per_seq": (kv * (P + ell / 2) / bw_r + 2 * N / (tp_r * g.flops * a.mfu_decode),
                                  f"KV {kv / 1024:.0f} KiB/token × {P + ell / 2:.0f} tokens / HBM + 2·{N / 1e9:.2f}G "
                                  f"FLOP at MFU {a.mfu_decode}"),
        "prefill_s_per_token": ((2 * N + attn_s * P) / (tp_r * g.flops * a.mfu_prefill),
                                f"2·{N / 1e9:.2f}G + attention FLOP / ({tp_r}×{g.flops / 1e12:.0f} TFLOP/s × "
                                f"{a.mfu_prefill})"),
        "max_batch": (max_batch, f"min({a.max_num_seqs}, {free / 1e9:.1f} GB free / ({kv / 1024:.0f} KiB × "
                                 f"{P + ell:.0f} tokens))"),
        "teacher_s_per_token": ((2 * NT + attn_t * (P + ell)) / (tp_t * g.flops * a.mfu_prefill),
                                f"2·{NT / 1e9:.2f}G active + attention FLOP / ({tp_t}×{g.flops / 1e12:.0f} "
                                f"TFLOP/s × {a.mfu_prefill})"),
        "teacher_s_per_seq": (0.0, "not modelled"),
        "teacher_call_s": (0.0, "not modelled"),
        "teacher_max_batch": (a.teacher_max_batch, "assumed"),
        "learner_s_per_token": ((6 * N + 3 * attn_s * (P + ell)) * (P + ell) / ell / (L * g.flops * a.mfu_train),
                                f"(6·{N / 1e9:.2f}G + attention FLOP)·{(P + ell) / ell:.2f} (prompt share) / "
                                f"({L}×{g.flops / 1e12:.0f} TFLOP/s × {a.mfu_train})"),
        "learner_step_s": (opt + ring + a.learner_fixed_s,
                           f"AdamW {opt:.3g} s + all-reduce {ring:.3g} s + {a.learner_fixed_s} s"),
        "publish_s": (publish, f"{w_s / 1e9:.2f} GB / {link / 1e9:.0f} GB/s "
                               f"({'NVLink' if link == g.link_bytes_s else 'network'})"),
        "weight_sync_s": (publish + w_s / bw_r + a.reload_fixed_s,
                          f"publish + load {w_s / bw_r:.3g} s + {a.reload_fixed_s} s"),
    }


def learner_state_fits(specs: Specs, learner_gpus: int, state_bytes_per_param: float = 16.0,
                       headroom: float = 0.8) -> bool:
    """Whether FSDP on `learner_gpus` GPUs holds the training state: bf16 weights and gradients plus fp32 master
    weights and AdamW's two moments are 16 bytes per parameter, sharded, with (1 − headroom) of HBM left for
    activations."""
    g = GPUS[specs.gpu]
    return state_bytes_per_param * load_model(specs.student).params <= headroom * learner_gpus * g.hbm_bytes


def costs_from_specs(specs: Specs, cluster: ClusterShape, workload: Workload) -> CostModel:
    """The CostModel the roofline gives for this cluster shape and workload (module docstring)."""
    return CostModel(**{name: value for name, (value, _) in _terms(specs, cluster, workload).items()})


def costs_for(specs: Specs, cluster: ClusterShape, workload: Workload, typed: CostModel) -> CostModel:
    """The costs a run uses: `typed` when specs.gpu is empty; else the derived costs, except the fields of
    `typed` set away from CostModel's defaults (`costs.max_batch=8` on the command line), which win. A field
    typed as exactly its default value cannot be told from an unset one and is derived."""
    if not specs.enabled:
        return typed
    default = CostModel()
    overrides = {f: getattr(typed, f) for f in CostModel.__dataclass_fields__
                 if getattr(typed, f) != getattr(default, f)}
    return replace(costs_from_specs(specs, cluster, workload), **overrides)


def derivation(specs: Specs, cluster: ClusterShape, workload: Workload, typed: CostModel | None = None):
    """A table: each cost, its derived value, the formula with its numbers and, if given, the typed value."""
    import pandas as pd
    rows = [dict(cost=name, derived=value, how=how) for name, (value, how) in _terms(specs, cluster, workload).items()]
    df = pd.DataFrame(rows)
    if typed is not None:
        df.insert(2, "typed", [getattr(typed, n) for n in df.cost])
    return df
