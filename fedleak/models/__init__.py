"""Model architectures, registered by name; each builds an ``nn.Module`` for a :class:`Task`."""

from fedleak.registry import Registry, autoload

MODELS = Registry("model")
autoload(__name__)
