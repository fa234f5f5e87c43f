"""Shared fixtures. Assets come from the cache (`fl-sim assets fetch`, run by `make test`)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def orl64():
    from fl_sim.data import DataSpec, load_dataset

    return load_dataset(DataSpec("orl", 64))
