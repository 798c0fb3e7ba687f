import numpy as np
import pytest
import torch

from fedleak.metrics import monosemantic as mono


def test_sae_keeps_exactly_k_latents_and_reconstructs():
    g = torch.Generator().manual_seed(0)
    # 300 points that are sums of 3 of 20 non-negative atoms: a sparse code exists
    atoms = torch.rand(20, 12, generator=g)
    codes = torch.zeros(300, 20)
    picks = torch.rand(300, 20, generator=g).argsort(1)[:, :3]
    codes.scatter_(1, picks, 0.5 + torch.rand(300, 3, generator=g))
    x = codes @ atoms
    sae = mono.train_sae(x, latents=40, k=6, generator=torch.Generator().manual_seed(1), steps=600)
    code = sae.encode(x)
    assert ((code > 0).sum(1) == 6).all()
    assert mono.reconstruction_error(sae, x) < 0.05


def test_sae_bad_k_is_one_clear_error():
    with pytest.raises(ValueError, match="k must be in"):
        mono.TopKSAE(4, 8, 9, torch.Generator())
    with pytest.raises(ValueError, match="features must be"):
        mono.train_sae(torch.zeros(5), 8, 2, torch.Generator())


def test_semantic_consistency_separates_class_aligned_from_shared_dimensions():
    labels = torch.arange(40) % 4
    aligned = torch.nn.functional.one_hot(labels, 4).float()
    shared = torch.ones(40, 4)
    assert mono.semantic_consistency(aligned, labels) == pytest.approx(1.0)
    assert mono.semantic_consistency(shared, labels) == pytest.approx(0.25)
    assert mono.active_dimensions(torch.cat([aligned, torch.zeros(40, 3)], 1)) == 4
    assert mono.zero_fraction(aligned) == pytest.approx(0.75)


def test_effective_rank_counts_equal_directions():
    assert mono.effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert mono.effective_rank(torch.ones(6, 5)) == pytest.approx(1.0)


def test_symmetric_label_noise_flips_the_stated_share_to_other_classes():
    labels = np.arange(20_000) % 10
    noisy = mono.symmetric_label_noise(labels, 0.4, 10, np.random.default_rng(0))
    assert abs((noisy != labels).mean() - 0.4) < 0.01
    every = mono.symmetric_label_noise(labels, 1.0, 10, np.random.default_rng(0))
    assert (every != labels).all()
    with pytest.raises(ValueError, match="rate must be in"):
        mono.symmetric_label_noise(labels, 1.5, 10, np.random.default_rng(0))


def test_linear_probe_reads_separable_features():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = np.stack([y * 2.0 - 1 + 0.1 * rng.standard_normal(200), rng.standard_normal(200)], 1)
    assert mono.linear_probe((x[:100], y[:100]), (x[100:], y[100:])) > 0.95
    with pytest.raises(ValueError, match="c must be > 0"):
        mono.linear_probe((x, y), (x, y), c=0)
