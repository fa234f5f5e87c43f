# Two commands a user needs: `make demo` and `make test`. Each creates .venv if missing and
# installs what is missing; the stamp file makes a second run skip the install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fl-sim assets fetch
	$(BIN)/fl-sim run configs/demo.yaml

test: $(STAMP)
	$(BIN)/fl-sim assets fetch
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/fl-sim bench attack

clean:
	rm -rf $(VENV) runs .pytest_cache
