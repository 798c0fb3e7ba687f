"""Client-side unstructured pruning before sending: local SGD, then KRP / SparseGPT / masks.

The client trains like the ``sgd`` trainer (whose options it takes), then prunes its BERT-family
model's encoder linear layers to ``sparsity`` on its own data and sends the sparse state (the
global shape, pruned entries zero):

* ``krp`` — knowledge-retention robust pruning (Li, Lei, Cheng & Xu, EMNLP 2023;
  :mod:`fedleak.pruning.krp`) with the client's partition as calibration sentences;
* ``sparsegpt`` — SparseGPT (Frantar & Alistarh, ICML 2023) on the same loop, no refit;
* ``randomized`` — a randomized magnitude mask (Li, Gao, Lei & Xu, Findings of EMNLP 2023;
  :mod:`fedleak.pruning.randomized`) drawn from the client's own generator: ``draws`` samples
  ``∝ |w|^alpha`` per matrix at randomness level ``ratio``;
* ``magnitude`` — the per-matrix magnitude mask.

The one-shot randomized mask is the paper's generator only: candidate selection needs training
rounds per candidate, which a federated client does not spend here (the benchmark runs the
selection loop centrally).

What leaks, beyond the state: ``weight_mask``, every pruned layer's keep-mask (1 bit per weight,
flattened in the state's order of the layers, see :func:`mask_names`).  The zeros of the sent
state reveal it anyway; declaring it is honest.  With ``krp`` / ``sparsegpt`` the mask and the
kept weights are functions of the second moments ``X̂ᵀX̂`` (and, for KRP, ``X̂ᵀY``) of the
client's hidden states on its private sentences; with ``randomized`` the mask also carries the
client's generator state.  A pruned update is no longer ``-lr × gradient``: every pruned entry
moved to zero, which is what a gradient-matching attack then has to explain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fedleak.core import Batch, LossFn, Messages, Params, Setting, TrainResult
from fedleak.pruning import krp, randomized
from fedleak.training import TRAINERS
from fedleak.training.sgd import SGD

_PRUNED = re.compile(
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)\.weight$"
)


def mask_names(state: Params) -> list[str]:
    """The prunable weights of a BERT-family state, in its order (what ``weight_mask`` packs)."""
    return [k for k in state if _PRUNED.search(k)]


def pack(masks: dict[str, Tensor], names: list[str]) -> Tensor:
    """One flat bool tensor of the keep-masks, in ``names`` order."""
    return torch.cat([masks[n].flatten().bool().cpu() for n in names])


def unpack(flat: Tensor, state: Params) -> dict[str, Tensor]:
    """The keep-masks of ``state``'s prunable weights from a packed ``weight_mask``."""
    names = mask_names(state)
    sizes = [state[n].numel() for n in names]
    if flat.numel() != sum(sizes):
        raise ValueError(
            f"weight_mask has {flat.numel()} entries; this model's prunable weights have "
            f"{sum(sizes)}: the client pruned another architecture"
        )
    parts = torch.split(flat.flatten().bool(), sizes)
    return {n: p.view(state[n].shape) for n, p in zip(names, parts, strict=True)}


@TRAINERS.register("sparse_prune")
@dataclass
class SparsePrune(SGD):
    """Local SGD, then unstructured pruning on the client's data; sends its weight masks."""

    sends: ClassVar[dict[str, str]] = {
        "weight_mask": "1 bit per encoder weight, 1 = kept: chosen from the client's hidden-state "
        "second moments (krp, sparsegpt) or its generator and weights (randomized, magnitude)",
    }
    method: Literal["krp", "sparsegpt", "randomized", "magnitude"] = "randomized"
    sparsity: float = 0.5  # fraction of every encoder linear layer's weights zeroed
    alpha: float = 5.0  # randomized: sampling exponent, p ∝ |w|^alpha
    ratio: float = 1e-4  # randomized: randomness level, draws = max(⌊(n − k) · ratio⌋, 1)
    calibration: int = 0  # krp / sparsegpt: the partition's first N sentences (0 = all)

    def __post_init__(self) -> None:
        super().__post_init__()
        krp.check_sparsity(self.sparsity, "sparse_prune")
        if not self.alpha >= 0 or not self.ratio > 0:
            raise ValueError(
                f"sparse_prune: alpha must be >= 0 and ratio > 0, got {self.alpha}, {self.ratio}"
            )
        if self.calibration < 0:
            raise ValueError(f"sparse_prune: calibration must be >= 0, got {self.calibration}")

    def check(self, setting: Setting) -> None:
        """Only BERT-family text classifiers have the encoder layers this prunes."""
        super().check(setting)
        try:
            krp.encoder_blocks(setting.model)
        except ValueError as err:
            raise ValueError(
                f"sparse_prune: {err}; use model.name = 'bert' or 'tiny_bert'"
            ) from None

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Train with local SGD, then prune with the client's own data and generator."""
        result = super().fit(model, data, loss_fn, rng, defenses, instructions)
        layers = krp.prunable(model)
        weights = {f"{n}.weight": layer.weight.detach() for n, layer in layers.items()}
        if self.method in ("krp", "sparsegpt"):
            calibration = data.inputs[: self.calibration or len(data)]
            config = krp.LayerwiseConfig(
                self.sparsity, refit=self.method == "krp", sequential=self.method == "krp"
            )
            masks = krp.prune_layerwise(model, calibration, getattr(model, "pad_id", 0), config)
        else:
            if self.method == "magnitude":
                masks = randomized.magnitude_candidates(weights, self.sparsity)[0]
            else:
                masks = randomized.candidates(
                    weights, self.sparsity, 1, (self.ratio,), self.alpha, rng
                )[0]
            randomized.apply_masks(model, masks)
        names = mask_names(model.state_dict())
        messages = {"weight_mask": pack(masks, names)}
        return TrainResult(result.loss, result.steps, result.batch_size, result.used, messages)
