"""Knowledge-retention robust pruning (KRP) and the layer-wise machinery it shares with SparseGPT.

Li, Lei, Cheng & Xu, "Towards Robust Pruning: An Adaptive Knowledge-Retention Pruning Strategy
for Language Models", EMNLP 2023 (arXiv 2310.13191).  The algorithm is reconstructed from the
paper's abstract and the authors' code (``../shared/notes/pruning.md`` §2); nothing is copied.

Post-training, layer by layer, for every ``nn.Linear`` of every encoder block in module order
(query, key, value, attention output, intermediate, output):

1. *Adaptive Hessian.*  Re-run the block on the **already pruned** network's inputs and collect
   the layer's input second moment ``H = X̂ᵀX̂ / n`` and ``X̂ᵀY / n``, where ``Y`` is the same
   layer's output in the **dense** model on the same tokens (bias: a column of ones).
2. *Adaptive rectification.*  Refit the layer by ridge least squares, ``[W b]* = (H + λI)⁻¹ X̂ᵀY``
   (``λ = ridge · mean diag H``, escalated ×10 while the Cholesky factorisation fails), so the
   pruned upstream signal reproduces the dense output: each layer absorbs the error accumulated
   before it.
3. *OBC/OBS pruning* of the refit weights against ``H``: per output row, repeatedly remove the
   weight of least saliency ``w_j² / [H⁻¹]_jj`` and move the others by the optimal-brain-surgeon
   update (``solver = "obc"``, exact, the authors' solver; ``O(k d²)`` per row: 3.6 min for one
   384 × 384 MiniLM layer at 50 % on one thread here), or SparseGPT's blocked approximation
   (``solver = "sparsegpt"``, the default, milliseconds; the solver of
   :mod:`fedleak.pruning.sparsegpt`).  Unstructured, or N:M (``n``
   zeros in every ``m`` consecutive inputs).
4. Write the sparse weights back; the next layer's statistics are collected afresh.

Embeddings, the pooler and the classifier stay dense.  The SparseGPT baseline is the same loop
with ``refit = False`` and one Hessian per block (``sequential = False``), as in Frantar &
Alistarh (ICML 2023): the original weights pruned against inputs from the pruned upstream.

The optional first stage of the paper, a robust dense model built by a greedy weight-averaged
"soup" of fine-tuned checkpoints, is :func:`greedy_soup` (a separate, optional step).

Departures: calibration statistics count only real tokens (padding masked out); the refit's bias
is kept after pruning (not re-solved); the Hessian damping of the OBS step is SparseGPT's 1 % of
the mean diagonal.

Threat model / what leaks: KRP runs on a client with its private calibration sentences.  The
pruned weights it sends are a function of ``X̂ᵀX̂`` and ``X̂ᵀY`` of those sentences (the refit is
a least-squares solve on them), and the mask is chosen by ``H⁻¹``: both are summaries of private
tokens.  The federated trainer declares the masks it sends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fedleak.pruning import PRUNERS
from fedleak.pruning.sparsegpt import sparsegpt
from fedleak.pruning.structured import Pruned

Solver = Literal["obc", "sparsegpt"]
LINEARS = (  # a BERT block's linear layers, in the order data flows through them
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def check_sparsity(sparsity: float, who: str, n: int = 0, m: int = 0) -> None:
    """One ValueError for a sparsity outside [0, 1) or an N:M pattern that is not n < m."""
    if not 0 <= sparsity < 1:
        raise ValueError(
            f"{who}: sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity}"
        )
    if (n or m) and not 0 < n < m:
        raise ValueError(
            f"{who}: an N:M pattern needs 0 < n < m (n zeros in every m inputs), got {n}:{m}; "
            "set n = m = 0 for unstructured sparsity"
        )


def ridge_refit(gram: Tensor, cross: Tensor, ridge: float = 1e-4) -> Tensor:
    """``(gram + λI)⁻¹ cross`` with ``λ = ridge · mean diag(gram)``, ×10 until Cholesky works.

    ``gram`` = X̂ᵀX̂ (inputs with a trailing column of ones), ``cross`` = X̂ᵀY: the solution is
    ``[Wᵀ; bᵀ]``, the least-squares layer mapping the inputs X̂ to the targets Y.
    """
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    lam = ridge * scale
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0:
            return torch.cholesky_solve(cross, chol)
        lam = lam * 10
    raise ValueError(f"ridge_refit: the Gram matrix is not positive definite even at λ = {lam:g}")


def _inverse_hessian(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(H + damp · mean diag · I)⁻¹ and the inputs never seen (zero diagonal: set to 1)."""
    h = hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.cholesky_inverse(torch.linalg.cholesky(h)), dead


