"""Client-side defenses: update defenses (transform what is sent) and training defenses.

One file per defense family, registered in :data:`DEFENSES`; a defense with a ``wrap`` method
changes training, any other transforms the update.
"""

from fedleak.registry import Registry, autoload

DEFENSES = Registry("defense")
autoload(__name__)
