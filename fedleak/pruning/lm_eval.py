"""Perplexity of a causal LM on fixed WikiText-2 windows: what the pruning tables report.

The LLM-Pruner / FLAP / GOA convention: non-overlapping windows of 128 tokens, each scored on
its own (no context carried over), perplexity = exp(mean token negative log-likelihood).  This
keeps absolute numbers higher than the usual 2,048-token protocol (GOA's dense LLaMA-7B is
12.62 this way, not 5.68).

The raw WikiText-2 test split (``wiki.test.raw``) is tokenised once and split in two halves:
calibration windows are drawn from the first half, evaluation windows are evenly spaced over
the second, so the calibration text never overlaps the text scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn


def wikitext_ids(path: str | Path, tokenizer) -> Tensor:
    """The whole file as one sequence of token ids (lines joined as in the raw file)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist; point to WikiText-2's wiki.test.raw (e.g. ../shared/data)"
        )
    return torch.tensor(tokenizer(file.read_text())["input_ids"], dtype=torch.long)


def evaluation_windows(ids: Tensor, count: int, length: int = 128) -> Tensor:
    """``count`` evenly spaced, non-overlapping windows ``[count, length]`` of the second half."""
    half = ids[len(ids) // 2 :]
    slots = len(half) // length
    if count > slots:
        raise ValueError(f"only {slots} windows of {length} tokens fit; ask for <= {slots}")
    starts = torch.linspace(0, slots - 1, count).round().long() * length
    return torch.stack([half[s : s + length] for s in starts.tolist()])


def calibration_windows(ids: Tensor, count: int, length: int, rng: torch.Generator) -> Tensor:
    """``count`` random windows ``[count, length]`` of the first half, drawn from ``rng``."""
    first = ids[: len(ids) // 2]
    starts = torch.randint(len(first) - length, (count,), generator=rng)
    return torch.stack([first[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every window, each scored alone."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        tokens += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / tokens)
