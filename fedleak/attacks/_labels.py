"""Label recovery from the classifier's gradient, before (or instead of) optimising the inputs.

For softmax cross-entropy, the gradient of the last fully connected layer ``u = W z + b`` is
``∂L/∂b_c = mean_i (p_ic − [y_i = c])`` and ``∂L/∂W_c = mean_i (p_ic − [y_i = c]) z_iᵀ``: rows of
the classes present in the batch are pushed negative.  Each strategy reads the labels off these
signs (as breaching's ``_recover_label_information`` collects them):

* ``idlg`` -- Zhao, Mopuri & Bilen 2020 (iDLG): the class whose weight row sums lowest (exact for
  one example with non-negative features); for ``count > 1`` the ``count`` lowest rows.
* ``analytic`` -- the classes with a negative bias gradient (exact when labels are distinct),
  padded with the most negative remaining ones / truncated to ``count``.
* ``yin`` -- Yin et al. 2021 (GradInversion): the ``count`` classes with the lowest minimum
  entry of their weight row (assumes ReLU features, distinct labels).
* ``llg`` -- Wainakh et al. 2022 (LLG, "simple"): weight-row sums; every negative class gets a
  label, then repeated labels go to the argmin, each pick raising that class by the estimated
  impact of one example.  breaching's version decrements a stale loop index in the second stage
  (so every remaining slot gets the same class); here the picked class is decremented.
* ``bias_corrected`` -- the same two stages on the bias gradient (breaching's default).

Threat model: honest-but-curious server, FedSGD; with several local steps the classifier's
update mixes several gradients and the strategies become heuristics.  Labels come back sorted:
their order carries no information.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedleak.core import ServerView
from fedleak.models import classifier

STRATEGIES: tuple[str, ...] = ("idlg", "analytic", "yin", "llg", "bias_corrected")


def check(strategy: str, who: str) -> None:
    """Raise a ValueError naming ``who`` unless ``strategy`` is a known strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"{who}: labels {strategy!r} unknown; choose one of {', '.join(STRATEGIES)}"
        )


def recover(view: ServerView, count: int, strategy: str = "bias_corrected") -> Tensor:
    """``count`` labels (sorted, long) read off the classifier's update in ``view``."""
    check(strategy, "label recovery")
    name, _ = classifier(view.model(), "label recovery")
    gradient = view.gradient()
    weight = gradient[f"{name}.weight"].detach().double()  # [C, k]
    bias = gradient.get(f"{name}.bias")
    if strategy in ("analytic", "bias_corrected") and bias is None:
        raise ValueError(
            f"labels {strategy!r} read the classifier's bias gradient, but {name!r} has no bias; "
            "use 'idlg', 'yin' or 'llg'"
        )
    if strategy == "idlg":
        labels = _first(weight.sum(1).argsort(), count)
    elif strategy == "yin":
        labels = _first(weight.min(1).values.argsort(), count)
    elif strategy == "analytic":
        b = bias.detach().double()
        negative = (b < 0).nonzero().flatten()
        labels = negative[b[negative].argsort()][:count]
        if len(labels) < count:  # fewer distinct classes than examples: repeat the strongest
            labels = torch.cat([labels, _first(b.argsort(), count - len(labels))])
    elif strategy == "llg":
        labels = _two_stage(weight.sum(1), count, impact_scale=1 + 1 / weight.shape[0])
    else:
        labels = _two_stage(bias.detach().double(), count, impact_scale=1.0)
    return labels.long().sort().values


def _first(ranking: Tensor, count: int) -> Tensor:
    """The first ``count`` classes of ``ranking``, starting over past its end.

    A batch may hold more examples than there are classes; then some classes repeat.
    """
    return ranking[torch.arange(count, device=ranking.device) % len(ranking)]


def _two_stage(scores: Tensor, count: int, impact_scale: float) -> Tensor:
    """LLG's rule: negative classes first, then argmin picks, each raising its class by m."""
    impact = scores[scores < 0].sum() * impact_scale / count  # <= 0: one example's share
    scores = scores.clone()
    negative = (scores < 0).nonzero().flatten()
    picked = negative[scores[negative].argsort()][:count].tolist()
    scores[picked] -= impact
    while len(picked) < count:
        choice = int(scores.argmin())
        picked.append(choice)
        scores[choice] -= impact  # the picked class, not a stale index (breaching's bug)
    return torch.tensor(picked, device=scores.device)
