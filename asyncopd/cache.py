"""Teacher-score cache: what a finite cache holds per response token, what it costs, and its file format.

Full-vocabulary teacher logits cost 2·V bytes per token in bf16 (303,872 B at V = 151,936), too much to store
or ship from a teacher to a learner. A `TeacherScores` entry holds instead, per response token, in the on-disk
and wire layout (ids int32, log-probs float32):

    field                                 bytes/token   feeds
    sampled_logp   log π_T(y_t | s_t)     4             reverse_kl_sampled: r_t = log π_T(y_t) − log π(y_t)
    topk_ids, topk_logp  (k of each)      8k            forward_kl_topk, and the sparse top-k reverse KL,
    tail_mass      1 − Σ_topk π_T         4             on the teacher's support with a tail bucket
    sample_ids, sample_logp  (M of each)  8M            reverse_kl_mc: M sampler draws scored by π_T
    sampler_logp   log π_sampler (M)      4M            its importance weights when the sampler is stale

so the sampled logp alone costs 4 B/token, a top-k entry 8k + 8 (k = 64: 520 B, 584x smaller than bf16
logits), and M samples add 12M (8M without sampler log-probs). `bytes_per_token` is that arithmetic and
`TeacherScores.nbytes()` applies it; `save_scores` writes exactly those bytes of tensor data per trajectory,
plus an 8-byte offset per trajectory and a JSON header. In memory ids are int64, as everywhere in asyncopd.
`check_scorable` is every teacher's precondition on the trajectories it is asked to score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from asyncopd.files import atomic_write
from asyncopd.rollout import Trajectory

FORMAT = "asyncopd.teacher_scores"  # metadata["format"] of a cache file
FORMAT_VERSION = "1"
ID_BYTES, LOGP_BYTES = 4, 4         # on disk: int32 ids, float32 log-probs
PROB_ATOL = 1e-3                    # tolerance on tail_mass consistency and on log-probs <= 0
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
TOPK_FIELDS = ("topk_ids", "topk_logp", "tail_mass")
SAMPLE_FIELDS = ("sample_ids", "sample_logp")


def bytes_per_token(*, k: int = 0, n_samples: int = 0, sampler_logp: bool = True,
                    vocab_size: int | None = None) -> int:
    """Bytes per response token of a cache entry with top-`k` and `n_samples` MC samples, on disk.

    4 (sampled-token logp) + [k > 0]·(8k + 4) (ids, logp, tail mass) + n_samples·(8 + 4·sampler_logp)."""
    if k < 0 or n_samples < 0:
        raise ValueError(f"bytes_per_token: k and n_samples must be >= 0, got k={k}, n_samples={n_samples}")
    if vocab_size is not None and k > vocab_size:
        raise ValueError(f"bytes_per_token: k={k} exceeds vocab_size={vocab_size}")
    n = LOGP_BYTES
    if k:
        n += k * (ID_BYTES + LOGP_BYTES) + LOGP_BYTES
    return n + n_samples * (ID_BYTES + LOGP_BYTES + (LOGP_BYTES if sampler_logp else 0))


def full_logits_bytes_per_token(vocab_size: int, *, dtype_bytes: int = 2) -> int:
    """Bytes per token of the full teacher logits (bf16 by default): the reference a cache avoids."""
    return dtype_bytes * vocab_size


def layout_table(vocab_size: int, ks=(0, 1, 8, 64), ms=(0, 4)) -> pd.DataFrame:
    """Every (k, M) layout in ks × ms, plus full bf16 logits: bytes/token and the ratio to full logits."""
    full = full_logits_bytes_per_token(vocab_size)
    rows = []
    for k in ks:
        for M in ms:
            name = " + ".join([f"top-{k}"] * (k > 0) + [f"mc-{M}"] * (M > 0)) or "sampled"
            b = bytes_per_token(k=k, n_samples=M, vocab_size=vocab_size)
            rows.append((name, k, M, b, b / full))
    rows.append(("full bf16", pd.NA, pd.NA, full, 1.0))
    df = pd.DataFrame(rows, columns=["layout", "k", "n_samples", "bytes_per_token", "ratio_to_full"])
    return df.astype({"k": "Int64", "n_samples": "Int64", "bytes_per_token": "int64", "ratio_to_full": "float64"})


def _check(name: str, t, dtype: torch.dtype, shape: tuple[int, ...], dims: str) -> None:
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == shape):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"TeacherScores.{name} must be {dtype} [{dims}] = {list(shape)}, got {got}")
    if t.is_floating_point() and t.numel() and torch.isnan(t).any():
        raise ValueError(f"TeacherScores.{name} holds NaN")
    if name.endswith("_logp") and t.numel() and t.max() > PROB_ATOL:
        raise ValueError(f"TeacherScores.{name} holds a positive log-prob ({t.max().item():.4g})")


def _width(name: str, t) -> int:
    """Second dimension of a [L, k] / [L, M] tensor; 0 means "use None instead"."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] == 0:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"TeacherScores.{name} must be 2-D with a non-empty second dimension (or None), got {got}")
    return t.shape[1]


