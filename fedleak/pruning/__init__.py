"""Pruning strategies: one-shot pruning of a transformer, server side or on a client.

A pruner is a dataclass registered by name in :data:`PRUNERS`; its fields are its options
(``ratio``, ``mode`` = "mask" or "physical", the blocks to prune, ...).  Its one method::

    prune(model, calibration, rng) -> Pruned

prunes ``model`` in place with the token ids ``calibration`` (``[N, T]``, or None for the
data-free methods) and returns what it kept and the statistics it computed
(:class:`fedleak.pruning.structured.Pruned`).  All randomness comes from ``rng``.

The methods (GOA and its anchors) share the adapters (:mod:`.adapters`), the streaming
statistics collector (:mod:`.calibration`) and the select / apply / recover layer
(:mod:`.structure`); :func:`fedleak.pruning.sparsegpt.sparsegpt` is a reusable solver.

What leaks: every statistic a pruner computes from calibration data is a summary of that data
(second moments ``XᵀX/n`` of hidden states, per-channel means and variances, attention maps),
and the masks it chooses are functions of them.  On a client they come from private text; a
trainer that sends them declares them (see :mod:`fedleak.training.prune`).
"""

from fedleak.registry import Registry, autoload

PRUNERS = Registry("pruner")
autoload(__name__)
