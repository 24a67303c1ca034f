"""What a staleness policy does to the data: lengths generated vs trained, drops, wasted tokens, staleness by length.

The one idea: a bounded-staleness scheduler that drops too-stale rollouts drops the slow ones, and the slow ones
are the long ones, so the learner trains on a distribution skewed toward short answers, and the dropped tokens
were generated for nothing. `LengthSkew` counts, from what the `Driver` sees (every finished rollout, every drop,
every trained batch), so the simulator and every backend report the same measures from one implementation:

    len_generated_*   mean, p50, p90 of the response lengths of every rollout the policy resolved (trained or
    len_trained_*     dropped) and of the trained ones; percentiles are nearest-rank: the smallest length whose
                      cumulative share reaches q
    length_w1         Wasserstein-1 distance between the two length distributions, in tokens:
                      W1 = Σ_i |F_gen(x_i) − F_trained(x_i)| · (x_{i+1} − x_i) over the sorted union of lengths
                      (for two shifted copies of one distribution it is the shift)
    length_ks         Kolmogorov–Smirnov distance max_x |F_gen(x) − F_trained(x)|, in [0, 1]
    length_bias       len_trained_mean / len_generated_mean − 1 (negative: training sees shorter answers)
    drop_rate         dropped / finished rollouts
    wasted_token_frac tokens of dropped rollouts / tokens of every finished rollout
    staleness_by_length  {"[lo, hi)": mean staleness of the trained rollouts whose length is in [lo, hi)},
                      power-of-two buckets

Counts are histograms (length → rollouts), so the state is small and JSON-able: a checkpoint keeps it and a
resumed run continues the same measures. "Generated" means resolved: trained or dropped. Rollouts still queued
or in flight when a run ends are left out, an end effect of stopping, not of the policy (a synchronous run then
shows exactly no skew).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SCALARS = ("len_generated_mean", "len_generated_p50", "len_generated_p90", "len_trained_mean", "len_trained_p50",
           "len_trained_p90", "length_w1", "length_ks", "length_bias", "drop_rate", "wasted_token_frac")


def _bucket(n: int) -> int:
    """The power-of-two bucket [2^k, 2^(k+1)) holding n ≥ 1 (0 for an empty response)."""
    return 0 if n < 1 else 1 << (int(n).bit_length() - 1)


def _cdf(hist: Counter, xs: np.ndarray) -> np.ndarray:
    """F(x) = share of the histogram's mass at lengths ≤ x, for each x in xs (sorted)."""
    keys = np.array(sorted(hist), dtype=np.int64)
    cum = np.cumsum([hist[k] for k in keys]) / max(sum(hist.values()), 1)
    idx = np.searchsorted(keys, xs, side="right")
    return np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0.0)


def _quantile(hist: Counter, q: float) -> float:
    """Nearest-rank quantile: the smallest length whose cumulative share is ≥ q (NaN for no data)."""
    if not hist:
        return float("nan")
    keys = sorted(hist)
    cum = np.cumsum([hist[k] for k in keys]) / sum(hist.values())
    return float(keys[int(np.searchsorted(cum, q - 1e-12))])


def _mean(hist: Counter) -> float:
    n = sum(hist.values())
    return sum(k * c for k, c in hist.items()) / n if n else float("nan")


@dataclass
class LengthSkew:
    trained: Counter = field(default_factory=Counter)       # response length -> trained rollouts
    dropped: Counter = field(default_factory=Counter)       # response length -> dropped rollouts
    stale_sum: Counter = field(default_factory=Counter)     # length bucket -> Σ staleness of trained rollouts
    stale_n: Counter = field(default_factory=Counter)       # length bucket -> trained rollouts

    def on_dropped(self, n_tokens: int) -> None:
        self.dropped[int(n_tokens)] += 1

    def on_trained(self, n_tokens: int, staleness: int) -> None:
        self.trained[int(n_tokens)] += 1
        b = _bucket(int(n_tokens))
        self.stale_sum[b] += int(staleness)
        self.stale_n[b] += 1

    def summary(self) -> dict:
        """The measures of the module docstring (NaN where there is no data yet)."""
        t = self.trained
        g = t + self.dropped                                # resolved rollouts
        gen_tokens = sum(k * c for k, c in g.items())
        out = {"len_generated_mean": _mean(g), "len_generated_p50": _quantile(g, 0.5),
               "len_generated_p90": _quantile(g, 0.9), "len_trained_mean": _mean(t),
               "len_trained_p50": _quantile(t, 0.5), "len_trained_p90": _quantile(t, 0.9)}
        if g and t:
            xs = np.array(sorted(set(g) | set(t)), dtype=np.int64)
            gap = np.abs(_cdf(g, xs) - _cdf(t, xs))
            out["length_w1"] = float((gap[:-1] * np.diff(xs)).sum())
            out["length_ks"] = float(gap.max())
            out["length_bias"] = out["len_trained_mean"] / out["len_generated_mean"] - 1
        else:
            out.update(length_w1=float("nan"), length_ks=float("nan"), length_bias=float("nan"))
        n_gen = sum(g.values())
        out["drop_rate"] = sum(self.dropped.values()) / n_gen if n_gen else float("nan")
        out["wasted_token_frac"] = (sum(k * c for k, c in self.dropped.items()) / gen_tokens if gen_tokens
                                    else float("nan"))
        out["staleness_by_length"] = {f"[{b}, {max(2 * b, 1)})": self.stale_sum[b] / self.stale_n[b]
                                      for b in sorted(self.stale_n)}
        return out

    def state(self) -> dict:
        """JSON-able: every histogram with string keys."""
        return {name: {str(k): int(v) for k, v in getattr(self, name).items()}
                for name in ("trained", "dropped", "stale_sum", "stale_n")}

    @classmethod
    def from_state(cls, state: dict) -> LengthSkew:
        return cls(**{name: Counter({int(k): int(v) for k, v in hist.items()}) for name, hist in state.items()})
