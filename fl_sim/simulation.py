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
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fl_sim.config import ExperimentConfig
from fl_sim.results import RunDirectory

# Flower and Ray phone home and write to ~/.flwr unless told not to (flower.md pitfalls 1, 3).
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}
for _k, _v in QUIET_ENV.items():
    os.environ.setdefault(_k, _v)

log = logging.getLogger("fl_sim")


def quiet_environment(run: RunDirectory) -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    flwr_home = run.path / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(flwr_home.resolve())
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownFlowerNotices) for f in flwr_log.filters):
        flwr_log.addFilter(_KnownFlowerNotices())
    ours = logging.getLogger("fl_sim")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


class _KnownFlowerNotices(logging.Filter):
    """Drop Flower's notice that `run_simulation` is deprecated: we use it knowingly (it is
    the one API that runs a ServerApp object in this process under Ray)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("DEPRECATED FEATURE" in text and "run_simulation" in text)


def validate(config: ExperimentConfig) -> None:
    """Fail before any work on an unknown attack, attack setting or defense."""
    from clients.defenses import build_defenses
    from server.attack_runner import build

    build_defenses(config.defenses)
    for attack in config.attacks:
        build(attack)
    fed = config.federation
    if fed.algorithm == "fedsgd" and fed.batch_size == 1 and fed.bn_mode == "train" and \
            config.model.name in ("resnet18", "mobilenet_v2") and config.data.image_size < 64:
        raise ValueError(f"{config.model.name} at {config.data.image_size} px and batch size 1 ends in 1x1 "
                         "feature maps, where BatchNorm in train mode fails: use data.image_size >= 64, "
                         "federation.batch_size >= 2 or federation.bn_mode: eval")
    late = [r for r in config.threat.rounds if r > config.federation.rounds]
    if late:
        log.warning("threat.rounds %s are after the last round (%d): not attacked", late, config.federation.rounds)


def run_experiment(config: ExperimentConfig, run: RunDirectory, resume: bool) -> None:
    from server.federation import Job

    quiet_environment(run)
    validate(config)
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

        grid = InProcessGrid(client_app, config.federation.num_clients)
        server_app(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config={}))
        return

    from flwr.simulation import run_simulation

    backend_config = ray_backend_config(config)
    start_ray(backend_config["init_args"], job.run, local=not config.engine.ray_address)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.federation.num_clients,
                   backend_config=backend_config)


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


def finish_run(job, seconds: float | None = None) -> None:
    """Summary tables, CSVs and the report."""
    run, console = job.run, job.console
    run.export_csv()
    print_summary(run, console, seconds)
    failures = getattr(job, "attack_failures", [])
    if failures:
        console.print(f"[yellow]warning:[/] {len(failures)} attack(s) failed and were not recorded:")
        for rnd, client, attack, error in failures:
            console.print(f"  round {rnd} client {client} {attack}: {error}", highlight=False)
    try:
        from fl_sim.report import write_report
    except ImportError:
        console.print("[yellow]warning:[/] fl_sim.report is not available; no report.html")
    else:
        try:
            path = write_report(run)
        except (OSError, ValueError) as exc:  # e.g. an unwritable run directory
            console.print(f"[yellow]warning:[/] report.html not written ({exc}); "
                          f"rebuild it with `fl-sim report {run.path}`")
        else:
            console.print(f"report: [bold]{path}[/]")
    run.close()


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_summary(run: RunDirectory, console: Console, seconds: float | None = None) -> None:
    rounds = run.rounds_frame()
    if len(rounds):
        t = Table(title="rounds")
        for c in ("round", "test acc", "test loss", "train loss", "clients", "seconds"):
            t.add_column(c, justify="right")
        for r in rounds.itertuples():
            t.add_row(str(r.round), _fmt(r.test_accuracy, ".1%"), _fmt(r.test_loss, ".3f"),
                      _fmt(r.train_loss, ".3f"), str(r.clients), _fmt(r.seconds, ".1f"))
        console.print(t)
    metrics = run.metrics_frame()
    if len(metrics):
        t = Table(title="attacks (mean over victims)")
        for c in ("attack", "victims", "psnr", "ssim", "lpips", "id sim", "label acc", "seconds"):
            t.add_column(c, justify="right")
        for name, g in metrics.groupby("attack", sort=False):
            t.add_row(str(name), str(len(g)), _fmt(g.psnr.mean(), ".2f"), _fmt(g.ssim.mean(), ".3f"),
                      _fmt(g.lpips.mean(), ".3f"), _fmt(g.id_similarity.mean(), ".3f"),
                      _fmt(g.label_accuracy.mean(), ".2f"), _fmt(g.seconds.mean(), ".1f"))
        console.print(t)
    if seconds is not None:
        console.print(f"wall time {seconds:.1f} s")


__all__ = ["run_experiment", "run_federation", "finish_run", "quiet_environment", "shutdown_ray"]
