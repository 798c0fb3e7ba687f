import numpy as np
import pytest

from fedleak.data import PARTITIONS
from fedleak.registry import ConfigError

LABELS = np.random.default_rng(0).integers(0, 10, 2_000)
SPECS = [
    {"name": "iid"},
    {"name": "iid", "examples_per_client": 7},
    {"name": "dirichlet", "alpha": 0.1},
    {"name": "dirichlet", "alpha": 0.5, "examples_per_client": 7},
    {"name": "by_class"},
    {"name": "by_class", "classes_per_client": 3, "examples_per_client": 7},
]


def split(spec, labels=LABELS, clients=50, seed=1):
    return PARTITIONS.build(spec)(labels, clients, np.random.default_rng(seed))


def distinct_classes(parts, labels=LABELS):
    return np.mean([len(np.unique(labels[p])) for p in parts])


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_partitions_are_disjoint_nonempty_and_sized(spec):
    parts = split(spec)
    assert len(parts) == 50 and all(len(p) > 0 for p in parts)
    every = np.concatenate(parts)
    assert len(np.unique(every)) == len(every)  # no example is given twice
    assert every.min() >= 0 and every.max() < len(LABELS)
    if "examples_per_client" in spec:
        assert {len(p) for p in parts} == {7}
    else:
        assert len(every) == len(LABELS)  # the whole pool is used


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_partitions_are_deterministic_given_the_rng(spec):
    first, again, other = split(spec), split(spec), split(spec, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_splits_evenly():
    assert {len(p) for p in split({"name": "iid"}, clients=30)} == {66, 67}


def test_small_alpha_is_skewed():
    iid = distinct_classes(split({"name": "iid"}))
    assert distinct_classes(split({"name": "dirichlet", "alpha": 0.05})) < iid / 2
    per_client = {"name": "dirichlet", "alpha": 0.05, "examples_per_client": 20}
    assert (
        distinct_classes(split(per_client))
        < distinct_classes(split({"name": "iid", "examples_per_client": 20})) / 2
    )
    assert distinct_classes(split({"name": "dirichlet", "alpha": 1000.0})) > iid * 0.9


def test_dirichlet_falls_back_when_a_class_runs_out():
    labels = np.array([0] * 5 + [1] * 95)  # every client wants class 0, only 5 exist
    parts = PARTITIONS.build({"name": "dirichlet", "alpha": 0.01, "examples_per_client": 10})(
        labels, 10, np.random.default_rng(0)
    )
    assert {len(p) for p in parts} == {10}
    assert len(np.unique(np.concatenate(parts))) == 100


@pytest.mark.parametrize("per", [1, 2, 3])
def test_by_class_limits_classes_per_client(per):
    for spec in ({"name": "by_class"}, {"name": "by_class", "examples_per_client": 6}):
        parts = split({**spec, "classes_per_client": per})
        counts = [len(np.unique(LABELS[p])) for p in parts]
        assert max(counts) <= per and (per == 1 or max(counts) == per)


@pytest.mark.parametrize(
    ("spec", "clients", "message"),
    [
        ({"name": "iid"}, 2_001, "2001 clients need 2001 examples.*only 2000"),
        ({"name": "iid", "examples_per_client": 50}, 41, "41 clients × 50 examples.*only 2000"),
        ({"name": "dirichlet"}, 5_000, "5000 clients need 5000 examples"),
        ({"name": "by_class", "classes_per_client": 11}, 5, "classes_per_client=11 but .* 10"),
        ({"name": "by_class", "examples_per_client": 39}, 50, "too few for its 10 clients"),
    ],
)
def test_infeasible_requests_raise(spec, clients, message):
    with pytest.raises(ValueError, match=message):
        split(spec, clients=clients)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "dirichlet", "alpha": -1}, "dirichlet: alpha must be > 0, got -1"),
        ({"name": "iid", "examples_per_client": -2}, "iid: examples_per_client must be >= 0"),
        ({"name": "by_class", "classes_per_client": 0}, "by_class: classes_per_client must be"),
    ],
)
def test_bad_options_raise(spec, message):
    with pytest.raises(ConfigError, match=message):
        PARTITIONS.build(spec)


def test_dirichlet_scales_to_ten_thousand_clients():
    labels = np.random.default_rng(0).integers(0, 10, 80_000)
    for spec in ({"alpha": 0.5, "examples_per_client": 8}, {"alpha": 0.5}):
        parts = split({"name": "dirichlet", **spec}, labels=labels, clients=10_000)
        assert len(parts) == 10_000 and min(len(p) for p in parts) >= 1
