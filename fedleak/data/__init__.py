"""Data sources and partitioners.

Data sources read a local data root (never downloading unless asked), a bundled copy, or
generate data; partitioners split a pool among clients (IID, Dirichlet, by class).
"""

from fedleak.registry import Registry, autoload

DATASETS = Registry("dataset")
PARTITIONS = Registry("partition")
autoload(__name__)
