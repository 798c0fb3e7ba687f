"""The structured pruning loop every method shares: block by block, score -> select -> apply.

For each block in ``blocks`` (in order, on inputs that went through the already-pruned blocks,
so every block's statistics see the upstream pruning, as in SparseGPT, FLAP and GOA):

1. attention: the method scores the query heads (it may run passes over the calibration
   stream, and refit the level-1 layers first), the lowest-scoring heads go (GQA-aware, see
   :mod:`fedleak.pruning.structure`), the method may recover the output projection on the kept
   heads, and the heads are masked or removed;
2. FFN: the same for the inner channels, on inputs that already see the pruned attention;
3. the block's outputs become the next block's inputs.

What ``ratio`` means: the fraction of FFN channels removed in every pruned block, and the
fraction of query heads, rounded to the nearest count grouped-query attention allows (SmolLM2's
9 heads in 3 groups: 0 heads at 10 %, 3 heads at 20 % and 30 %).  Channels, not parameters:
:func:`parameter_count` reports what that removes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fedleak.pruning import structure
from fedleak.pruning.adapters import Adapter, Block, adapter
from fedleak.pruning.calibration import Pass, Stream, block_inputs, collect, dense_inputs, run

MIN_TOKENS_PER_DIM = 2.0  # least-squares refits need this many calibration tokens per input


@dataclass
class Pruned:
    """What a pruner did: the kept structure per block and the statistics it computed.

    ``head_mask`` ``[blocks, heads]`` and ``channel_mask`` ``[blocks, channels]`` are in the
    dense model's coordinates (True = kept; unpruned blocks all True): the index maps a server
    needs to put a pruned model back in the global shape.  ``masks`` (unstructured pruning):
    parameter name -> kept entries.  ``stats``: per-block statistics of the calibration data
    the scores came from (what a client would reveal by sending them).
    """

    head_mask: Tensor | None = None
    channel_mask: Tensor | None = None
    masks: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Context:
    """One block being pruned, as a method sees it."""

    adapter: Adapter
    block: Block
    stream: Stream | None  # calibration hidden states entering the block (pruned model)
    rng: torch.Generator
    dense: dict[str, list[Tensor]] | None = None  # dense model's tap inputs (refit only)
    dense_layers: dict[str, nn.Linear] = field(default_factory=dict)  # dense copies (refit)
    last: Pass | None = None  # the method's latest pass (kept for its recovery step)

    def collect(self, **kwargs: Any) -> Pass:
        """One pass of the block over the calibration stream (see calibration.collect)."""
        if self.stream is None:
            raise ValueError(f"{self.method_name}: needs calibration data")
        self.last = collect(self.block, self.stream, **kwargs)
        return self.last

    method_name: str = "pruning"


def batches(calibration: Tensor, batch_size: int) -> Iterable[Tensor]:
    """Calibration token ids ``[N, T]`` in batches (the stream stays per batch)."""
    return [calibration[i : i + batch_size] for i in range(0, len(calibration), batch_size)]


def check_ratio(name: str, ratio: float) -> None:
    """A ValueError unless ``ratio`` is a fraction in [0, 1)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"{name}: ratio must be in [0, 1) (a fraction of channels), got {ratio}")


def check_tokens(name: str, calibration: Tensor | None, dims: int) -> None:
    """Refuse a least-squares refit on too few tokens (it overfits: notes §6.5)."""
    tokens = 0 if calibration is None else calibration.numel()
    need = int(MIN_TOKENS_PER_DIM * dims)
    if tokens < need:
        raise ValueError(
            f"{name}: the least-squares refit needs at least {need} calibration tokens "
            f"({MIN_TOKENS_PER_DIM:g} per input dimension, {dims} here), got {tokens}; give more "
            "calibration sequences or set refit = false"
        )


def block_range(blocks: tuple[int, ...], total: int, name: str) -> range:
    """``()`` = every block; ``(start, stop)`` = blocks start .. stop - 1."""
    if not blocks:
        return range(total)
    start, stop = blocks
    if not 0 <= start < stop <= total:
        raise ValueError(
            f"{name}: blocks = {list(blocks)} must be [start, stop) with 0 <= start < stop <= "
            f"{total} (the model's blocks)"
        )
    return range(start, stop)


def check_blocks(name: str, blocks: tuple[int, ...]) -> None:
    """A ValueError unless ``blocks`` is [] or [start, stop)."""
    if blocks and (len(blocks) != 2 or blocks[0] < 0 or blocks[1] <= blocks[0]):
        raise ValueError(f"{name}: blocks must be [] (all) or [start, stop), got {list(blocks)}")


