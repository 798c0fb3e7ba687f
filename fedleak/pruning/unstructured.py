"""Unstructured anchors on the same streaming loop: SparseGPT and Wanda.

* ``sparsegpt`` — Frantar & Alistarh (ICML 2023), the solver in
  :func:`fedleak.pruning.sparsegpt.sparsegpt` on each linear layer's input Hessian.
* ``wanda`` — Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large
  Language Models" (ICLR 2024): keep, in every output row, the weights with the largest
  ``|W_ij| * ||x_j||``; no weight update.

Both go block by block: one pass collects every linear layer's input statistics on the
calibration stream (inputs that went through the already-pruned blocks, as in both papers),
every linear layer of the block is pruned to ``sparsity``, and a second pass computes the
block's outputs.  Always mask mode: unstructured zeros do not shrink dense tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedleak.pruning import PRUNERS
from fedleak.pruning.adapters import adapter
from fedleak.pruning.calibration import TAPS, block_inputs, collect, run
from fedleak.pruning.sparsegpt import sparsegpt
from fedleak.pruning.structured import Pruned, batches, block_range, check_blocks


@dataclass
class _Unstructured:
    sparsity: float = 0.5  # fraction of every pruned linear layer's weights zeroed
    blocks: tuple[int, ...] = ()  # [start, stop) of the blocks to prune; [] = all
    batch_size: int = 8  # calibration sequences per forward pass

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"{self.name}: sparsity must be in [0, 1), got {self.sparsity}")
        check_blocks(self.name, self.blocks)
        if self.batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {self.batch_size}")

    @torch.no_grad()
    def prune(self, model: nn.Module, calibration: Tensor | None, rng: torch.Generator) -> Pruned:
        """Prune every linear layer of the chosen blocks in place; masks by parameter name."""
        if calibration is None:
            raise ValueError(f"{self.name}: needs calibration token ids")
        start = time.perf_counter()
        ad = adapter(model)
        blocks = ad.blocks()
        chosen = block_range(self.blocks, len(blocks), self.name)
        names = {id(p): n for n, p in model.named_parameters()}
        was_training = model.training
        model.eval()
        stream = block_inputs(ad, batches(calibration, self.batch_size))
        masks = {}
        for block in blocks[: chosen.stop]:
            if block.index in chosen:
                measured = collect(block, stream, gram=TAPS if self.hessian else (), want=TAPS)
                layers = {
                    "attn_in": [block.attn.q, block.attn.k, block.attn.v],
                    "ctx": [block.attn.o],
                    "ffn_in": block.ffn.level1,
                    "z": [block.ffn.down],
                }
                for tap, linears in layers.items():
                    for linear in linears:
                        weight, keep = self.layer(linear.weight, measured.moments[tap])
                        linear.weight.copy_(weight)
                        masks[names[id(linear.weight)]] = keep.cpu()
            if block.index + 1 < chosen.stop:
                stream = run(block.module, stream)
        model.train(was_training)
        return Pruned(masks=masks, seconds=time.perf_counter() - start)


@PRUNERS.register("sparsegpt")
@dataclass
class SparseGPT(_Unstructured):
    """SparseGPT: per-layer OBS pruning with the calibration inputs' Hessian (unstructured)."""

    block_size: int = 128  # columns per lazy-update block
    damp: float = 0.01  # Hessian dampening, a fraction of its mean diagonal

    hessian = True

    def layer(self, weight: Tensor, moments) -> tuple[Tensor, Tensor]:
        """The pruned weight and its keep mask, from the layer's input moments."""
        hessian = moments.gram[:-1, :-1].float()
        return sparsegpt(weight, hessian, self.sparsity, block_size=self.block_size, damp=self.damp)


@PRUNERS.register("wanda")
@dataclass
class Wanda(_Unstructured):
    """Wanda: keep the largest |W_ij|·||x_j|| in every output row (unstructured, no update)."""

    hessian = False

    def layer(self, weight: Tensor, moments) -> tuple[Tensor, Tensor]:
        """The pruned weight and its keep mask, from the layer's input moments."""
        score = weight.detach().abs() * moments.sq.sqrt().to(weight)
        k = int(weight.shape[1] * self.sparsity)
        keep = torch.ones_like(weight, dtype=torch.bool)
        if k:
            order = torch.argsort(score, dim=1, stable=True)[:, :k]
            keep.scatter_(1, order, False)
        return weight.masked_fill(~keep, 0), keep