def _group_full(pruned: Tensor, n: int, m: int) -> Tensor:
    """Inputs whose group of ``m`` already holds ``n`` zeros: not prunable any more."""
    rows, d = pruned.shape
    counts = pruned.view(rows, d // m, m).sum(-1, keepdim=True)
    return (counts >= n).expand(rows, d // m, m).reshape(rows, d)


def _check_nm(d: int, n: int, m: int, who: str) -> None:
    if m and d % m:
        raise ValueError(f"{who}: N:M needs m to divide the layer's {d} inputs, got m = {m}")


@torch.no_grad()
def obc_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    damp: float = 0.01,
    rows: int = 32,
) -> Tensor:
    """OBC (Frantar & Alistarh, NeurIPS 2022): exact greedy OBS, one weight at a time per row.

    Every row loses ``round(sparsity · d)`` weights (``n`` of every ``m`` with N:M), each the one
    of least ``w_j² / [H⁻¹]_jj``, the others moved by ``-w_j H⁻¹[j, :] / [H⁻¹]_jj`` and ``H⁻¹``
    downdated; ``rows`` rows are pruned in parallel.  Returns the pruned weight (zeros pruned).
    """
    check_sparsity(sparsity, "obc_prune", n, m)
    d = weight.shape[1]
    _check_nm(d, n, m, "obc_prune")
    k = d // m * n if m else round(sparsity * d)
    hinv, dead = _inverse_hessian(hessian.to(weight.dtype), damp)
    out = weight.clone()
    out[:, dead] = 0
    for start in range(0, len(out), rows):
        w = out[start : start + rows]
        r = torch.arange(len(w), device=w.device)
        h = hinv.expand(len(w), d, d).clone()
        pruned = torch.zeros_like(w, dtype=torch.bool)
        for _ in range(k):
            diag = h.diagonal(dim1=1, dim2=2)
            blocked = pruned | _group_full(pruned, n, m) if m else pruned
            score = (w**2 / diag).masked_fill(blocked, float("inf"))
            j = score.argmin(1)
            dj, wj, hj = diag[r, j], w[r, j], h[r, j]
            w -= (wj / dj)[:, None] * hj
            h -= hj[:, :, None] * hj[:, None, :] / dj[:, None, None]
            w[r, j] = 0
            pruned[r, j] = True
        w[pruned] = 0
    return out


def _sparsegpt_prune(
    weight: Tensor, hessian: Tensor, sparsity: float, n: int, m: int, damp: float
) -> Tensor:
    """SparseGPT's solver (:func:`fedleak.pruning.sparsegpt.sparsegpt`), N:M included.

    N:M departs from SparseGPT, which picks each group's zeros during its column sweep: here
    they are fixed first by the saliency ``w² / [H⁻¹]_jj²`` and the solver only compensates.
    """
    mask = None
    if m:
        _check_nm(weight.shape[1], n, m, "sparsegpt")
        hinv, _ = _inverse_hessian(hessian.to(weight.dtype), damp)
        mask = magnitude_mask(weight / hinv.diagonal(), 0.0, n, m)
    return sparsegpt(weight, hessian, sparsity, damp=damp, mask=mask)[0]


def magnitude_mask(weight: Tensor, sparsity: float, n: int = 0, m: int = 0) -> Tensor:
    """Keep-mask of the largest ``|w|``: per matrix, or the ``m - n`` largest of every ``m``."""
    check_sparsity(sparsity, "magnitude", n, m)
    if m:
        _check_nm(weight.shape[1], n, m, "magnitude")
        groups = weight.abs().reshape(weight.shape[0], -1, m)
        drop = groups.topk(n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(weight.shape)
    keep = weight.numel() - round(sparsity * weight.numel())
    flat = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    flat[weight.abs().flatten().topk(keep).indices] = True
    return flat.view_as(weight)


# --- the layer-wise loop over a BERT encoder ------------------------------------------------------


def encoder_blocks(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(the Hugging Face BERT-like model, its encoder blocks), from it or fedleak's wrapper."""
    inner = model.hf if hasattr(model, "hf") and hasattr(model, "pad_id") else model
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(b, "attention") for b in layers):
        raise ValueError(
            f"pruning: {type(model).__name__} is not a BERT-like encoder (bert.encoder.layer); "
            "KRP, SparseGPT and the randomized masks here prune BERT-family classifiers"
        )
    return inner, list(layers)


def prunable(model: nn.Module) -> dict[str, nn.Linear]:
    """The encoder blocks' linear layers by their names in ``model`` (what pruning touches)."""
    _, blocks = encoder_blocks(model)
    names = {id(mod): name for name, mod in model.named_modules()}
    return {names[id(b.get_submodule(n))]: b.get_submodule(n) for b in blocks for n in LINEARS}


@torch.no_grad()
def _block_inputs(model: nn.Module, ids: Tensor, pad_id: int) -> tuple[Tensor, dict]:
    """The first block's hidden-state input and keyword arguments on ``ids`` (the "catcher")."""
    inner, blocks = encoder_blocks(model)
    caught: dict = {}

    def catch(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        inner(input_ids=ids, attention_mask=(ids != pad_id).long())
    except _Caught:
        pass
    finally:
        handle.remove()
    return caught["hidden"], caught["kwargs"]


class _Caught(Exception):
    """Stops the forward pass once the first block's inputs are caught."""


class _Stats:
    """Running ``X̂ᵀX̂`` (with a ones column for the bias) and ``X̂ᵀY`` over real tokens, float64."""

    def __init__(self, bias: bool) -> None:
        self.bias = bias
        self.gram: Tensor | float = 0.0
        self.cross: Tensor | float = 0.0
        self.n = 0

    def add(self, x: Tensor, y: Tensor | None) -> None:
        """Add tokens ``x`` ``[n, d]`` (and their targets ``y`` ``[n, d_out]``)."""
        x = x.double()
        if self.bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
        self.gram = self.gram + x.T @ x
        if y is not None:
            self.cross = self.cross + x.T @ y.double()
        self.n += len(x)


@dataclass
class LayerwiseConfig:
    """How :func:`prune_layerwise` treats each layer (KRP, SparseGPT or a mix, for ablations)."""

    sparsity: float = 0.5
    n: int = 0  # N:M: n zeros in every m consecutive inputs (0, 0: unstructured)
    m: int = 0
    solver: Solver = "sparsegpt"
    refit: bool = True  # ridge refit to the dense outputs before pruning (KRP's rectification)
    sequential: bool = True  # re-collect the Hessian after every layer (KRP's adaptive Hessian)
    ridge: float = 1e-4  # λ of the refit, relative to mean diag(X̂ᵀX̂)
    damp: float = 0.01  # Hessian damping of the OBS step, relative to its mean diagonal
    batch: int = 32  # calibration sentences per forward

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "layerwise pruning", self.n, self.m)
        if self.solver not in ("obc", "sparsegpt"):
            raise ValueError(
                f"layerwise pruning: solver must be obc or sparsegpt, not {self.solver!r}"
            )
        if not self.ridge > 0 or not self.damp > 0:
            raise ValueError(
                f"layerwise pruning: ridge and damp must be > 0, got {self.ridge}, {self.damp}"
            )
        if self.batch < 1:
            raise ValueError(f"layerwise pruning: batch must be >= 1, got {self.batch}")


@torch.no_grad()
def prune_layerwise(
    model: nn.Module, ids: Tensor, pad_id: int, config: LayerwiseConfig
) -> dict[str, Tensor]:
    """Prune ``model``'s encoder in place on calibration ``ids``; return keep-masks by name.

    ``ids`` are token ids ``[N, T]`` padded with ``pad_id``.  With ``refit`` the dense model's
    layer outputs are the targets (KRP); without, the layer's own current output is, which makes
    the refit a no-op and leaves SparseGPT's plain OBS pruning.
    """
    if ids.dim() != 2 or not len(ids):
        raise ValueError(
            f"prune_layerwise: calibration ids must be [N, T] with N >= 1, got {tuple(ids.shape)}"
        )
    was_training = model.training
    model.eval()
    names = {id(mod): name for name, mod in model.named_modules()}
    _, blocks = encoder_blocks(model)
    dense_blocks = [_copy(b) for b in blocks]
    hidden, kwargs = _block_inputs(model, ids, pad_id)
    chunks = range(0, len(ids), config.batch)
    keep = [(ids[s : s + config.batch] != pad_id).flatten() for s in chunks]
    kw = [_sliced(kwargs, slice(s, s + config.batch), len(ids)) for s in chunks]
    pruned_in = [hidden[s : s + config.batch] for s in chunks]
    dense_in = list(pruned_in)
    masks: dict[str, Tensor] = {}
    solve = obc_prune if config.solver == "obc" else _sparsegpt_prune
    for block, dense in zip(blocks, dense_blocks, strict=True):
        layers = [block.get_submodule(n) for n in LINEARS]
        # The dense layers' outputs on the dense stream: the refit's targets, one pass per block.
        targets, dense_in = (
            _dense_pass(dense, dense_in, kw, keep) if config.refit else ({}, dense_in)
        )
        pending = list(range(len(LINEARS)))
        while pending:
            group = pending[:1] if config.sequential else pending
            inputs = _inputs(block, [layers[i] for i in group], pruned_in, kw, keep)
            for i, x in zip(group, inputs, strict=True):
                layer = layers[i]
                refit = config.refit and layer.bias is not None
                stats = _Stats(bias=refit)
                stats.add(x, targets.get(LINEARS[i]) if refit else None)
                weight = layer.weight.double()
                if refit:
                    solution = ridge_refit(
                        stats.gram / stats.n, stats.cross / stats.n, config.ridge
                    )
                    weight = solution[:-1].T
                    layer.bias.copy_(solution[-1])
                    hessian = stats.gram[:-1, :-1] / stats.n
                else:
                    hessian = stats.gram / stats.n
                if config.sparsity > 0 or config.m:
                    weight = solve(
                        weight, hessian, config.sparsity, config.n, config.m, config.damp
                    )
                layer.weight.copy_(weight)
                masks[names[id(layer)] + ".weight"] = weight != 0
            pending = [i for i in pending if i not in group]
        pruned_in = [block(x, **k) for x, k in zip(pruned_in, kw, strict=True)]
    model.train(was_training)
    return masks


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _sliced(kwargs: dict, part: slice, n: int) -> dict:
    """The keyword arguments of one chunk of sentences (tensors with a batch dimension sliced)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == n:
            value = value[part]
        out[key] = value
    return out


def _dense_pass(dense, stream, kw, keep) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Every dense layer's output on its real tokens (by LINEARS name), and the block outputs."""
    targets: dict[str, list[Tensor]] = {n: [] for n in LINEARS}
    handles = [
        dense.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: targets[n].append(out)
        )
        for n in LINEARS
    ]
    try:
        outputs = []
        for x, k, real in zip(stream, kw, keep, strict=True):
            outputs.append(dense(x, **k))
            for n in LINEARS:  # only real tokens are kept, to bound the memory
                targets[n][-1] = targets[n][-1].reshape(-1, targets[n][-1].shape[-1])[real]
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in targets.items()}, outputs


