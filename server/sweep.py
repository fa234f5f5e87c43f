"""`fl-sim sweep`: defense x strength x attack, what each setting leaks and what it costs.

A sweep file names two experiment configs and the defenses to try:

- `leakage`: the attacked case (for example FedSGD at batch 1, the worst case for a client),
  its attacks and victims. For every point of the grid, the victims' defended updates come
  from the ClientApp's own step and every attack runs on each (`server.leakage`).
- `utility`: a federation that learns (`configs/bench/federation.yaml`). For every point it
  trains with the same defense, and the point's accuracy is the mean test accuracy of its
  last rounds.

Every point attacks the same global model, so the leakage side of all points runs first and
together: each attack takes the victims of every point as one batch (`leakage.batch` at most),
which is about 1.6 times the throughput of a point's 4 victims alone. Each record still lands in
its point's run directory.

Every point is two ordinary run directories under `points/<point>/` (leakage/, utility/), so a
stopped sweep resumes where it stopped (finished attacks and rounds are not redone) and each
point has its own report with its reconstructions. The sweep writes `sweep.csv` (one row per
defense, strength, attack and victim: leakage metrics, the point's accuracy, epsilon where
the defense defines one), `summary.csv` (means per point and attack, with the paired
difference to no defense), `privacy_utility.png` and `report.html`.

With `--ray ADDRESS` the points run as Ray tasks on a cluster (each point's federation in the
task's own process, its leakage side alone), otherwise the leakage of all points together,
then the federations one after the other, here.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import Field, ValidationError
from rich.console import Console
from rich.table import Table

from fl_sim.config import ConfigError, ExperimentConfig, Section, describe_error, load_config, parse_config
from fl_sim.results import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILE = "sweep.yaml"
LEAKAGE_METRICS = ("psnr", "lpips", "ssim", "id_similarity", "id_rank1", "id_rank", "label_accuracy")
NO_DEFENSE = "none"


class SweptDefense(Section):
    name: str  # a registered defense, or "none" (the baseline point)
    param: str | None = None  # the setting that is swept
    values: list[Any] = Field(default_factory=list)  # its strengths, weakest first
    params: dict[str, Any] = Field(default_factory=dict)  # settings held fixed


class LeakageSide(Section):
    config: str  # an experiment config with explicit victims and the attacks
    overrides: list[str] = Field(default_factory=list)
    attacks: list[str] | None = None  # attack labels to run (default: all of the config's)
    iterations: int | None = Field(None, gt=0)  # every attack's iterations
    victims: int | None = Field(None, gt=0)  # the first N of threat.victims.ids
    # attacks (labels) also run adaptively ("<label>-adaptive": told the defense, they model
    # it on their trial gradients) wherever the point's defense can be modelled
    adaptive: list[str] = Field(default_factory=list)
    # Every point attacks the same global model, so the points' victims are attacked together:
    # at most this many as one batch (a batch's throughput per victim levels off near 30 on 2
    # cores at 64 px, its memory grows by about 150 MB a victim)
    batch: int = Field(26, gt=0)
    # Worker processes of one thread each that the batches and lone victims are handed to (0:
    # one per CPU): two one-thread processes run two batches at 70.7 victim-it/s where one
    # two-thread process runs 36.8 (InvertG, ResNet18, 64 px, 26 victims each); the defenses
    # sweep's leakage side went from about 37 to 17.8 minutes
    at_once: int = Field(0, ge=0)


class UtilitySide(Section):
    config: str  # a federation that learns
    overrides: list[str] = Field(default_factory=list)
    last_rounds: int = Field(5, gt=0)  # accuracy: the mean test accuracy over the last rounds
    # Federations trained at once here (0: one per CPU), each in its own process training its
    # clients one at a time on one thread, so that the server's serial work of one
    # (aggregation, evaluation, checkpoint: about 1 s a round) overlaps another's clients.
    # Results do not depend on it (clients are seeded per round and client).
    at_once: int = Field(0, ge=0)


class SweepConfig(Section):
    name: str = "sweep"
    leakage: LeakageSide
    utility: UtilitySide | None = None
    defenses: list[SweptDefense]


@dataclass(frozen=True)
class SweepPoint:
    """One defense at one strength (strength 1 the weakest; 0 is no defense)."""

    defense: str
    param: str | None = None
    value: Any = None
    strength: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.param is None:
            return self.defense
        value = f"{self.value:g}" if isinstance(self.value, float) else str(self.value)
        return f"{self.defense} {self.param}={value}"

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-").replace("=", "-")

    def defenses(self) -> list[dict[str, Any]]:
        if self.defense == NO_DEFENSE:
            return []
        params = dict(self.params)
        if self.param is not None:
            params[self.param] = self.value
        return [{"name": self.defense, "params": params}]


# ---------------------------------------------------------------------------------------
# The sweep file


def _path(p: str) -> Path:
    """A config named in a sweep file: as given (absolute or from the working directory),
    else from the project's root (so `configs/...` works from anywhere)."""
    path = Path(p)
    return path if path.is_absolute() or path.exists() else ROOT / p


