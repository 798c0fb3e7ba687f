"""One statistics collector over calibration batches, shared by every pruning method.

Memory-bounded by construction: the calibration set is streamed block by block (the
``Catcher`` of SparseGPT/Wanda/FLAP).  The hidden states entering the first block are captured
once, then each block in turn is run on them with hooks that *accumulate* what the methods need
— per-layer input sums, squared sums and Gram matrices, and the pairwise Jensen–Shannon
divergences of the attention heads — and the block's outputs become the next block's inputs.
At any time only one block's inputs (and outputs) are held, never all layers' activations.

Token positions are all counted, padding included (fedleak's text batches are padded; the
statistics of pad positions are those of the model on pad tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedleak.pruning.adapters import Adapter, Attention, Block

Chunk = tuple[Tensor, dict]  # one calibration batch's hidden states and the block kwargs
Stream = list[Chunk]

# The four inputs a depth-2 pruner reads in a block.
TAPS = ("attn_in", "ctx", "ffn_in", "z")


class _Stop(Exception):
    """Raised by the catcher to end the model's forward at the first block."""


@torch.no_grad()
def block_inputs(adapter: Adapter, batches: Iterable[Tensor]) -> Stream:
    """The hidden states (and keyword arguments) the model feeds its first block, per batch."""
    stream: Stream = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        stream.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = adapter.first_block().register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                adapter.forward(ids)
    finally:
        handle.remove()
    return stream


@torch.no_grad()
def run(module: nn.Module, stream: Stream) -> Stream:
    """``module`` (one block) applied to every chunk of ``stream``."""
    out = []
    for hidden, kwargs in stream:
        result = module(hidden, **kwargs)
        out.append((result[0] if isinstance(result, tuple) else result, kwargs))
    return out


def taps(block: Block) -> dict[str, nn.Linear]:
    """The layer whose input each tap reads."""
    return {
        "attn_in": block.attn.q,
        "ctx": block.attn.o,
        "ffn_in": block.ffn.level1[0],
        "z": block.ffn.down,
    }


@dataclass
class Moments:
    """Streamed moments of one layer's input ``x`` (rows = tokens), in float64."""

    n: int = 0
    sum: Tensor | None = None  # sum of x
    sq: Tensor | None = None  # sum of x**2 (per channel)
    gram: Tensor | None = None  # sum of x x^T, with a ones column appended (bias)
    cross: Tensor | None = None  # sum of [x;1] [x_dense;1]^T against the dense model's input

    def add(self, x: Tensor, dense: Tensor | None, gram: bool) -> None:
        """Accumulate a chunk of inputs (and the dense model's inputs on the same tokens)."""
        x = x.reshape(-1, x.shape[-1]).double()
        self.n += len(x)
        s, q = x.sum(0), (x * x).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        if gram or dense is not None:
            xa = _augment(x)
            g = xa.T @ xa
            self.gram = g if self.gram is None else self.gram + g
        if dense is not None:
            c = xa.T @ _augment(dense.reshape(-1, dense.shape[-1]).double())
            self.cross = c if self.cross is None else self.cross + c

    @property
    def mean(self) -> Tensor:
        """E[x_j] per channel."""
        return self.sum / self.n

    @property
    def second(self) -> Tensor:
        """E[x_j^2] per channel."""
        return self.sq / self.n

    @property
    def var(self) -> Tensor:
        """Var(x_j) per channel (FLAP's fluctuation)."""
        return (self.second - self.mean**2).clamp_min(0)

    @property
    def sigma(self) -> Tensor:
        """The uncentred second-moment matrix E[x x^T] (without the ones column)."""
        return self.gram[:-1, :-1] / self.n


def _augment(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)


@dataclass
class Pass:
    """What one pass of a block over the calibration stream measured."""

    moments: dict[str, Moments] = field(default_factory=dict)
    js: Tensor | None = None  # [heads, heads] mean Jensen-Shannon divergence of head maps
    outputs: Stream | None = None


