"""backends/toy_task.py: the verifier's exact-match rules, prompt determinism, the length distribution."""

import pytest
import torch

from backends.toy_task import HELDOUT_SEED, SortTask


def test_ids_and_layout():
    task = SortTask()
    assert (task.pad_id, task.bos_id, task.sep_id, task.eos_id, task.vocab_size) == (16, 17, 18, 19, 20)
    assert task.max_response_len == 25 and task.max_seq_len == 51
    prompt = torch.tensor([17, 5, 3, 5, 0, 18])
    assert task.answer(prompt).tolist() == [0, 3, 5, 5, 19]


def test_verify_exact_match_only():
    task = SortTask()
    prompt = torch.tensor([task.bos_id, 7, 2, 9, 2, task.sep_id])
    eos = task.eos_id
    assert task.verify(prompt, torch.tensor([2, 2, 7, 9, eos]))
    assert task.verify(prompt, torch.tensor([2, 2, 7, 9, eos], dtype=torch.int32))
    assert not task.verify(prompt, torch.tensor([2, 7, 2, 9, eos]))         # wrong order
    assert not task.verify(prompt, torch.tensor([2, 7, 9, eos]))            # a repeat dropped
    assert not task.verify(prompt, torch.tensor([2, 2, 7, 9]))              # no EOS: truncated
    assert not task.verify(prompt, torch.tensor([2, 2, 7]))                 # truncated earlier
    assert not task.verify(prompt, torch.tensor([2, 2, 7, 9, eos, eos]))    # extra token after EOS
    assert not task.verify(prompt, torch.tensor([2, 2, 7, 9, 9, eos]))      # extra token before EOS
    assert not task.verify(prompt, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="not a SortTask prompt"):
        task.answer(torch.tensor([7, 2, task.sep_id]))


def test_prompts_deterministic_per_seed_and_well_formed():
    task = SortTask()
    a, b, c = task.make_prompts(200, seed=3), task.make_prompts(200, seed=3), task.make_prompts(200, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sum(torch.equal(x, y) for x, y in zip(a, c)) < 20        # ~2 expected: L=1 prompts can collide
    heldout = task.make_prompts(200, seed=HELDOUT_SEED)
    assert [len(p) for p in heldout] != [len(p) for p in a]
    for p in a:
        assert p.dtype == torch.int64 and p.ndim == 1
        assert p[0] == task.bos_id and p[-1] == task.sep_id
        assert 1 <= len(p) - 2 <= 24 and int(p[1:-1].max()) < task.n_symbols


def test_length_pmf_values():
    pmf = SortTask().length_pmf()
    assert pmf.shape == (24,) and abs(float(pmf.sum()) - 1) < 1e-12
    lengths = torch.arange(1, 25, dtype=torch.float64)
    mean = float((pmf * lengths).sum())
    assert abs(mean - 4.7086) < 1e-3                                 # the docstring's numbers
    assert abs(float(pmf[0]) - 0.3766) < 1e-4
    cdf = pmf.cumsum(0)
    assert cdf[0] < 0.5 < cdf[1]                                     # median is 2
    assert abs(float(pmf[0] / pmf[23]) - 24 ** 1.3) < 1e-9
    assert torch.allclose(SortTask(length_power=0.0).length_pmf(), torch.full((24,), 1 / 24, dtype=torch.float64))


def test_length_histogram_matches_power_law():
    task, n = SortTask(), 20_000
    lengths = task.sample_lengths(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(lengths - 1, minlength=24).double()
    expected = n * task.length_pmf()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 49.7                     # chi-square 99.9th percentile at 23 degrees of freedom
    # and per bin: |freq - p| < 4 standard errors sqrt(p(1-p)/n)
    p = task.length_pmf()
    assert bool(((counts / n - p).abs() < 4 * (p * (1 - p) / n).sqrt()).all())
    # the prompts themselves follow the same law (same generator stream: lengths drawn first)
    prompt_lengths = torch.tensor([len(x) - 2 for x in task.make_prompts(n, seed=0)])
    assert torch.equal(prompt_lengths, lengths)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_symbols=1), "n_symbols"),
    (dict(min_len=0), "min_len"),
    (dict(min_len=5, max_len=4), "min_len"),
    (dict(max_len=1000), "max_len"),
    (dict(length_power=-1.0), "length_power"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SortTask.{field}"):
        SortTask(**kwargs)