@dataclass
class TeacherScores:
    """One trajectory's teacher scores; L = response tokens. Optional fields come in groups (see module doc)."""

    sampled_logp: torch.Tensor                  # [L] float32, log π_T(y_t | s_t) of the sampled token
    topk_ids: torch.Tensor | None = None        # [L, k] int64, teacher top-k token ids
    topk_logp: torch.Tensor | None = None       # [L, k] float32, full-vocabulary log π_T of those ids
    tail_mass: torch.Tensor | None = None       # [L] float32, 1 − Σ exp(topk_logp); derived when omitted
    sample_ids: torch.Tensor | None = None      # [L, M] int64, M tokens drawn from the sampler at each s_t
    sample_logp: torch.Tensor | None = None     # [L, M] float32, log π_T of those samples
    sampler_logp: torch.Tensor | None = None    # [L, M] float32, the sampler's log-probs of them (for IS)
    teacher_version: int = 0                    # teacher weight version that produced the scores

    def __post_init__(self):
        s = self.sampled_logp
        L = s.shape[0] if isinstance(s, torch.Tensor) and s.dim() == 1 else -1
        _check("sampled_logp", s, torch.float32, (L,), "L")
        if (self.topk_ids is None) != (self.topk_logp is None):
            raise ValueError("TeacherScores.topk_ids and topk_logp must be given together")
        if self.topk_ids is None and self.tail_mass is not None:
            raise ValueError("TeacherScores.tail_mass given without topk_ids/topk_logp")
        if self.topk_ids is not None:
            k = _width("topk_ids", self.topk_ids)
            _check("topk_ids", self.topk_ids, torch.int64, (L, k), "L, k")
            _check("topk_logp", self.topk_logp, torch.float32, (L, k), "L, k")
            tail = 1 - self.topk_logp.double().exp().sum(-1)        # [L], unclamped, in float64
            if L and tail.min() < -PROB_ATOL:
                raise ValueError(f"TeacherScores.topk_logp: top-k probabilities sum to {1 - tail.min():.6f} > 1; "
                                 "store full-vocabulary log-probs, not renormalised ones")
            if self.tail_mass is None:
                self.tail_mass = tail.clamp_min(0).float()
            _check("tail_mass", self.tail_mass, torch.float32, (L,), "L")
            err = (self.tail_mass.double() - tail).abs().max().item() if L else 0.0
            if err > PROB_ATOL:
                raise ValueError(f"TeacherScores.tail_mass is inconsistent with 1 − Σ exp(topk_logp): "
                                 f"max |diff| = {err:.3g} > {PROB_ATOL}")
        if (self.sample_ids is None) != (self.sample_logp is None):
            raise ValueError("TeacherScores.sample_ids and sample_logp must be given together")
        if self.sample_ids is None and self.sampler_logp is not None:
            raise ValueError("TeacherScores.sampler_logp given without sample_ids/sample_logp")
        if self.sample_ids is not None:
            M = _width("sample_ids", self.sample_ids)
            _check("sample_ids", self.sample_ids, torch.int64, (L, M), "L, M")
            _check("sample_logp", self.sample_logp, torch.float32, (L, M), "L, M")
            if self.sampler_logp is not None:
                _check("sampler_logp", self.sampler_logp, torch.float32, (L, M), "L, M")
        if self.teacher_version < 0:
            raise ValueError(f"TeacherScores.teacher_version must be >= 0, got {self.teacher_version}")

    @property
    def n_tokens(self) -> int:
        return self.sampled_logp.shape[0]

    @property
    def k(self) -> int:
        return 0 if self.topk_ids is None else self.topk_ids.shape[1]

    @property
    def M(self) -> int:
        return 0 if self.sample_ids is None else self.sample_ids.shape[1]

    def nbytes(self) -> int:
        """Bytes this entry occupies in the on-disk/wire layout (int32 ids, float32 log-probs)."""
        return self.n_tokens * bytes_per_token(k=self.k, n_samples=self.M, sampler_logp=self.sampler_logp is not None)