@torch.no_grad()
def collect(
    block: Block,
    stream: Stream,
    want: Iterable[str] = (),
    gram: Iterable[str] = (),
    dense: dict[str, list[Tensor]] | None = None,
    js: bool = False,
    keep_outputs: bool = False,
) -> Pass:
    """Run ``block`` over ``stream`` once, accumulating the moments of the taps in ``want``.

    ``gram``: the taps whose Gram matrix is needed; ``dense``: per tap, the dense model's input
    of that layer on the same chunks (for the cross-moments of a least-squares refit); ``js``:
    accumulate the heads' pairwise Jensen-Shannon divergence (needs eager attention).
    """
    want, gram = set(want) | set(gram) | set(dense or ()), set(gram)
    layers = taps(block)
    result = Pass({name: Moments() for name in want})
    chunk = [0]
    js_sum, rows = None, 0
    handles = []

    def tap(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            d = dense[name][chunk[0]] if dense and name in dense else None
            result.moments[name].add(args[0], d, name in gram)

        return hook

    for name in want:
        handles.append(layers[name].register_forward_pre_hook(tap(name)))

    def maps(module: nn.Module, args: tuple, output) -> None:
        nonlocal js_sum, rows
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise ValueError(
                "pruning: the head similarity needs attention probabilities; load the model "
                'with attn_implementation="eager"'
            )
        d, r = pairwise_js(weights)
        js_sum = d if js_sum is None else js_sum + d
        rows += r

    if js:
        handles.append(block.attn.module.register_forward_hook(maps))
    outputs = []
    try:
        for i, (hidden, kwargs) in enumerate(stream):
            chunk[0] = i
            out = block.module(hidden, **kwargs)
            if keep_outputs:
                outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    finally:
        for h in handles:
            h.remove()
    if js:
        result.js = js_sum / rows
    result.outputs = outputs if keep_outputs else None
    return result


@torch.no_grad()
def dense_inputs(block: Block, stream: Stream) -> tuple[dict[str, list[Tensor]], Stream]:
    """The dense block's four tap inputs per chunk, and its outputs (the next dense stream)."""
    layers = taps(block)
    store: dict[str, list[Tensor]] = {name: [] for name in TAPS}
    handles = [
        layers[name].register_forward_pre_hook(
            lambda m, a, name=name: store[name].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for name in TAPS
    ]
    try:
        outputs = run(block.module, stream)
    finally:
        for h in handles:
            h.remove()
    return store, outputs


def pairwise_js(weights: Tensor) -> tuple[Tensor, int]:
    """Summed Jensen-Shannon divergence (nats) between every two heads' attention rows.

    ``weights``: ``[batch, heads, queries, keys]`` probabilities.  Returns the ``[heads,
    heads]`` sums over the ``batch * queries`` rows, and that row count (GOA Eq. 1 divides).
    JS(P, Q) = KL(P || M)/2 + KL(Q || M)/2 with M = (P + Q)/2; 0 log 0 = 0.
    """
    p = weights.detach().double().transpose(0, 1).reshape(weights.shape[1], -1, weights.shape[-1])
    heads = len(p)
    self_info = torch.xlogy(p, p).sum(-1)  # [heads, rows]
    out = torch.zeros(heads, heads, dtype=torch.float64, device=p.device)
    for i in range(heads):
        for j in range(i + 1, heads):
            m = (p[i] + p[j]) / 2
            log_m = torch.log(m.clamp_min(1e-300))
            kl = self_info[i] + self_info[j] - ((p[i] + p[j]) * log_m).sum(-1)
            out[i, j] = out[j, i] = (kl / 2).sum()
    return out, p.shape[1]


def head_of(attn: Attention, channels: Tensor) -> Tensor:
    """Sum per-channel values of o's input into per-head values."""
    return channels.reshape(attn.heads, attn.head_dim).sum(-1)
