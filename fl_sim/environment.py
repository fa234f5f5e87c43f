"""Environment variables that keep Flower and Ray quiet and local (flower.md pitfalls 1, 3):
no telemetry, no update checks, no runtime dependency installation. Set before they load."""
from __future__ import annotations

import os

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


def set_quiet_environment() -> None:
    """Set each variable unless the user set it already."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


__all__ = ["QUIET_ENV", "set_quiet_environment"]
