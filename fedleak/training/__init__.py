"""Client trainers: how a client trains locally in one round.

``strategy`` stays Flower's word for server-side aggregation.
"""

from collections.abc import Sequence
from typing import Any

from fedleak.registry import Registry, autoload

TRAINERS = Registry("trainer")


def refuse_training_defenses(trainer: Any, defenses: Sequence[Any]) -> None:
    """A trainer with ``defend_with`` takes no SGD step a training defense could wrap.

    The config refuses the combination at load; this is the same refusal for a caller that
    hands defenses to ``fit`` directly.
    """
    if defenses:
        raise ValueError(
            f"{trainer.name}: training defenses do not apply to it; use {trainer.defend_with}"
        )


autoload(__name__)