def check_scorable(trajs: list[Trajectory], topk: int, n_samples: int, *, max_topk: int | None = None,
                   max_samples: int | None = None) -> None:
    """Every teacher's precondition: 0 <= topk <= max_topk, 0 <= n_samples <= max_samples (None: no bound),
    token ids present, and >= n_samples captured samples per token."""
    if topk < 0 or (max_topk is not None and topk > max_topk):
        raise ValueError(f"topk must be in [0, {max_topk if max_topk is not None else '∞'}], got {topk}")
    if n_samples < 0 or (max_samples is not None and n_samples > max_samples):
        raise ValueError(f"n_samples must be in [0, {max_samples if max_samples is not None else '∞'}], "
                         f"got {n_samples}")
    for t in trajs:
        if t.prompt_ids is None or t.response_ids is None:
            raise ValueError(f"trajectory {t.uid} has no token ids (a Trajectory.fake cannot be scored)")
        if n_samples and (t.sample_ids is None or t.sample_behav_logp is None or t.sample_ids.shape[1] < n_samples):
            have = 0 if t.sample_ids is None else t.sample_ids.shape[1]
            raise ValueError(f"trajectory {t.uid} carries {have} captured samples per token, n_samples={n_samples} "
                             "needs at least that many: run the engine with capture_samples >= n_samples")


def _fields(k: int, M: int, has_sampler: bool) -> list[str]:
    """Per-token tensors a file with this layout holds, in file order."""
    return ["sampled_logp", *(TOPK_FIELDS if k else ()), *(SAMPLE_FIELDS if M else ()),
            *(("sampler_logp",) if has_sampler else ())]


def save_scores(scores: list[TeacherScores], path) -> None:
    """Write trajectories' scores to one safetensors file, concatenated along tokens; atomic (temp + replace)."""
    path = Path(path)
    layouts = {(s.k, s.M, s.sampler_logp is not None) for s in scores}
    if len(layouts) > 1:
        raise ValueError(f"{path}: all trajectories must share one layout (k, M, sampler_logp), got {sorted(layouts)}")
    k, M, has_sampler = layouts.pop() if layouts else (0, 0, False)
    lengths = torch.tensor([s.n_tokens for s in scores], dtype=torch.int64)
    tensors = {"offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])}
    for name in _fields(k, M, has_sampler):
        t = torch.cat([getattr(s, name).detach().cpu() for s in scores]) if scores else torch.zeros(0)
        if name.endswith("_ids"):
            if t.numel() and (t.min() < INT32_MIN or t.max() > INT32_MAX):
                raise ValueError(f"{path}: {name} holds ids outside int32 [{t.min()}, {t.max()}]")
            t = t.to(torch.int32)
        tensors[name] = t.contiguous()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "k": str(k), "n_samples": str(M),
                "sampler_logp": json.dumps(has_sampler), "n_trajectories": str(len(scores)),
                "teacher_versions": json.dumps([s.teacher_version for s in scores])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_scores(path) -> list[TeacherScores]:
    """Read a file written by `save_scores`; ids come back int64. Any malformation raises ValueError."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:                # truncated, not safetensors, corrupt header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an asyncopd teacher-score cache (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    try:
        k, M, N = int(meta["k"]), int(meta["n_samples"]), int(meta["n_trajectories"])
        has_sampler, versions = json.loads(meta["sampler_logp"]), json.loads(meta["teacher_versions"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad metadata ({type(e).__name__}: {e})") from e
    if len(versions) != N:
        raise ValueError(f"{path}: metadata has {len(versions)} teacher_versions for {N} trajectories")
    expected = {"offsets", *_fields(k, M, bool(has_sampler))}
    if missing := expected - tensors.keys():
        raise ValueError(f"{path}: missing tensors {sorted(missing)}")
    if extra := tensors.keys() - expected:
        raise ValueError(f"{path}: unexpected tensors {sorted(extra)}")
    offsets = tensors.pop("offsets")
    if (offsets.dtype != torch.int64 or tuple(offsets.shape) != (N + 1,)
            or offsets[0] != 0 or (offsets.diff() < 0).any()):
        raise ValueError(f"{path}: offsets must be int64 [{N + 1}], start at 0 and not decrease, "
                         f"got {offsets.dtype} {list(offsets.shape)}")
    T = int(offsets[-1])
    for name, t in tensors.items():
        dtype = torch.int32 if name.endswith("_ids") else torch.float32
        shape = (T, k) if name in TOPK_FIELDS[:2] else (T, M) if name in (*SAMPLE_FIELDS, "sampler_logp") else (T,)
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{path}: {name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
        if name.endswith("_ids"):
            tensors[name] = t.long()
    bounds = offsets.tolist()
    out = []
    for i in range(N):
        a, b = bounds[i], bounds[i + 1]
        try:
            out.append(TeacherScores(**{n: t[a:b] for n, t in tensors.items()}, teacher_version=versions[i]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: trajectory {i}: {e}") from e
    return out