def _inputs(block, layers, stream, kw, keep) -> list[Tensor]:
    """The inputs (real tokens) of ``layers`` in the pruned stream; the block stops after them."""
    seen: dict[int, list[Tensor]] = {id(layer): [] for layer in layers}
    last = layers[-1]

    def hook(mod, args, out):
        seen[id(mod)].append(args[0])
        if mod is last:
            raise _Caught

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        for x, k, real in zip(stream, kw, keep, strict=True):
            with contextlib.suppress(_Caught):
                block(x, **k)
            for layer in layers:
                got = seen[id(layer)]
                got[-1] = got[-1].reshape(-1, got[-1].shape[-1])[real]
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(seen[id(layer)]) for layer in layers]


@PRUNERS.register("krp")
@dataclass
class KRP(LayerwiseConfig):
    """KRP: ridge refit to the dense outputs, then OBS pruning, layer by layer (unstructured)."""

    def prune(self, model: nn.Module, calibration: Tensor | None, rng: torch.Generator) -> Pruned:
        """Prune ``model`` in place on ``calibration`` ids; keep-masks by parameter name."""
        if calibration is None:
            raise ValueError("krp: needs calibration token ids (the client's own sentences)")
        start = time.perf_counter()
        masks = prune_layerwise(model, calibration, getattr(model, "pad_id", 0), self)
        return Pruned(masks=masks, seconds=time.perf_counter() - start)


