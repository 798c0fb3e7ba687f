"""Text reconstruction metrics: ROUGE, token and label accuracy after optimal matching.

Recovered and true sentences (token ids) are decoded with the task's tokenizer and paired by
the Hungarian algorithm on ROUGE-1 F, as LAMP does (Balunović et al. 2022, ``attack.py``:
``linear_sum_assignment`` on ``1 - ROUGE-1 F``).  ROUGE-1/2/L F-measures come from Google's
``rouge-score`` package (no stemmer, its default tokenisation: lowercase, non-alphanumerics
split), the implementation behind the ``datasets`` ROUGE metric LAMP and the pooler attack
report; per-pair scores are averaged over the matched pairs (LAMP's bootstrap "mid" is
essentially that mean).  See ``../shared/notes/text-attacks.md`` §1.7.

Two decodings, reported side by side:

* **LAMP-compatible** (``*_lamp``): each sequence is cut after its last ``[SEP]`` (LAMP's
  ``remove_padding``) and decoded *with* its special tokens, so ``[CLS]`` and ``[SEP]`` become
  the words "cls" and "sep", which always match.  This inflates ROUGE (an all-wrong n-word
  sentence still scores 2/(n+2) ROUGE-1) but is how the published numbers were computed.
* **clean** (``rouge1`` …): special tokens and padding removed (``skip_special_tokens``).

Scores are in [0, 1]; papers print them ×100.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fedleak import hf
from fedleak.core import Batch, Reconstruction, Task
from fedleak.metrics.image import _label_overlap

ROUGE = ("rouge1", "rouge2", "rougeL")


def decode(ids: Tensor, task: Task, *, lamp: bool = False) -> list[str]:
    """Token ids ``[B, T]`` -> sentences; ``lamp``: LAMP's decoding (see the module docstring)."""
    tokenizer = hf.tokenizer(task.tokenizer)
    rows = ids.detach().cpu().long().tolist()
    if not lamp:
        return tokenizer.batch_decode(rows, skip_special_tokens=True)
    sep = tokenizer.sep_token_id
    cut = [row[: len(row) - row[::-1].index(sep)] if sep in row else row for row in rows]
    return tokenizer.batch_decode(cut, skip_special_tokens=False)


