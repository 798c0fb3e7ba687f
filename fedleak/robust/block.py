"""The tunable block: the few parameters a prompt-tuning-style method trains and mixes.

CPT tunes prompt tokens (about 0.4 % of the parameters) so that K per-group backward passes and
a K x K Gram matrix stay cheap.  Here the block is named by parameter-name prefixes: in an
``mlp`` (``nn.Sequential``) ``("1.bias", "3.")`` is the first layer's bias -- an additive prompt
on the frozen layer's pre-activation, BitFit-style -- plus the linear head.
"""

from __future__ import annotations

from collections.abc import Iterable


def block_names(names: Iterable[str], prefixes: tuple[str, ...], who: str) -> list[str]:
    """The names that start with one of ``prefixes`` (all of them when ``prefixes`` is empty)."""
    names = list(names)
    if not prefixes:
        return names
    prefixes = tuple(prefixes)
    chosen = [n for n in names if n.startswith(prefixes)]
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unmatched or not chosen:
        raise ValueError(
            f"{who}: block prefix {unmatched[0] if unmatched else prefixes!r} matches no parameter "
            f"of the model; its parameters are {', '.join(names)}"
        )
    return chosen
