"""PartialFC sampling: positives kept, no duplicates, exact count, seeded, global RNG untouched."""

import pytest
import torch

from fastpfc.sampling import num_sampled, sample_centers


def _draw(labels, num_classes, rate, seed):
    return sample_centers(labels, num_classes, rate, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.77, 1.0])
def test_sample_properties(rate):
    labels = torch.randint(0, 1000, (300,))
    index, target_pos = _draw(labels, 1000, rate, seed=0)
    positives = torch.unique(labels)
    assert index.numel() == max(int(rate * 1000), positives.numel())
    assert torch.unique(index).numel() == index.numel(), "duplicates in the sample"
    assert torch.all(index[1:] > index[:-1]), "index must be sorted"
    assert torch.isin(positives, index).all(), "a positive class was dropped"
    assert torch.equal(index[target_pos], labels)


def test_num_sampled_rule():
    assert num_sampled(100, 0.3, 5) == 30
    assert num_sampled(100, 0.01, 7) == 7
    assert num_sampled(100, 1.0, 7) == 100


def test_seeded_and_independent_of_global_rng():
    labels = torch.randint(0, 500, (64,))
    rng_before = torch.get_rng_state()
    first, _ = _draw(labels, 500, 0.2, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(first, _draw(labels, 500, 0.2, seed=11)[0])
    assert not torch.equal(first, _draw(labels, 500, 0.2, seed=12)[0])


def test_negatives_are_uniform():
    """Every non-positive class is drawn with probability (k - #pos) / (C - #pos)."""
    labels = torch.tensor([0, 1, 2, 2])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(40)
    draws = 2000
    for _ in range(draws):
        index, _ = sample_centers(labels, 40, 0.25, gen)
        counts[index] += 1
    assert torch.all(counts[:3] == draws)
    freq = counts[3:] / draws
    expected = (10 - 3) / (40 - 3)
    assert torch.all((freq - expected).abs() < 0.05), freq