def match(recovered: list[str], true: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pair recovered with true sentences by maximum total ROUGE-1 F (Hungarian matching).

    Returns ``(rec_idx, true_idx)`` of length ``min(len(recovered), len(true))``, sorted by
    ``true_idx``, as :func:`fedleak.metrics.image.match` does.
    """
    scorer = _scorer()
    cost = np.array(
        [[1 - scorer.score(t, r)["rouge1"].fmeasure for r in recovered] for t in true]
    ).reshape(len(true), len(recovered))
    true_idx, rec_idx = linear_sum_assignment(cost)  # rows are truths: sorted by truth
    return rec_idx, true_idx


def rouge(recovered: list[str], true: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures of recovered sentences paired index by index with truths."""
    scorer = _scorer()
    scores = [scorer.score(t, r) for r, t in zip(recovered, true, strict=True)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE}


def score(reconstruction: Reconstruction, truth: Batch, task: Task) -> dict[str, float]:
    """Compare recovered token ids with the client's sentences, after matching them.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL`` (clean) and ``rouge1_lamp``, ``rouge2_lamp``,
        ``rougeL_lamp`` (LAMP-compatible), each matched on its own decoding; then, on the
        clean matching: ``token_acc`` (share of the true sentence's tokens recovered at their
        position; special tokens and padding excluded), ``exact`` (share of sentences
        recovered exactly), ``token_overlap`` (order-free overlap of the batch's recovered
        and true token multisets, divided by the larger: the bag of words), ``label_acc`` and
        ``label_acc_matched`` as for images (NaN when the attack recovers no labels).
    """
    rec_ids = reconstruction.inputs.detach().cpu().long()
    true_ids = truth.inputs.detach().cpu().long()
    if rec_ids.dim() != 2 or true_ids.dim() != 2:
        raise ValueError(
            f"score: text reconstructions and truths are token ids [B, T], got shapes "
            f"{tuple(rec_ids.shape)} and {tuple(true_ids.shape)}"
        )
    if len(rec_ids) == 0 or len(true_ids) == 0:
        raise ValueError(
            f"score: need at least one reconstruction and one truth, "
            f"got {len(rec_ids)} and {len(true_ids)}"
        )
    lamp_rec, lamp_true = decode(rec_ids, task, lamp=True), decode(true_ids, task, lamp=True)
    lamp_idx = match(lamp_rec, lamp_true)
    lamp = rouge([lamp_rec[i] for i in lamp_idx[0]], [lamp_true[i] for i in lamp_idx[1]])
    rec, true = decode(rec_ids, task), decode(true_ids, task)
    rec_idx, true_idx = match(rec, true)
    results = rouge([rec[i] for i in rec_idx], [true[i] for i in true_idx])
    results.update({f"{k}_lamp": v for k, v in lamp.items()})

    pad = hf.tokenizer(task.tokenizer).pad_token_id
    content = _content(true_ids, task)[true_idx]
    aligned = _resize(rec_ids, true_ids.shape[1], pad)[rec_idx]
    hits = (aligned == true_ids[true_idx]) & content
    results["token_acc"] = float((hits.sum(1) / content.sum(1).clamp_min(1)).double().mean())
    results["exact"] = float(
        np.mean([rec[r] == true[t] for r, t in zip(rec_idx, true_idx, strict=True)])
    )
    results["token_overlap"] = _overlap(
        rec_ids[_content(rec_ids, task)], true_ids[_content(true_ids, task)]
    )

    label_acc = label_acc_matched = math.nan
    if reconstruction.labels is not None:
        predicted = reconstruction.labels.detach().cpu().long().flatten()
        actual = truth.labels.detach().cpu().long().flatten()
        label_acc = _label_overlap(predicted, actual)
        label_acc_matched = float((predicted[rec_idx] == actual[true_idx]).double().mean())
    results["label_acc"] = label_acc
    results["label_acc_matched"] = label_acc_matched
    return results


def save_text(
    path: str | os.PathLike[str], truth: Batch, reconstruction: Reconstruction, task: Task
) -> None:
    """Write truth and matched reconstruction side by side (the text analogue of a PNG grid).

    One block per true sentence, in truth order: ``true`` and ``rec`` lines (clean decoding),
    then the reconstructions no truth was matched to.  Written atomically.
    """
    rec = decode(reconstruction.inputs, task)
    true = decode(truth.inputs, task)
    rec_idx, true_idx = match(rec, true)
    paired = dict(zip(true_idx.tolist(), rec_idx.tolist(), strict=True))
    lines = []
    for t, sentence in enumerate(true):
        lines += [f"true {t}: {sentence}", f"rec  {t}: {rec[paired[t]] if t in paired else ''}", ""]
    lines += [f"rec  -: {rec[r]}" for r in range(len(rec)) if r not in set(rec_idx.tolist())]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, target)


@lru_cache(maxsize=1)
def _scorer() -> Any:
    rouge_scorer = hf.require("rouge_score.rouge_scorer", "text metrics (ROUGE)")
    return rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=False)


def _content(ids: Tensor, task: Task) -> Tensor:
    """Mask of the positions that hold words: not padding, [CLS], [SEP] or another special."""
    special = hf.tokenizer(task.tokenizer).all_special_ids
    special = torch.tensor(sorted(set(special)), device=ids.device)
    return ~torch.isin(ids, special)


def _resize(ids: Tensor, length: int, pad: int) -> Tensor:
    """``ids`` cut or padded (with ``pad``) to ``length`` positions."""
    if ids.shape[1] >= length:
        return ids[:, :length]
    return torch.cat([ids, ids.new_full((len(ids), length - ids.shape[1]), pad)], dim=1)


def _overlap(recovered: Tensor, true: Tensor) -> float:
    """Multiset overlap of two bags of token ids, divided by the larger bag (0 if both empty)."""
    if len(recovered) == 0 and len(true) == 0:
        return 0.0
    size = int(torch.cat([recovered, true]).max()) + 1
    overlap = torch.minimum(
        torch.bincount(recovered, minlength=size), torch.bincount(true, minlength=size)
    ).sum()
    return float(overlap) / max(len(recovered), len(true))