def parse_sweep(tree: dict[str, Any]) -> SweepConfig:
    """A validated sweep; every point's configs are built and checked before anything runs."""
    from fl_sim.defenses import build_defenses
    from fl_sim.config import DefenseConfig

    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, SweepConfig)) from None
    for i, d in enumerate(sweep.defenses):
        where = f"defenses.{i}"
        if d.name == NO_DEFENSE:
            if d.param or d.values or d.params:
                raise ConfigError(f"{where}: '{NO_DEFENSE}' takes no param, values or params")
            continue
        if (d.param is None) != (not d.values):
            raise ConfigError(f"{where}: give both `param` and its `values` (weakest first), or neither")
        for j, value in enumerate(d.values or [None]):
            params = {**d.params, **({d.param: value} if d.param else {})}
            try:
                build_defenses([DefenseConfig(name=d.name, params=params)])
            except ValueError as exc:
                detail = str(exc).split(": ", 1)[-1]
                raise ConfigError(f"{where}{f'.values.{j}' if d.param else ''}: {detail}") from None
    for point in points(sweep):
        leakage_config(sweep, point)
        if sweep.utility:
            utility_config(sweep, point)
    return sweep


def load_sweep(path: str | Path) -> SweepConfig:
    from fl_sim.config import read_yaml_mapping

    return parse_sweep(read_yaml_mapping(path))


def points(sweep: SweepConfig) -> list[SweepPoint]:
    out = []
    for d in sweep.defenses:
        if d.name == NO_DEFENSE or not d.values:
            out.append(SweepPoint(d.name, params=d.params))
        else:
            out += [SweepPoint(d.name, d.param, v, k + 1, d.params) for k, v in enumerate(d.values)]
    return out


def _with_defenses(path: str, overrides: list[str], point: SweepPoint, where: str) -> ExperimentConfig:
    try:
        tree = load_config(_path(path), overrides).model_dump(mode="json")
        tree["defenses"] = point.defenses()
        return parse_config(tree)
    except ConfigError as exc:
        raise ConfigError(f"{where} ({point.label}): {exc}") from None


def leakage_config(sweep: SweepConfig, point: SweepPoint) -> ExperimentConfig:
    from server.leakage import select_attacks

    side = sweep.leakage
    config = _with_defenses(side.config, side.overrides, point, "leakage")
    if config.threat.victims.mode != "explicit" or not config.threat.victims.ids:
        raise ConfigError("leakage.config: the attacked config needs explicit victims (threat.victims.ids)")
    config = select_attacks(config, side.attacks, side.iterations)
    unknown = [a for a in side.adaptive if a not in [x.key for x in config.attacks]]
    if unknown:
        raise ConfigError(f"leakage.adaptive: {unknown} are not among the attacks {[x.key for x in config.attacks]}")
    if not side.adaptive or not modelled(point):
        return config
    tree = config.model_dump(mode="json")
    for a in config.attacks:
        if a.key in side.adaptive:
            tree["attacks"].append({"name": a.name, "label": f"{a.key}{ADAPTIVE}",
                                    "params": {**a.params, "adaptive": True}})
    return parse_config(tree)