@torch.no_grad()
def prune_structured(
    model: nn.Module, calibration: Tensor | None, method: Any, rng: torch.Generator
) -> Pruned:
    """Prune ``model`` in place with ``method`` (a structured pruner's options and scores)."""
    start = time.perf_counter()
    ad = adapter(model)
    blocks = ad.blocks()
    chosen = block_range(method.blocks, len(blocks), method.name)
    refit = getattr(method, "refit", False)
    if refit:
        check_tokens(method.name, calibration, max(b.ffn.channels for b in blocks))
    was_training = model.training
    model.eval()
    stream = (
        block_inputs(ad, batches(calibration, method.batch_size))
        if calibration is not None and method.needs_data
        else None
    )
    dense_stream = stream if refit else None
    heads = torch.ones(len(blocks), blocks[0].attn.heads, dtype=torch.bool)
    channels = torch.ones(len(blocks), blocks[0].ffn.channels, dtype=torch.bool)
    stats: dict[str, list[Tensor]] = {}
    for block in blocks:
        if block.index not in chosen:
            if stream is not None and block.index < chosen.stop:
                if dense_stream is not None:
                    dense_stream = stream = run(block.module, stream)
                else:
                    stream = run(block.module, stream)
            continue
        ctx = Context(ad, block, stream, rng, method_name=method.name)
        if refit:
            ctx.dense, dense_stream = dense_inputs(block, dense_stream)
            ctx.dense_layers = {
                name: copy.deepcopy(layer)
                for name, layer in {
                    "q": block.attn.q,
                    "k": block.attn.k,
                    "v": block.attn.v,
                    "o": block.attn.o,
                    "down": block.ffn.down,
                    **{f"level1.{i}": lay for i, lay in enumerate(block.ffn.level1)},
                }.items()
            }
        if method.attention:
            count = structure.heads_to_remove(
                block.attn, method.ratio, method.gqa, method.min_heads
            )
            if count:
                scores = method.head_scores(ctx)
                kept = structure.select_heads(scores, block.attn, count, method.gqa)
                weight, bias = method.head_recovery(ctx, kept)
                structure.apply_heads(ad, block, kept, method.mode, weight, bias)
                heads[block.index] = False
                heads[block.index, kept] = True
        if method.ffn:
            count = structure.channels_to_remove(block.ffn.channels, method.ratio, method.round_to)
            if count:
                scores = method.channel_scores(ctx)
                kept = structure.select_channels(scores, count)
                weight, bias = method.channel_recovery(ctx, kept)
                structure.apply_channels(block, kept, method.mode, weight, bias)
                channels[block.index] = False
                channels[block.index, kept] = True
                stats.setdefault("channel_scores", []).append(scores.float().cpu())
        if stream is not None and block.index + 1 < chosen.stop:
            stream = run(block.module, stream)
    model.train(was_training)
    return Pruned(
        head_mask=heads,
        channel_mask=channels,
        stats={k: torch.stack(v) for k, v in stats.items()},
        seconds=time.perf_counter() - start,
    )


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model`` that are not exactly zero (masked ones do not count)."""
    return sum(int((p != 0).sum()) for p in model.parameters())


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token at ``seq_len``: 2 per nonzero linear weight, plus attention.

    Attention scores and mixing cost ``4 * heads * head_dim * (seq_len + 1) / 2`` per token and
    block (causal average; an encoder's full attention is counted the same, a lower bound).
    """
    linear = sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    attention = 0.0
    try:
        for block in adapter(model).blocks():
            kept = int((block.attn.q.weight.abs().sum(1) != 0).sum())
            attention += 4 * kept * (seq_len + 1) / 2
    except ValueError:
        pass
    return 2.0 * linear + attention


@dataclass
class StructuredOptions:
    """Options every structured pruner takes (its TOML fields), and its ``prune``."""

    ratio: float = 0.2  # fraction of FFN channels and of query heads removed per pruned block
    mode: structure.Mode = "mask"  # "mask": zero them (shapes kept); "physical": remove them
    blocks: tuple[int, ...] = ()  # [start, stop) of the blocks to prune; [] = all
    gqa: structure.Gqa = "per_group"  # GQA heads: same count per group, or whole groups
    min_heads: int = 1  # heads every pruned block keeps
    round_to: int = 1  # FFN channel counts removed are multiples of this
    attention: bool = True  # prune heads
    ffn: bool = True  # prune FFN channels
    batch_size: int = 8  # calibration sequences per forward pass

    needs_data = True  # class attribute: whether the scores read calibration data

    def __post_init__(self) -> None:
        check_ratio(self.name, self.ratio)
        check_blocks(self.name, self.blocks)
        if self.mode not in ("mask", "physical"):
            raise ValueError(f"{self.name}: mode must be 'mask' or 'physical', got {self.mode!r}")
        if self.gqa not in ("per_group", "whole_group"):
            raise ValueError(
                f"{self.name}: gqa must be 'per_group' or 'whole_group', got {self.gqa!r}"
            )
        for option in ("min_heads", "round_to", "batch_size"):
            if getattr(self, option) < 1:
                raise ValueError(f"{self.name}: {option} must be >= 1, got {getattr(self, option)}")

    def prune(self, model: nn.Module, calibration: Tensor | None, rng: torch.Generator) -> Pruned:
        """Prune ``model`` in place; ``calibration``: token ids ``[N, T]`` (None: data-free)."""
        if self.needs_data and calibration is None:
            raise ValueError(f"{self.name}: needs calibration token ids (it scores on data)")
        return prune_structured(model, calibration, self, rng)

    def head_recovery(self, ctx: Context, kept: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """No recovery: the kept heads' weights stay as they are."""
        return None, None

    def channel_recovery(self, ctx: Context, kept: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """No recovery: the kept channels' weights stay as they are."""
        return None, None
