"""What every run does around its federation, whatever the engine: a quiet Flower and Ray,
then the summary tables, the CSVs and the report. Used by the launcher (`fl-sim run`) and by
the ServerApp under `flwr run`.
"""
from __future__ import annotations

import logging
import math
import os

from rich.console import Console
from rich.table import Table

from fl_sim.environment import set_quiet_environment
from fl_sim.results import RunDirectory

set_quiet_environment()

log = logging.getLogger("fl_sim")


def quiet_environment(run: RunDirectory) -> None:
    set_quiet_environment()
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
        for c in ("attack", "victims", "psnr", "ssim", "lpips", "id sim", "rank-1", "id rank", "label acc", "seconds"):
            t.add_column(c, justify="right")
        for name, g in metrics.groupby("attack", sort=False):
            t.add_row(str(name), str(len(g)), _fmt(g.psnr.mean(), ".2f"), _fmt(g.ssim.mean(), ".3f"),
                      _fmt(g.lpips.mean(), ".3f"), _fmt(g.id_similarity.mean(), ".3f"),
                      _fmt(g.id_rank1.mean(), ".0%"), _fmt(g.id_rank.mean(), ".1f"), _fmt(g.label_accuracy.mean(), ".2f"), _fmt(g.seconds.mean(), ".1f"))
        console.print(t)
    if seconds is not None:
        console.print(f"wall time {seconds:.1f} s")


__all__ = ["quiet_environment", "finish_run", "print_summary"]
