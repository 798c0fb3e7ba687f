"""TAG (Deng et al., Findings of EMNLP 2021): L2 + L1 gradient matching on word embeddings.

Deng, Wang, Li, Wang, Ding, Wei & Xu, "TAG: Gradient Attack on Transformer-based Language
Models".

DLG-style gradient matching on continuous word embeddings, with TAG's distance
``‖∇̃ − ∇‖² + α‖∇̃ − ∇‖₁`` over all parameters, then each position's nearest token.  No language
prior, no discrete steps, one random start.  It runs on the LAMP engine
(:class:`fedleak.attacks.lamp.LAMP`) with the settings of LAMP's TAG baseline (``tag.sh``:
``--loss tag --tag_factor 0.01 --lr 0.1 --lr_decay 1``, no embedding-norm rescaling or
regulariser), so both share the bag of tokens, label and length recovery, the known-labels and
known-lengths options and FedAvg unrolling.

Threat model: honest-but-curious server, FedSGD (or FedAvg, unrolled).  LAMP's TAG runs 2,500
steps; the default here is 200, like LAMP's, so that the two are compared at equal budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.attacks import ATTACKS
from fedleak.attacks.lamp import LAMP


@ATTACKS.register("tag")
@dataclass
class TAG(LAMP):
    """L2 + L1 gradient matching on word embeddings, then nearest tokens (no prior)."""

    lr: float = 0.1  # Adam step size (LAMP's TAG baseline)
    lr_decay: float = 1.0  # constant step size
    distance: str = "l2_l1"  # ‖Δ‖² + l1·‖Δ‖₁
    l1: float = 0.01  # TAG's factor α
    reg: float = 0.0  # no embedding-norm regulariser
    size: float = -1.0  # starts are not rescaled to the embeddings' norm
    init_candidates: int = 1  # one random start
    swap_every: int = 0  # no discrete steps
    prior: str = "none"  # no language prior
