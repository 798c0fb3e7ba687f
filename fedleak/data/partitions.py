"""Partitioners: who holds which examples, decided from the labels alone.

Federated data are rarely IID, and how skewed a client's labels are changes both what it learns
and what leaks (label-inference attacks feed on skew).  Three standard splits cover the range:
``iid``; ``dirichlet`` label skew (Hsu et al. 2019), tuned by ``alpha``; and the pathological
``by_class`` split of McMahan et al. (2017).  Each gives every client at least one example and
never gives an example to two clients.  With ``examples_per_client`` set, every client gets
exactly that many and the rest of the pool stays unused, which is how large simulations (10,000
clients of 8 examples) are built.

Everything is vectorised over clients: the only Python loops run over classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedleak.data import PARTITIONS


@PARTITIONS.register("iid")
@dataclass
class IID:
    """Uniformly random: each client gets a random share of the pool."""

    examples_per_client: int = 0  # 0: the whole pool, split evenly; N: exactly N per client

    def __post_init__(self) -> None:
        _check_examples("iid", self.examples_per_client)

    def __call__(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Shuffle, then cut into equal parts."""
        n = _check_pool("iid", labels, num_clients, self.examples_per_client)
        order = rng.permutation(n)
        if self.examples_per_client:
            return list(order[: num_clients * self.examples_per_client].reshape(num_clients, -1))
        return np.array_split(order, num_clients)


@PARTITIONS.register("dirichlet")
@dataclass
class Dirichlet:
    """Label skew: class proportions drawn from Dir(alpha); small alpha, few classes per client."""

    alpha: float = 0.5  # concentration, > 0: 0.1 is very skewed, 100 is close to IID
    examples_per_client: int = 0  # 0: the whole pool; N: exactly N per client

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"dirichlet: alpha must be > 0, got {self.alpha}")
        _check_examples("dirichlet", self.examples_per_client)

    def __call__(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Whole pool: share each class among clients; else: draw each client's label mix."""
        _check_pool("dirichlet", labels, num_clients, self.examples_per_client)
        members = _members(labels)
        owner = np.full(len(labels), -1)
        if not self.examples_per_client:
            # the standard scheme: each class is cut among all clients in Dir(alpha) proportions
            for indices in members:
                shares = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = np.floor(np.cumsum(shares)[:-1] * len(indices))
                positions = np.arange(len(indices))
                owner[rng.permutation(indices)] = np.searchsorted(cuts, positions, side="right")
            return _fill_empty(_group(owner, num_clients))
        # each client draws its own label mix ~ Dir(alpha), then that many examples of each class
        mix = rng.dirichlet(np.full(len(members), self.alpha), size=num_clients)
        counts = rng.multinomial(self.examples_per_client, mix)  # [clients, classes]
        waiting = []
        for c, indices in enumerate(members):
            # requests in random order, so a class that runs out disappoints random clients
            wanted = rng.permutation(np.repeat(np.arange(num_clients), counts[:, c]))
            served = min(len(wanted), len(indices))
            owner[rng.permutation(indices)[:served]] = wanted[:served]
            waiting.append(wanted[served:])
        # requests a class could not serve fall back to random unused examples of other classes
        waiting = np.concatenate(waiting)
        owner[rng.permutation(np.flatnonzero(owner < 0))[: len(waiting)]] = waiting
        return _group(owner, num_clients)


@PARTITIONS.register("by_class")
@dataclass
class ByClass:
    """Pathological split: each client holds examples of only ``classes_per_client`` classes."""

    classes_per_client: int = 2  # distinct classes per client
    examples_per_client: int = 0  # 0: the whole pool; N: exactly N per client, spread evenly

    def __post_init__(self) -> None:
        if self.classes_per_client < 1:
            raise ValueError(
                f"by_class: classes_per_client must be >= 1, got {self.classes_per_client}"
            )
        _check_examples("by_class", self.examples_per_client)

    def __call__(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Deal classes round-robin in a random order, then share each among its holders."""
        _check_pool("by_class", labels, num_clients, self.examples_per_client)
        members, per = _members(labels), self.classes_per_client
        if per > len(members):
            raise ValueError(
                f"by_class: classes_per_client={per} but the labels have only "
                f"{len(members)} classes"
            )
        # consecutive slots of a cycle through the classes are distinct, and every class is
        # held by the same number of clients, give or take one
        slots = np.arange(num_clients * per).reshape(num_clients, per)
        held = rng.permutation(len(members))[slots % len(members)]  # [clients, per]
        quota = _even(self.examples_per_client, per)  # a client's examples, over its classes
        owner = np.full(len(labels), -1)
        for c, indices in enumerate(members):
            holders, column = np.nonzero(held == c)
            if self.examples_per_client:
                wanted = np.repeat(holders, quota[column])
            else:  # the class is shared evenly among its holders, at least one example each
                wanted = np.repeat(holders, _even(len(indices), len(holders)))
            needed = len(wanted) if self.examples_per_client else len(holders)
            if needed > len(indices):
                raise ValueError(
                    f"by_class: class {np.unique(labels)[c]} has {len(indices)} examples, too "
                    f"few for its {len(holders)} clients ({needed} needed); use fewer clients, "
                    "fewer examples_per_client or more classes_per_client"
                )
            owner[rng.permutation(indices)[: len(wanted)]] = wanted
        return _group(owner, num_clients)


def _check_examples(plugin: str, examples_per_client: int) -> None:
    if examples_per_client < 0:
        raise ValueError(
            f"{plugin}: examples_per_client must be >= 0 (0 = whole pool), "
            f"got {examples_per_client}"
        )


def _check_pool(plugin: str, labels: np.ndarray, num_clients: int, per_client: int) -> int:
    """The pool size, after checking that the request can be met."""
    if labels.ndim != 1:
        raise ValueError(f"{plugin}: labels must be one-dimensional, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"{plugin}: num_clients must be >= 1, got {num_clients}")
    needed = num_clients * max(per_client, 1)
    if needed > len(labels):
        ask = f"{num_clients} clients × {per_client} examples" if per_client else "one each"
        raise ValueError(
            f"{plugin}: {num_clients} clients need {needed} examples ({ask}), "
            f"but the pool has only {len(labels)}"
        )
    return len(labels)


def _members(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each distinct label, in label order."""
    _, classes = np.unique(labels, return_inverse=True)
    order = np.argsort(classes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(classes))[:-1])


def _even(n: int, parts: int) -> np.ndarray:
    """Sizes of ``n`` items cut into ``parts`` near-equal parts (as np.array_split)."""
    sizes = np.full(parts, n // max(parts, 1))
    sizes[: n % max(parts, 1)] += 1
    return sizes


def _group(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Per-client index arrays from ``owner[i]``, the client of example i (-1: unused)."""
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner[owner >= 0], minlength=num_clients)
    return np.split(order[len(owner) - counts.sum() :], np.cumsum(counts)[:-1])


def _fill_empty(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each client the draw left empty one example, taken from the largest client."""
    sizes = np.array([len(p) for p in parts])
    for client in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        parts[client], parts[donor] = parts[donor][-1:], parts[donor][:-1]
        sizes[client], sizes[donor] = 1, sizes[donor] - 1
    return parts
