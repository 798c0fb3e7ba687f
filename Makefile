# fedleak's two entry points: `make quickstart` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch. GPU users who already have their own torch: make ... TORCH=
TORCH ?= torch==2.13.0

.PHONY: install quickstart test lint

$(BIN)/fedleak: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/fedleak

# An undefended and a defended federated run on the bundled digits data, then their metrics.
quickstart: install
	$(BIN)/fedleak run simulations/quickstart.toml
	$(BIN)/fedleak run simulations/quickstart_defended.toml

# The whole suite, slow tests included (real Flower runtimes, notebooks).
test: install
	$(BIN)/python -m pytest -m "slow or not slow" -q

lint: install
	$(BIN)/ruff check fedleak tests simulations
	$(BIN)/ruff format --check fedleak tests simulations