ADAPTIVE = "-adaptive"


def modelled(point: SweepPoint) -> bool:
    """Whether an adaptive attack can model the point's defense (it has a model at all)."""
    from fl_sim.defenses import DEFENSES, Defense

    return point.defense != NO_DEFENSE and DEFENSES.get(point.defense).adaptive is not Defense.adaptive


def naive_attack(label: str) -> str:
    """The naive attack an adaptive one is the twin of (itself for a naive attack)."""
    return label.removesuffix(ADAPTIVE)


def leakage_victims(sweep: SweepConfig, config: ExperimentConfig) -> list[int]:
    ids = list(config.threat.victims.ids)
    return ids[: sweep.leakage.victims] if sweep.leakage.victims else ids


def utility_config(sweep: SweepConfig, point: SweepPoint) -> ExperimentConfig:
    assert sweep.utility is not None
    config = _with_defenses(sweep.utility.config, sweep.utility.overrides, point, "utility")
    tree = config.model_dump(mode="json")
    tree["attacks"], tree["threat"]["rounds"] = [], []  # the utility side attacks nothing
    return parse_config(tree)


# ---------------------------------------------------------------------------------------
# Running


def open_sweep(out: Path, sweep: SweepConfig | None) -> SweepConfig:
    """The sweep of directory `out`: a new one records `sweep`; an existing one continues if
    it is the same sweep (or `sweep` is None: resume)."""
    saved = out / SWEEP_FILE
    if saved.exists():
        stored = parse_sweep(yaml.safe_load(saved.read_text()))
        if sweep is not None and stored != sweep:
            raise ConfigError(f"{out} holds another sweep; continue it with `fl-sim sweep --resume {out}` "
                              "or choose another --out")
        return stored
    if sweep is None:
        raise ConfigError(f"{out} holds no sweep (no {SWEEP_FILE})")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    return sweep


def _run_dir(path: Path, config: ExperimentConfig) -> RunDirectory:
    """A point's run directory; an existing one continues only if its config is still the
    one the sweep builds (the configs a sweep file names can change between sessions). The
    engine may differ: it decides where the work runs, not its results."""
    if (path / "config.yaml").exists():
        run = RunDirectory.open(path)
        if run.config().model_copy(update={"engine": config.engine}) != config:
            raise ConfigError(f"{path} ran another config than the sweep now builds (was a config it names "
                              "edited?); restore it, or start the sweep in another --out")
        return run
    return RunDirectory.create(path, config)


def run_leakage(sweep: SweepConfig, point: SweepPoint, path: Path) -> None:
    from fl_sim.report import write_report
    from server.leakage import measure_leakage, printing_events

    config = leakage_config(sweep, point)
    run = _run_dir(path, config)
    try:
        failures = measure_leakage(config, leakage_victims(sweep, config), run, printing_events(indent="  "))
        for _, client, key, error in failures:
            print(f"  failed: client {client} {key}: {error}", flush=True)
        write_report(run)
    finally:
        run.close()


def _write_leakage_report(path: Path) -> None:
    from fl_sim.report import write_report

    run = RunDirectory.open(path)
    try:
        write_report(run)
    finally:
        run.close()


def _processes(at_once: int) -> int:
    """A side's `at_once` setting as a number of processes (0: one per CPU)."""
    return at_once or os.cpu_count() or 1


def run_leakage_together(sweep: SweepConfig, todo: list[SweepPoint], out: Path) -> None:
    """The leakage side of every point at once: each attack on the victims of all points as
    few batches as fit (`leakage.batch`), each result in its point's run directory."""
    from server.leakage import LeakageJob, measure_leakage_together

    runs: list[RunDirectory] = []
    try:
        jobs = []
        for point in todo:
            config = leakage_config(sweep, point)
            runs.append(_run_dir(out / "points" / point.slug / "leakage", config))
            jobs.append(LeakageJob(config, leakage_victims(sweep, config), runs[-1], point.label))
        for _, client, key, error in measure_leakage_together(jobs, max_together=sweep.leakage.batch,
                                                              workers=_processes(sweep.leakage.at_once)):
            print(f"  failed: client {client} {key}: {error}", flush=True)
    finally:
        for run in runs:
            run.close()


