"""The Flower ServerApp.

`make_server_app(job)` is what `fl-sim run` uses (the job is already built: config, run
directory, resume flag). The module-level `app` is for `flwr run .` (see `[tool.flwr.app]`
in pyproject.toml): it reads `config` (a YAML path), `overrides` (space-separated
key=value), `out` (run directory) and `resume` ("true" to continue `out`) from the run
config, then does the same.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation, Job

log = logging.getLogger("fl_sim.server")


def make_server_app(job: Job) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        federation = Federation(job)
        try:
            federation.serve(grid)
        finally:
            federation.run.close()  # this thread's SQLite connection

    return server_app


APP_DIR = Path(__file__).resolve().parents[1]  # the project (or the installed FAB) folder


def _app_path(path: str) -> str:
    """A relative config path is relative to the app folder (where pyproject.toml is); the
    ServerApp process of `flwr run` does not start there."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (APP_DIR / p).exists():
        p = APP_DIR / p
    return str(p)


def job_from_run_config(run_config: dict) -> Job:
    from fl_sim.config import load_config
    from fl_sim.results import RunDirectory
    from server.preflight import preflight

    config_path = _app_path(str(run_config.get("config", "configs/demo.yaml")))
    overrides = [o for o in str(run_config.get("overrides", "")).split() if o]
    resume = str(run_config.get("resume", False)).lower() in ("1", "true", "yes")
    out = str(run_config.get("out", "") or "")
    if resume:
        if not out:
            raise ValueError("resume = true needs out = the run directory to continue")
        run = RunDirectory.open(out)
        config = run.config()
    else:
        config = load_config(config_path, overrides)
        preflight(config)  # nothing is written for a config that cannot run
        path = Path(out) if out else RunDirectory.default_path(config_path, config.name)
        run = RunDirectory.create(path, config)
    return Job(config=config, run=run, resume=resume)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.session import finish_run, quiet_environment

    job = job_from_run_config(dict(context.run_config))
    quiet_environment(job.run)
    job.console.print(f"run directory: {job.run.path}")
    federation = Federation(job)
    try:
        federation.serve(grid)
    finally:
        federation.run.close()
    finish_run(job)


__all__ = ["app", "make_server_app", "job_from_run_config"]
