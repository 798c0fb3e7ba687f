"""Select, apply, recover: what every structured pruner does with its scores.

* **select** keeps the highest-scoring heads / channels of a block.  Heads honour grouped-query
  attention: with ``gqa = "per_group"`` the same number of query heads is removed from every
  key/value group (the k/v projections stay whole), with ``"whole_group"`` whole groups go (a
  key/value head with all its query heads).  Either way ``heads % kv_heads == 0`` still holds,
  and at least ``min_heads`` heads stay.  Channel counts are rounded to ``round_to``.
* **apply** either masks (zeroes the level-1 rows and level-2 columns: shapes, state_dict keys
  and therefore the federation's aggregation are unchanged) or removes them physically (the
  tensors shrink, so do the FLOPs; the attention module's head counts are updated).
* **recover** is an optional refit of the level-2 layer on the kept channels: a ridge-regularised
  least-squares fit to the dense outputs (GOA's reconstruction) or FLAP's mean-bias
  compensation.  Both are computed from :class:`fedleak.pruning.calibration.Moments` and written
  by :func:`apply` into the kept columns (and the bias).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fedleak.pruning.adapters import Adapter, Attention, Block, keep_columns, keep_rows
from fedleak.pruning.calibration import Moments

Mode = Literal["mask", "physical"]
Gqa = Literal["per_group", "whole_group"]


def heads_to_remove(attn: Attention, ratio: float, gqa: Gqa, min_heads: int) -> int:
    """How many query heads a ratio removes, rounded to what GQA allows."""
    step = attn.kv_heads if (gqa == "per_group" and attn.group > 1) else attn.group
    count = round(ratio * attn.heads / step) * step
    most = attn.heads - max(min_heads, 1)
    if gqa == "per_group" and attn.group > 1:
        most = min(most, attn.heads - attn.kv_heads)  # at least one query head per group
    return max(0, min(count, most - most % step))


def select_heads(scores: Tensor, attn: Attention, count: int, gqa: Gqa) -> Tensor:
    """The query heads kept (sorted) when the ``count`` lowest-scoring ones go, GQA-aware."""
    if count == 0:
        return torch.arange(attn.heads)
    if gqa == "per_group" and attn.group > 1:
        per = count // attn.kv_heads
        grouped = scores.reshape(attn.kv_heads, attn.group)
        order = torch.sort(grouped, dim=1, stable=True).indices[:, per:]
        kept = order + torch.arange(attn.kv_heads).unsqueeze(1) * attn.group
        return kept.flatten().sort().values
    groups = scores.reshape(attn.kv_heads, attn.group).sum(1)
    gone = torch.sort(groups, stable=True).indices[: count // attn.group]
    keep = torch.ones(attn.kv_heads, dtype=torch.bool)
    keep[gone] = False
    return (torch.arange(attn.heads).reshape(attn.kv_heads, attn.group)[keep]).flatten()


def channels_to_remove(channels: int, ratio: float, round_to: int) -> int:
    """How many FFN channels a ratio removes (a multiple of ``round_to``, at least one kept)."""
    count = round(ratio * channels / round_to) * round_to
    return max(0, min(count, channels - round_to))


def select_channels(scores: Tensor, count: int) -> Tensor:
    """The channels kept (sorted) when the ``count`` lowest-scoring ones go."""
    return torch.sort(torch.sort(scores, stable=True).indices[count:]).values


def head_channels(attn: Attention, heads: Tensor) -> Tensor:
    """The o-input channels (and q rows) of query heads ``heads``."""
    return (heads.unsqueeze(1) * attn.head_dim + torch.arange(attn.head_dim)).flatten()


def kv_kept(attn: Attention, heads: Tensor) -> Tensor:
    """The key/value heads still read by the query heads ``heads``."""
    return torch.unique(heads // attn.group)


@torch.no_grad()
def apply_heads(
    adapter: Adapter,
    block: Block,
    kept: Tensor,
    mode: Mode,
    o_weight: Tensor | None = None,
    o_bias: Tensor | None = None,
) -> None:
    """Prune the attention of ``block`` to the query heads ``kept``.

    ``o_weight`` (``[out, kept channels]``) and ``o_bias``: a recovered output projection.
    """
    attn = block.attn
    rows = head_channels(attn, kept)
    kv = kv_kept(attn, kept)
    kv_rows = head_channels_kv(attn, kv)
    _prune_depth2([attn.q], attn.o, rows, mode, o_weight, o_bias)
    if len(kv) < attn.kv_heads:
        _prune_depth2([attn.k, attn.v], None, kv_rows, mode)
    if mode == "physical":
        adapter.set_heads(attn, len(kept), len(kv))
        attn.heads, attn.kv_heads = len(kept), len(kv)


def head_channels_kv(attn: Attention, kv: Tensor) -> Tensor:
    """The k/v rows of key/value heads ``kv``."""
    return (kv.unsqueeze(1) * attn.head_dim + torch.arange(attn.head_dim)).flatten()


@torch.no_grad()
def apply_channels(
    block: Block,
    kept: Tensor,
    mode: Mode,
    down_weight: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> None:
    """Prune the FFN of ``block`` to the inner channels ``kept``."""
    _prune_depth2(block.ffn.level1, block.ffn.down, kept, mode, down_weight, down_bias)


def _prune_depth2(
    level1: list[nn.Linear],
    level2: nn.Linear | None,
    kept: Tensor,
    mode: Mode,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    kept = kept.to(level1[0].weight.device)
    if level2 is not None and bias is not None:
        _set_bias(level2, bias)
    if mode == "physical":
        for layer in level1:
            keep_rows(layer, kept)
        if level2 is not None:
            keep_columns(level2, kept)
            if weight is not None:
                level2.weight.copy_(weight)
        return
    gone = torch.ones(level1[0].out_features, dtype=torch.bool, device=kept.device)
    gone[kept] = False
    for layer in level1:
        layer.weight[gone] = 0
        if layer.bias is not None:
            layer.bias[gone] = 0
    if level2 is not None:
        if weight is not None:
            level2.weight[:, kept] = weight.to(level2.weight.dtype)
        level2.weight[:, gone] = 0


def _set_bias(layer: nn.Linear, bias: Tensor) -> None:
    """Give ``layer`` the bias ``bias`` (creating the parameter if it had none, as FLAP does)."""
    bias = bias.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.clone())
    else:
        layer.bias.copy_(bias)


def bias_compensation(layer: nn.Linear, moments: Moments, kept: Tensor) -> Tensor:
    """FLAP's baseline bias: the removed inputs' mean contribution folded into the bias."""
    gone = torch.ones(layer.in_features, dtype=torch.bool)
    gone[kept.cpu()] = False
    w = layer.weight.detach().double()
    mean = moments.mean.to(w.device)
    old = layer.bias.detach().double() if layer.bias is not None else torch.zeros(len(w))
    return (old.to(w.device) + w[:, gone.to(w.device)] @ mean[gone.to(w.device)]).float()


def least_squares(
    moments: Moments, dense: nn.Linear, kept: Tensor | None = None, ridge: float = 1e-2
) -> tuple[Tensor, Tensor | None]:
    """Refit a layer on its kept inputs to reproduce the dense layer's outputs (ridge LS).

    Solves ``(X̂ᵀX̂ + λI) W̄ᵀ = X̂ᵀ Y`` with ``X̂`` the current (pruned model's) inputs restricted
    to ``kept``, ``Y = X Wᵀ + b`` the dense layer's outputs on the dense model's inputs ``X``,
    and a ones column on ``X̂`` when the dense layer has a bias.  ``λ = ridge * mean
    diag(X̂ᵀX̂)``, multiplied by 10 until the Cholesky factorisation succeeds (as GOA's code
    does).  Returns the weight over the kept inputs and the bias (None without one).
    """
    if moments.cross is None:
        raise ValueError("least_squares needs the cross-moments with the dense model's inputs")
    full = moments.gram.shape[0] - 1
    w = dense.weight.detach().double()
    if w.shape[1] != full:
        raise ValueError(f"least_squares: the dense layer reads {w.shape[1]} inputs, not {full}")
    kept = torch.arange(full) if kept is None else kept.cpu()
    has_bias = dense.bias is not None
    rows = torch.cat([kept, torch.tensor([full])]) if has_bias else kept
    gram = moments.gram[rows][:, rows]
    target = torch.cat(
        [
            w.T.cpu(),
            (
                dense.bias.detach().double().cpu()
                if has_bias
                else torch.zeros(len(w), dtype=torch.float64)
            )[None],
        ]
    )
    rhs = moments.cross[rows] @ target
    lam = ridge * gram.diagonal().mean()
    eye = torch.eye(len(gram), dtype=gram.dtype)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if info == 0:
            break
        lam = lam * 10
    solution = torch.cholesky_solve(rhs, factor).to(dense.weight.device)
    if has_bias:
        return solution[:-1].T.float(), solution[-1].float()
    return solution.T.float(), None
