"""What every text attack reads off a BERT-family client update before it optimises anything.

* :func:`text_model` -- the sent model, which must expose the embedding entry points of
  :class:`fedleak.models.bert.TextClassifier` (``embed``, ``forward_embeds``, ``pad_id``).
* :func:`token_bag` -- the tokens the client used: the non-zero rows of the update of the word
  embeddings (Melis et al. 2019; LAMP's ``--use_embedding``, FILM, FET).  A word-embedding row
  changes only if its token occurs in the batch, so for plain FedSGD and FedAvg the bag is
  exact; when a defense perturbs every row the bag is the whole vocabulary.
* :func:`max_length` -- the longest sentence, from the non-zero rows of the position-embedding
  update: positions past it are padding, masked out of attention, so their rows get no
  gradient.  One sentence's length is exact; in a batch only the longest is.
* :func:`vocabulary` -- the token ids a reconstruction may use: the bag's words, or, without a
  bag, every id that is not a special or ``[unused…]`` token (LAMP excludes BERT's ids 1–99 and
  104–998 the same way).
* :func:`nearest_tokens` -- continuous embeddings to token ids by cosine similarity (LAMP's
  ``get_closest_tokens``).

Threat model: honest-but-curious server holding one client's update of a text classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedleak import hf
from fedleak.core import ServerView


@dataclass(frozen=True)
class Specials:
    """The tokenizer's structural tokens."""

    cls: int
    sep: int
    pad: int


def text_model(view: ServerView, who: str) -> nn.Module:
    """The sent model, checked to be a text classifier with embedding entry points."""
    if view.task.modality != "text":
        raise ValueError(f"{who}: attacks text, but the view's task is {view.task.modality!r}")
    model = view.model()
    missing = [a for a in ("embed", "forward_embeds", "pad_id") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"{who}: the model {type(model).__name__} lacks {', '.join(missing)}; text attacks "
            "need a fedleak text model (model 'bert' or 'tiny_bert')"
        )
    return model


def specials(view: ServerView) -> Specials:
    """[CLS], [SEP] and padding ids of the task's tokenizer."""
    tok = hf.tokenizer(view.task.tokenizer)
    return Specials(int(tok.cls_token_id), int(tok.sep_token_id), int(tok.pad_token_id))


def parameter_name(model: nn.Module, module: nn.Module) -> str:
    """The state_dict name of ``module``'s weight inside ``model``."""
    for name, param in model.named_parameters():
        if param is module.weight:
            return name
    raise ValueError(f"{type(module).__name__} is not part of {type(model).__name__}")


def token_bag(view: ServerView, model: nn.Module) -> Tensor | None:
    """Token ids whose word-embedding row changed (sorted), or None if no row is readable."""
    name = parameter_name(model, model.hf.get_input_embeddings())
    delta = view.delta().get(name)
    if delta is None:  # frozen embeddings: the client sent no such update
        return None
    rows = delta.detach().abs().sum(1)
    used = (rows > 0).nonzero().flatten()
    return used if len(used) else None


def max_length(view: ServerView, model: nn.Module) -> int | None:
    """The longest sentence's length in tokens, from the position-embedding update (or None)."""
    embeddings = getattr(model.hf.base_model, "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    if not isinstance(positions, nn.Embedding):
        return None
    delta = view.delta().get(parameter_name(model, positions))
    if delta is None:
        return None
    used = (delta.detach().abs().sum(1) > 0).nonzero().flatten()
    return int(used.max()) + 1 if len(used) else None


def vocabulary(view: ServerView, bag: Tensor | None) -> Tensor:
    """Allowed content ids: the bag minus structural tokens, else all ordinary tokens."""
    tok = hf.tokenizer(view.task.tokenizer)
    special = torch.tensor(sorted(set(tok.all_special_ids)), device=view.device)
    if bag is not None:
        words = bag[~torch.isin(bag, special)]
        if len(words):
            return words
    names = tok.convert_ids_to_tokens(list(range(len(tok))))
    ordinary = [i for i, t in enumerate(names) if not (t.startswith("[") and t.endswith("]"))]
    return torch.tensor(ordinary, device=view.device)


def nearest_tokens(embeds: Tensor, table: Tensor, allowed: Tensor) -> Tensor:
    """The ``allowed`` id whose embedding (rows of ``table``) is closest in cosine, per vector.

    ``embeds`` is ``[..., H]``; returns ids of shape ``[...]``.
    """
    flat = nn.functional.normalize(embeds.detach().reshape(-1, embeds.shape[-1]), dim=1)
    candidates = nn.functional.normalize(table[allowed].detach(), dim=1)
    best = (flat @ candidates.T).argmax(1)
    return allowed[best].reshape(embeds.shape[:-1])
