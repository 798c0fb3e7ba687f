"""Model architectures, registered by name; each builds an ``nn.Module`` for a :class:`Task`."""

from torch import nn

from fedleak.registry import Registry, autoload

MODELS = Registry("model")


def classifier(model: nn.Module, who: str) -> tuple[str, nn.Linear]:
    """The name and module of ``model``'s last ``nn.Linear``: its classifier.

    ``who`` (an attack or modifier) is named in the error raised when there is none.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            f"{who} needs a fully connected classifier (an nn.Linear), and "
            f"{type(model).__name__} has none"
        )
    return found[-1]


autoload(__name__)
