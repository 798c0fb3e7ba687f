"""The simulation layer: the only part of fedleak that imports Flower.

``client.py`` and ``server.py`` are the ClientApp and ServerApp (Flower's Message API);
``grid.py`` is an in-process Grid for fast runs; ``runners.py`` executes an experiment on the
in-process grid, on Flower's simulation engine (Ray), or on its deployment engine.

This ``__init__`` imports nothing from Flower, so :data:`OFFLINE_ENV` can be applied before
Flower is first imported (it reads some of these settings at import time).
"""

# Flower settings that keep a run offline and quiet: no telemetry, no update check, and no
# per-run `uv sync` (which would pull a multi-GB CUDA torch); Ray leaves visible devices alone.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
