"""The toy backend's task: sort a list of symbols, with a long-tailed list length and an exact verifier.

A sequence is `[BOS] x_1 .. x_L [SEP] sorted(x) [EOS]`. The prompt is `[BOS] x [SEP]`; the response is
`sorted(x) + [EOS]`, so a prompt of length L has a response of L + 1 tokens. Token ids: symbols 0..S-1,
then PAD, BOS, SEP, EOS (vocab_size = S + 4). Symbols are drawn uniformly with replacement, so long lists
hold repeats and the model must count, not just order.

The list length follows a truncated power law, P(L) ∝ L^-a on [min_len, max_len]. With the defaults
(a = 1.3, L in 1..24) the length has mean 4.71, median 2 and max 24: 38% of prompts have L = 1 and 16%
have L ≥ 10, yet those 16% hold 46% of all response tokens. That is the shape of reasoning rollouts (most
answers short, a few ~10x longer, and the long ones dominate decode time), which is what makes
asynchronous rollout and continuous batching matter. The long answers are also the hard ones, so
accuracy, length and truncation move together, as they do in length inflation (DESIGN.md, StableOPD).

    task = SortTask()
    prompts = task.make_prompts(1000, seed=HELDOUT_SEED)
    ok = [task.verify(p, r) for p, r in zip(prompts, responses)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HELDOUT_SEED = 2**31 - 1  # seed of the held-out evaluation prompts; training streams use small seeds


@dataclass(frozen=True)
class SortTask:
    n_symbols: int = 16          # S, distinct symbols; ids 0..S-1
    min_len: int = 1             # shortest list
    max_len: int = 24            # longest list; the response is at most max_len + 1 tokens
    length_power: float = 1.3    # a in P(L) ∝ L^-a; 0 = uniform lengths, larger = heavier on short lists

    def __post_init__(self):
        if not 2 <= self.n_symbols <= 4096:
            raise ValueError(f"SortTask.n_symbols must be in [2, 4096], got {self.n_symbols}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"SortTask.min_len must be in [1, max_len={self.max_len}], got {self.min_len}")
        if not self.max_len <= 512:
            raise ValueError(f"SortTask.max_len must be in [min_len={self.min_len}, 512], got {self.max_len}")
        if not 0.0 <= self.length_power <= 10.0:
            raise ValueError(f"SortTask.length_power must be in [0, 10], got {self.length_power}")

    # token ids after the symbols
    @property
    def pad_id(self) -> int:
        return self.n_symbols

    @property
    def bos_id(self) -> int:
        return self.n_symbols + 1

    @property
    def sep_id(self) -> int:
        return self.n_symbols + 2

    @property
    def eos_id(self) -> int:
        return self.n_symbols + 3

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 4

    @property
    def max_response_len(self) -> int:
        return self.max_len + 1

    @property
    def max_seq_len(self) -> int:
        """Tokens in the longest full sequence: BOS, max_len symbols, SEP, max_len sorted, EOS."""
        return 2 * self.max_len + 3

    def length_pmf(self) -> torch.Tensor:
        """P(L) for L = min_len..max_len, float64 [max_len - min_len + 1]."""
        lengths = torch.arange(self.min_len, self.max_len + 1, dtype=torch.float64)
        w = lengths ** -self.length_power
        return w / w.sum()

    def sample_lengths(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n list lengths drawn from the truncated power law, int64 [n]."""
        idx = torch.multinomial(self.length_pmf(), n, replacement=True, generator=generator)
        return idx + self.min_len

    def make_prompts(self, n: int, seed: int) -> list[torch.Tensor]:
        """n prompts `[BOS, x_1..x_L, SEP]` (1-D int64), the same for the same seed. Use HELDOUT_SEED for
        evaluation and other seeds for training."""
        return self.sample_prompts(n, torch.Generator().manual_seed(seed))

    def sample_prompts(self, n: int, g: torch.Generator) -> list[torch.Tensor]:
        """n prompts drawn from a running generator (a training stream)."""
        lengths = self.sample_lengths(n, g)
        symbols = torch.randint(0, self.n_symbols, (int(lengths.sum()),), generator=g)
        bos, sep = torch.tensor([self.bos_id]), torch.tensor([self.sep_id])
        return [torch.cat([bos, x, sep]) for x in torch.split(symbols, lengths.tolist())]

    def answer(self, prompt: torch.Tensor) -> torch.Tensor:
        """The correct response: sorted symbols then EOS, int64 [L + 1]."""
        if prompt.ndim != 1 or prompt[0] != self.bos_id or prompt[-1] != self.sep_id:
            raise ValueError(f"not a SortTask prompt [BOS, x.., SEP]: {prompt.tolist()}")
        x = prompt[1:-1]
        return torch.cat([torch.sort(x).values, torch.tensor([self.eos_id])])

    def verify(self, prompt: torch.Tensor, response_ids: torch.Tensor) -> bool:
        """Exact match, EOS included: a response cut off before EOS (truncated) is wrong, and so is any
        token after EOS."""
        target = self.answer(prompt)
        return response_ids.shape == target.shape and bool(torch.equal(response_ids.cpu().long(), target))
