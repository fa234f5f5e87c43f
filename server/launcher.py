"""Run one experiment: the federation (Flower, Ray or in-process), the attacks, the report.

`run_experiment(config, run, resume)` is what `fl-sim run` calls. The engine is the config's
`engine.backend`:

- "ray": Flower's simulation engine (`flwr.simulation.run_simulation`): the ServerApp in a
  thread of this process, `federation.num_clients` ClientApps in Ray actors sized by
  `engine.client_num_cpus` / `client_num_gpus`; `engine.ray_address` joins a running
  cluster instead of starting one. Ray is shut down afterwards.
- "inprocess": the same ServerApp, ClientApp and strategy on `server.grid.InProcessGrid`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from fl_sim.config import ExperimentConfig
from fl_sim.results import RunDirectory
from server.preflight import preflight
from server.session import finish_run, quiet_environment

log = logging.getLogger("fl_sim")

def run_experiment(config: ExperimentConfig, run: RunDirectory, resume: bool) -> None:
    from server.federation import Job

    quiet_environment(run)
    preflight(config)
    reap_stale_ray(run)  # a previous, killed attempt of this run may have left Ray agents
    job = Job(config=config, run=run, resume=resume, console=Console())
    t0 = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            run_federation(job)
    except (KeyboardInterrupt, SystemExit):
        job.stop.set()  # the ServerApp thread stops its attack and does not start a round
        raise
    finally:
        shutdown_ray()
        run.close()
    finish_run(job, time.perf_counter() - t0)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (docker stop, kill) unwinds like Ctrl-C, so Ray is shut down on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_federation(job) -> None:
    """The ServerApp and ClientApps on the configured engine."""
    from clients.app import app as client_app
    from server.app import make_server_app

    config = job.config
    server_app = make_server_app(job)  # it opens its own handle on the run (its own thread)
    if config.engine.backend == "inprocess":
        from flwr.app import Context, RecordDict

        from server.grid import InProcessGrid

        grid = InProcessGrid(client_app, config.federation.num_clients, inprocess_workers(config))
        server_app(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config={}))
        return

    from flwr.simulation import run_simulation

    backend_config = ray_backend_config(config)
    start_ray(backend_config["init_args"], job.run, local=not config.engine.ray_address)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.federation.num_clients,
                   backend_config=backend_config)


def inprocess_workers(config: ExperimentConfig) -> int:
    """Clients the in-process grid trains at once: `engine.inprocess_workers`, by default as
    many as Ray would run actors (`engine.client_num_cpus` each); one under SecAgg+ (its mod
    seeds numpy's global generator) or on a GPU (one device, one stream)."""
    engine = config.engine
    if config.federation.secure_aggregation is not None or engine.client_num_gpus > 0 or \
            str(config.device).startswith("cuda"):
        return 1
    if engine.inprocess_workers is not None:
        return engine.inprocess_workers
    return max(1, int((os.cpu_count() or 1) // engine.client_num_cpus))


def ray_backend_config(config: ExperimentConfig) -> dict:
    engine = config.engine
    init_args: dict = {"logging_level": logging.ERROR, "log_to_driver": False}
    if engine.ray_address:
        init_args["address"] = engine.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
        if engine.client_num_gpus > 0:
            import torch

            init_args["num_gpus"] = torch.cuda.device_count()
    return {"client_resources": {"num_cpus": engine.client_num_cpus, "num_gpus": engine.client_num_gpus},
            "init_args": init_args}


RAY_SESSION_STATE = "ray_session"


def start_ray(init_args: dict, run: RunDirectory, local: bool) -> None:
    """Start (or join) Ray here rather than inside Flower's engine, which then reuses it, so
    the session of a local Ray is known: it is recorded in the run's store and a later
    start of the run reaps what a hard kill left of it (Ray's agents outlive a killed
    driver)."""
    import ray

    if ray.is_initialized():
        return
    # What Flower's Ray backend does: actors see the driver's import path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False, **init_args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)  # ray.init installed its own (sys.exit)
    if local:
        try:
            session = ray._private.worker._global_node.get_session_dir_path()  # noqa: SLF001
        except AttributeError:  # pragma: no cover - a Ray without this private accessor
            return
        run.set_state(RAY_SESSION_STATE, str(session).encode())


def reap_stale_ray(run: RunDirectory) -> None:
    """Stop the orphans (parent gone) of a local Ray session an earlier, killed attempt of
    this run started: processes holding files of that session's directory."""
    blob = run.get_state(RAY_SESSION_STATE)
    if not blob:
        return
    session = blob.decode()
    driver = session.rsplit("_", 1)[-1]
    if driver.isdigit() and int(driver) != os.getpid() and Path(f"/proc/{driver}").exists():
        return  # that driver still runs: not ours to touch
    stale = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != 1:
                continue
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except (OSError, ValueError, IndexError):
            continue
        if any(f.startswith(session + os.sep) for f in fds):
            stale.append(int(proc.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in stale:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM and stale:
            time.sleep(2)
    if stale:
        log.info("stopped %d Ray process(es) left by an earlier attempt of this run", len(stale))
    run.set_state(RAY_SESSION_STATE, b"")


def shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


__all__ = ["run_experiment", "run_federation", "preflight", "shutdown_ray"]
