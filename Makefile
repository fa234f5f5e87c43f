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

# The demo in two runs: a federation that learns (configs/demo-train.yaml, kept in
# runs/demo-train: a second `make demo` finds it finished and reuses it), then the audit of
# its clients' FedSGD updates to the model it learned (configs/demo.yaml, a new run each time).
DEMO_TRAIN := runs/demo-train

demo: $(STAMP)
	$(BIN)/fl-sim assets fetch
	if [ -f $(DEMO_TRAIN)/config.yaml ]; then $(BIN)/fl-sim run --resume $(DEMO_TRAIN); \
	else $(BIN)/fl-sim run configs/demo-train.yaml --out $(DEMO_TRAIN); fi
	$(BIN)/fl-sim run configs/demo.yaml model.weights=$(DEMO_TRAIN)/global_model.pt

test: $(STAMP)
	$(BIN)/fl-sim assets fetch
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/fl-sim bench attack

clean:
	rm -rf $(VENV) runs .pytest_cache
