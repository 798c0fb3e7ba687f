"""Client-side data selection: which local examples a client trains on in a round.

A selector (TOML ``[selection]``) runs before the trainer, on the global model as received; it
returns the chosen indices of the client's partition and anything it sends the server beyond
the model update (see :class:`fedleak.core.Selector`).  Without ``[selection]`` a client trains
on its whole partition.
"""

from fedleak.registry import Registry, autoload

SELECTORS = Registry("selection")
autoload(__name__)
