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


def set_batch_norm(model: nn.Module, mode: str) -> nn.Module:
    """Train mode for ``model``, with its batch-norm layers in ``mode`` ("train" or "eval").

    The server's model of the client step (attacks) calls it with the protocol's mode too.
    """
    model.train()
    if mode == "eval":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


autoload(__name__)
