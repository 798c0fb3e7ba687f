"""Server strategies: what clients are asked each round, and how replies become the model.

See :class:`fedleak.core.ServerStrategy`.

``fedavg`` (McMahan et al., AISTATS 2017) is the default.  A strategy is Flower-free: the
simulation layer (:mod:`fedleak.sim.server`) moves its instructions and the clients' replies.
"""

from fedleak.registry import Registry, autoload

SERVER_STRATEGIES = Registry("server")
autoload(__name__)