# --- stage A: greedy weight-averaged soup -------------------------------------------------------


def greedy_soup(
    checkpoints: Sequence[dict[str, Tensor]], score: Callable[[dict[str, Tensor]], float]
) -> tuple[dict[str, Tensor], list[bool]]:
    """KRP's optional first stage: a robust dense model by greedy pairwise weight averaging.

    Checkpoints are sorted by ``score`` (e.g. accuracy under attack on a held-out split, higher
    is better); starting from the best, each next one is averaged in, ``w ← (w + w_i) / 2`` (a
    running pairwise mean, as the authors' code does, not a uniform mean), and kept only if the
    score improves.  Returns the soup and, per checkpoint in the given order, whether it joined.
    """
    if not checkpoints:
        raise ValueError("greedy_soup: give at least one checkpoint")
    scores = [score(c) for c in checkpoints]
    order = sorted(range(len(checkpoints)), key=lambda i: -scores[i])
    soup, best = dict(checkpoints[order[0]]), scores[order[0]]
    joined = [False] * len(checkpoints)
    joined[order[0]] = True
    for i in order[1:]:
        trial = {
            k: (v + checkpoints[i][k]) / 2 if v.is_floating_point() else v for k, v in soup.items()
        }
        value = score(trial)
        if value > best:
            soup, best, joined[i] = trial, value, True
    return soup, joined