def run_utility(sweep: SweepConfig, point: SweepPoint, path: Path, clients_at_once: int | None = None) -> None:
    from server.launcher import run_experiment

    config = utility_config(sweep, point)
    if clients_at_once is not None:
        config = config.model_copy(update={"engine": config.engine.model_copy(
            update={"inprocess_workers": clients_at_once})})
    run = _run_dir(path, config)
    if len(run.done_rounds()) >= config.federation.rounds:
        run.close()
        return
    run_experiment(config, run, resume=bool(run.done_rounds()))


def _utility_done(sweep: SweepConfig, path: Path) -> bool:
    if not (path / "config.yaml").exists():
        return False
    run = RunDirectory.open(path)
    try:
        return len(run.done_rounds()) >= run.config().federation.rounds
    finally:
        run.close()


def _utility_in_child(sweep: SweepConfig, point: SweepPoint, path: Path) -> float:
    """A point's federation in a process of its own, one thread, its clients one at a time;
    its progress goes to `console.log` in its run directory. Returns its seconds."""
    import contextlib

    import torch

    torch.set_num_threads(1)
    path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(path / "console.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run_utility(sweep, point, path, clients_at_once=1)
    return time.perf_counter() - start


def run_utilities(sweep: SweepConfig, todo: list[SweepPoint], out: Path, console: Console) -> None:
    """Every point's federation: `utility.at_once` processes at a time (one per CPU by
    default), or here one after the other when only one fits."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    if sweep.utility is None:
        return
    def path(point: SweepPoint) -> Path:
        return out / "points" / point.slug / "utility"

    pending = [p for p in todo if not _utility_done(sweep, path(p))]
    workers = min(len(pending), _processes(sweep.utility.at_once))
    t0 = time.perf_counter()
    if workers <= 1:
        for i, point in enumerate(pending, 1):
            console.rule(f"federation {i}/{len(pending)}: {point.label}  ({(time.perf_counter() - t0) / 60:.1f} min so far)")
            run_utility(sweep, point, path(point))
        return
    console.rule(f"federations: {len(pending)} points, {workers} at once (progress in each point's utility/console.log)")
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_utility_in_child, sweep, p, path(p)): p for p in pending}
        for i, future in enumerate(as_completed(futures), 1):
            point = futures[future]
            seconds = future.result()  # a failed federation raises here, after the others stop
            accuracy, _ = _accuracy(sweep, path(point))
            console.print(f"federation {i}/{len(pending)} done: {point.label}, accuracy {accuracy:.1%} "
                          f"({seconds / 60:.1f} min; {(time.perf_counter() - t0) / 60:.1f} min so far)")


def run_point(sweep: SweepConfig, point: SweepPoint, out: Path) -> None:
    """Both sides of one point, each resumed where it stopped."""
    base = out / "points" / point.slug
    run_leakage(sweep, point, base / "leakage")
    if sweep.utility:
        run_utility(sweep, point, base / "utility")


def run_sweep(sweep: SweepConfig, out: Path, console: Console, ray_address: str | None = None) -> pd.DataFrame:
    todo = points(sweep)
    t0 = time.perf_counter()
    if ray_address:
        _run_on_ray(sweep, todo, out, ray_address, console)
    else:
        console.rule(f"leakage: the victims of all {len(todo)} points together")
        run_leakage_together(sweep, todo, out)
        for point in todo:  # each point's report, with its reconstructions
            _write_leakage_report(out / "points" / point.slug / "leakage")
        collect(sweep, out).to_csv(out / "sweep.csv", index=False)  # partial results are readable
        console.print(f"leakage of {len(todo)} points done ({(time.perf_counter() - t0) / 60:.1f} min)")
        run_utilities(sweep, todo, out, console)
    frame = collect(sweep, out)
    write_outputs(sweep, out, frame)
    print_summary(summarise(frame), console, time.perf_counter() - t0)
    console.print(f"sweep.csv, summary.csv, privacy_utility.png, report: [bold]{out / 'report.html'}[/]")
    return frame


def _run_on_ray(sweep: SweepConfig, todo: list[SweepPoint], out: Path, address: str, console: Console) -> None:
    """Each point as a Ray task (2 CPUs; its federation runs in the task's own process, since
    a simulation cannot start Ray inside a Ray worker). The run directory must be on storage
    every node sees."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    inprocess = SweepConfig.model_validate(sweep.model_dump())
    if inprocess.utility:
        # two clients at once in the task's two CPUs, whatever the node's size
        inprocess.utility.overrides = [*inprocess.utility.overrides, "engine.backend=inprocess",
                                       "engine.inprocess_workers=2"]
    task = ray.remote(num_cpus=2)(run_point)
    pending = {task.remote(inprocess, p, out): p for p in todo}
    while pending:
        done, _ = ray.wait(list(pending))
        for ref in done:
            point = pending.pop(ref)
            ray.get(ref)  # a failed point raises here
            console.print(f"done: {point.label} ({len(todo) - len(pending)}/{len(todo)})")


# ---------------------------------------------------------------------------------------
# Results


def _accuracy(sweep: SweepConfig, path: Path) -> tuple[float, float]:
    """(mean over the last rounds, final) test accuracy of a point's federation; NaN if none."""
    if sweep.utility is None or not (path / "config.yaml").exists():
        return math.nan, math.nan
    run = RunDirectory.open(path)
    try:
        rounds = run.rounds_frame().dropna(subset=["test_accuracy"]).sort_values("round")
    finally:
        run.close()
    if rounds.empty:
        return math.nan, math.nan
    acc = rounds["test_accuracy"]
    return float(acc.tail(sweep.utility.last_rounds).mean()), float(acc.iloc[-1])


def _epsilon(sweep: SweepConfig, point: SweepPoint) -> float:
    """The client's epsilon over the utility federation at its expected participations, for
    defenses that define one (NaN otherwise)."""
    from fl_sim.defenses import build_defenses

    if sweep.utility is None:
        return math.nan
    config = utility_config(sweep, point)
    fed = config.federation
    expected = max(1, round(fed.rounds * fed.clients_per_round / fed.num_clients))
    values = [d.epsilon(expected) for d in build_defenses(config.defenses) if hasattr(d, "epsilon")]
    return sum(values) if values else math.nan


def collect(sweep: SweepConfig, out: Path) -> pd.DataFrame:
    """sweep.csv: one row per (point, attack, victim) finished so far."""
    rows = []
    for point in points(sweep):
        base = out / "points" / point.slug
        if not (base / "leakage" / "config.yaml").exists():
            continue
        config = leakage_config(sweep, point)
        run = RunDirectory.open(base / "leakage")
        try:
            frame = run.metrics_frame()
        finally:
            run.close()
        keys = [a.key for a in config.attacks]
        frame = frame[frame["attack"].isin(keys) & frame["client"].isin(leakage_victims(sweep, config))]
        accuracy, final = _accuracy(sweep, base / "utility")
        epsilon = _epsilon(sweep, point)
        for r in frame.itertuples():
            rows.append({"defense": point.defense, "param": point.param or "", "value": point.value,
                         "strength": point.strength, "point": point.label, "attack": r.attack,
                         "adaptive": r.attack != naive_attack(r.attack), "naive_attack": naive_attack(r.attack),
                         "client": r.client, **{m: getattr(r, m) for m in LEAKAGE_METRICS},
                         "seconds": r.seconds, "accuracy": accuracy, "final_accuracy": final, "epsilon": epsilon,
                         "image": f"points/{point.slug}/leakage/{r.image}" if r.image else "",
                         "truth_image": f"points/{point.slug}/leakage/{r.truth_image}" if r.truth_image else ""})
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Means per (point, attack), and each point's PSNR and identity similarity against no
    defense, paired by victim (mean difference and 95 % interval)."""
    from fl_sim.stats import paired_comparisons

    if frame.empty:
        return frame
    keys = ["defense", "param", "value", "strength", "point", "attack"]
    agg = frame.groupby(keys, sort=False, dropna=False).agg(
        victims=("client", "size"), **{m: (m, "mean") for m in LEAKAGE_METRICS},
        accuracy=("accuracy", "first"), epsilon=("epsilon", "first")).reset_index()
    for metric in ("psnr", "id_similarity"):
        agg[f"{metric}_vs_none"] = math.nan
        agg[f"{metric}_vs_none_low"] = math.nan
        agg[f"{metric}_vs_none_high"] = math.nan
    if (frame["point"] == NO_DEFENSE).any():
        for attack, grp in frame.groupby("attack", sort=False):
            # an adaptive attack is compared with its naive twin's undefended leakage (the same
            # attack when there is nothing to model)
            none = frame[(frame["point"] == NO_DEFENSE) & (frame["attack"] == naive_attack(attack))]
            grp = pd.concat([grp[grp["point"] != NO_DEFENSE], none])
            if none.empty or grp["point"].nunique() < 2:
                continue
            for c in paired_comparisons(grp, NO_DEFENSE, ("psnr", "id_similarity"), method_column="point",
                                        victim_columns=("client",)):
                row = (agg["point"] == c.method) & (agg["attack"] == attack)
                agg.loc[row, f"{c.metric}_vs_none"] = c.mean_difference
                agg.loc[row, f"{c.metric}_vs_none_low"] = c.ci_low
                agg.loc[row, f"{c.metric}_vs_none_high"] = c.ci_high
    return agg


def write_outputs(sweep: SweepConfig, out: Path, frame: pd.DataFrame) -> None:
    from server.sweep_report import privacy_utility_figure, reconstruction_grid, write_sweep_report

    frame.to_csv(out / "sweep.csv", index=False)
    summary = summarise(frame)
    summary.to_csv(out / "summary.csv", index=False)
    if frame.empty:
        return
    privacy_utility_figure(summary, out / "privacy_utility.png")
    reconstruction_grid(frame, out, out / "reconstructions.png")
    write_sweep_report(sweep, out, summary)


def print_summary(summary: pd.DataFrame, console: Console, seconds: float) -> None:
    table = Table(title=f"Sweep: leakage and accuracy per defense and strength ({seconds / 60:.1f} min)")
    for c in ("point", "attack", "victims", "PSNR", "Δ PSNR vs none [95 % CI]", "id sim.", "rank-1", "id rank", "LPIPS",
              "accuracy", "epsilon"):
        table.add_column(c, justify="left" if c in ("point", "attack") else "right")
    for r in summary.itertuples():
        delta = "-" if math.isnan(r.psnr_vs_none) else \
            f"{r.psnr_vs_none:+.2f} [{r.psnr_vs_none_low:+.2f}, {r.psnr_vs_none_high:+.2f}]"
        table.add_row(r.point, r.attack, str(r.victims), f"{r.psnr:.2f}", delta, f"{r.id_similarity:.3f}",
                      f"{r.id_rank1:.0%}", f"{r.id_rank:.1f}", f"{r.lpips:.3f}",
                      "-" if math.isnan(r.accuracy) else f"{r.accuracy:.1%}",
                      "-" if math.isnan(r.epsilon) else f"{r.epsilon:.3g}")
    # piped output gets rich's 80 columns, too narrow for the intervals
    (console if console.is_terminal else Console(width=170, quiet=console.quiet)).print(table)


__all__ = ["SweepConfig", "SweepPoint", "parse_sweep", "load_sweep", "points", "open_sweep", "run_sweep",
           "run_point", "collect", "summarise", "leakage_config", "utility_config"]
