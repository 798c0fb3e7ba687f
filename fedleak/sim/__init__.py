"""The simulation layer: the only part of fedleak that imports Flower.

``client.py`` and ``server.py`` are the ClientApp and ServerApp (Flower's Message API);
``grid.py`` is an in-process Grid for fast runs; ``runners.py`` executes an experiment on the
in-process grid, on Flower's simulation engine (Ray), or on its deployment engine.
"""
