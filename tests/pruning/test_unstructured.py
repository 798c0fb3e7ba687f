"""SparseGPT's solver and the unstructured pruners on tiny models."""

from __future__ import annotations

import torch

from fedleak.pruning import PRUNERS
from fedleak.pruning.sparsegpt import sparsegpt
from tests.pruning.conftest import outputs, tiny_llama, tokens


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 48, generator=g) @ torch.randn(48, 48, generator=g)  # correlated inputs
    w = torch.randn(16, 48, generator=g)
    return x, w


def test_sparsegpt_hits_the_sparsity_and_beats_magnitude_on_the_layer_output():
    x, w = _layer()
    pruned, keep = sparsegpt(w, x.T @ x, 0.5, block_size=16)
    assert (pruned == 0).float().mean().item() >= 0.5
    assert torch.equal(pruned != 0, keep)
    magnitude = w.clone()
    magnitude[w.abs() < w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    error = (x @ (pruned - w).T).pow(2).mean()
    assert error < (x @ (magnitude - w).T).pow(2).mean()


def test_sparsegpt_with_nothing_to_prune_returns_the_weight():
    x, w = _layer(1)
    pruned, keep = sparsegpt(w, x.T @ x, 0.0)
    assert keep.all() and torch.allclose(pruned, w, atol=1e-5)


def test_sparsegpt_with_a_given_mask_keeps_exactly_it():
    x, w = _layer(2)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    pruned, keep = sparsegpt(w, x.T @ x, 0.5, mask=mask)
    assert torch.equal(keep, mask) and torch.equal(pruned != 0, mask)


def test_unstructured_pruners_on_a_tiny_llama():
    calib, ids = tokens(32, 24), tokens(4, 12, seed=7)
    dense = outputs(tiny_llama(), ids)
    errors = {}
    for name in ("sparsegpt", "wanda"):
        model = tiny_llama()
        pruned = PRUNERS[name](sparsity=0.5).prune(model, calib, torch.Generator())
        assert len(pruned.masks) == 2 * 7  # q k v o gate up down in both blocks
        for param, keep in pruned.masks.items():
            weight = dict(model.named_parameters())[param]
            assert keep.float().mean().item() == 0.5 and not weight[~keep].any()
        errors[name] = (outputs(model, ids) - dense).pow(2).mean().item()
    assert errors["sparsegpt"] < errors["wanda"] * 1.5  # same ballpark; SparseGPT updates weights
