"""The structured anchors GOA is measured against, on the same loop and statistics.

* ``magnitude`` — the L2 norm of each group's weights (a head's q rows and o columns; a
  channel's level-1 rows and down column), data-free; the "L2" rows of GOA's Table 1 and
  Torch-Pruning's ``GroupMagnitudeImportance``.
* ``random`` — uniform random scores from the caller's generator.
* ``wanda_sp`` — Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language
  Models", ICLR 2024) made structured as in An et al.'s FLAP paper: the level-2 weights' Wanda
  scores ``|W_ij| * ||x_j||`` summed over each channel (or head).
* ``flap`` — An, Zhao, Yu, Tang, Wang, "Fluctuation-based Adaptive Structured Pruning for Large
  Language Models" (AAAI 2024): the fluctuation metric ``Var(x_j) * ||W_:,j||²`` and the
  baseline bias compensation (the removed channels' mean contribution folded into the level-2
  bias; Llama's bias-free projections get a bias, as FLAP's code does).  Departure: FLAP's best
  setting standardises scores and chooses an adaptive per-layer structure (AL-AM); here every
  pruned block removes the same fraction (its UL-UM setting), like every other method in the
  table, so that the comparison is of scores and recovery only.

Statistics come from a pass over the calibration stream *after* the upstream blocks (and, for
the FFN, this block's attention) were pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedleak.pruning import PRUNERS
from fedleak.pruning.calibration import head_of
from fedleak.pruning.structure import bias_compensation, head_channels
from fedleak.pruning.structured import Context, StructuredOptions


def _head_weights_norm(ctx: Context) -> Tensor:
    attn = ctx.block.attn
    q = attn.q.weight.detach().double().pow(2).sum(1)
    o = attn.o.weight.detach().double().pow(2).sum(0)
    return head_of(attn, q + o).sqrt()


@PRUNERS.register("magnitude")
@dataclass
class Magnitude(StructuredOptions):
    """Structured magnitude pruning: the L2 norm of each head's / channel's weights (data-free)."""

    needs_data = False

    def head_scores(self, ctx: Context) -> Tensor:
        """One score per query head (lowest pruned first)."""
        return _head_weights_norm(ctx)

    def channel_scores(self, ctx: Context) -> Tensor:
        """One score per FFN channel (lowest pruned first)."""
        ffn = ctx.block.ffn
        total = ffn.down.weight.detach().double().pow(2).sum(0)
        for layer in ffn.level1:
            total = total + layer.weight.detach().double().pow(2).sum(1)
        return total.sqrt()


@PRUNERS.register("random")
@dataclass
class Random(StructuredOptions):
    """Structured random pruning: uniform random scores from the caller's generator."""

    needs_data = False

    def head_scores(self, ctx: Context) -> Tensor:
        """One score per query head (lowest pruned first)."""
        return torch.rand(ctx.block.attn.heads, generator=ctx.rng, dtype=torch.float64)

    def channel_scores(self, ctx: Context) -> Tensor:
        """One score per FFN channel (lowest pruned first)."""
        return torch.rand(ctx.block.ffn.channels, generator=ctx.rng, dtype=torch.float64)


@PRUNERS.register("wanda_sp")
@dataclass
class WandaSP(StructuredOptions):
    """Wanda-sp: level-2 Wanda scores |W_ij|·||x_j|| summed per channel / head."""

    def head_scores(self, ctx: Context) -> Tensor:
        """One score per query head (lowest pruned first)."""
        ctx.collect(want=("ctx",))
        return head_of(ctx.block.attn, _wanda(ctx.block.attn.o.weight, ctx.last.moments["ctx"]))

    def channel_scores(self, ctx: Context) -> Tensor:
        """One score per FFN channel (lowest pruned first)."""
        ctx.collect(want=("z",))
        return _wanda(ctx.block.ffn.down.weight, ctx.last.moments["z"])


def _wanda(weight: Tensor, moments) -> Tensor:
    norms = moments.sq.sqrt().to(weight.device)
    return (weight.detach().double().abs() * norms).sum(0).cpu()


@PRUNERS.register("flap")
@dataclass
class Flap(StructuredOptions):
    """FLAP: fluctuation Var(x_j)·||W_:,j||² and mean-bias compensation (uniform structure)."""

    compensate: bool = True  # FLAP's baseline bias compensation

    def head_scores(self, ctx: Context) -> Tensor:
        """One score per query head (lowest pruned first)."""
        ctx.collect(want=("ctx",))
        return head_of(ctx.block.attn, _fluctuation(ctx.block.attn.o.weight, ctx.last))

    def channel_scores(self, ctx: Context) -> Tensor:
        """One score per FFN channel (lowest pruned first)."""
        ctx.collect(want=("z",))
        return _fluctuation(ctx.block.ffn.down.weight, ctx.last, "z")

    def head_recovery(self, ctx: Context, kept: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Fold the removed heads' mean output into o's bias."""
        if not self.compensate:
            return None, None
        channels = head_channels(ctx.block.attn, kept)
        return None, bias_compensation(ctx.block.attn.o, ctx.last.moments["ctx"], channels)

    def channel_recovery(self, ctx: Context, kept: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Fold the removed channels' mean output into down's bias."""
        if not self.compensate:
            return None, None
        return None, bias_compensation(ctx.block.ffn.down, ctx.last.moments["z"], kept)


def _fluctuation(weight: Tensor, last, tap: str = "ctx") -> Tensor:
    var = last.moments[tap].var
    return (weight.detach().double().pow(2).sum(0).cpu() * var).cpu()
