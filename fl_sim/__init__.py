"""fl-sim: measure how much federated-learning clients leak of their face images.

The Python API (`fl_sim.api`) is re-exported here, loaded on first use so that importing a
foundation module (`fl_sim.config`, `fl_sim.metrics`, ...) stays light:

    import fl_sim
    run = fl_sim.run("configs/demo.yaml", out="runs/mine")
    run.metrics.groupby("attack").psnr.mean()
"""
from __future__ import annotations

from typing import Any

_API = ("Run", "load_config", "run", "resume", "load_run", "attack_case")
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        from fl_sim import api

        return getattr(api, name)
    raise AttributeError(f"module 'fl_sim' has no attribute {name!r}")
