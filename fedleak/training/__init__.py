"""Client trainers: how a client trains locally in one round.

``strategy`` stays Flower's word for server-side aggregation.
"""

from fedleak.registry import Registry, autoload

TRAINERS = Registry("trainer")
autoload(__name__)
