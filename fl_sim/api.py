"""The Python API: what `fl-sim` does, for notebooks and scripts.

    import fl_sim

    config = fl_sim.load_config("configs/demo.yaml", ["federation.rounds=2"])
    run = fl_sim.run(config, out="runs/mine")       # the federation, the attacks, the report
    run.metrics                                     # one row per (round, client, attack)
    run.rounds                                      # one row per round
    run.comparisons()                               # paired differences against the reference attack
    run = fl_sim.load_run("runs/mine")              # a finished (or stopped) run, from disk
    fl_sim.resume("runs/mine")                      # continue a stopped run

This module and the CLI are the two places that wire the layers together (foundation,
attacks and clients, server); the rest of `fl_sim` imports nothing above itself.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fl_sim.config import ExperimentConfig, load_config as _load_config, parse_config
from fl_sim.results import RunDirectory


@dataclass(frozen=True)
class Run:
    """A run directory, read back: its config, its results as pandas frames, its report."""

    path: Path

    @property
    def config(self) -> ExperimentConfig:
        return RunDirectory.open(self.path).config()

    def _store(self) -> RunDirectory:
        return RunDirectory.open(self.path)

    def _frame(self, table: str) -> pd.DataFrame:
        store = self._store()
        try:
            return store.metrics_frame() if table == "attacks" else store.rounds_frame()
        finally:
            store.close()

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per (round, client, attack): psnr, ssim, lpips, id_similarity, ..."""
        return self._frame("attacks")

    @property
    def rounds(self) -> pd.DataFrame:
        """One row per round: test_accuracy, test_loss, clients, seconds, ..."""
        return self._frame("rounds")

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    def comparisons(self, reference: str | None = None):
        """Each attack against the reference attack on the same victims: mean paired
        difference with a 95 % confidence interval, wins/ties/losses, n (fl_sim.stats)."""
        from fl_sim.report import run_comparisons

        store = self._store()
        try:
            return run_comparisons(store, reference=reference)
        finally:
            store.close()

    def image(self, relative: str):
        """A PNG of the run (a path from metrics' `image` / `truth_image` columns) as PIL."""
        from PIL import Image

        return Image.open(self.path / relative)


def load_config(source: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A validated config from a YAML file or a dict, with `key.sub=value` overrides."""
    if isinstance(source, Mapping):
        from fl_sim.config import apply_override

        tree = dict(source)
        for o in overrides:
            apply_override(tree, o)
        return parse_config(tree)
    return _load_config(source, tuple(overrides))


def run(config: ExperimentConfig | str | Path | Mapping[str, Any], out: str | Path | None = None,
        overrides: Sequence[str] = (), device: str | None = None) -> Run:
    """Run an experiment into a new run directory (default runs/<name>-<timestamp>).

    Everything is checked before the directory is made (a bad key, a missing data root, an
    attack setting of the wrong type: `ConfigError`); an existing run is never overwritten.
    """
    from server.launcher import run_experiment
    from server.preflight import preflight

    config_path = config if isinstance(config, (str, Path)) else None
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    if isinstance(config, ExperimentConfig) and overrides:
        cfg = load_config(cfg.model_dump(mode="json"), overrides)
    if device:
        cfg = cfg.model_copy()
        cfg.device = device  # validated on assignment
    preflight(cfg)
    path = Path(out) if out else RunDirectory.default_path(config_path, cfg.name)
    store = RunDirectory.create(path, cfg)
    from rich.console import Console

    Console().print(f"run directory: [bold]{store.path}[/]")
    run_experiment(cfg, store, resume=False)
    return Run(store.path)


def resume(path: str | Path) -> Run:
    """Continue a stopped run; finished rounds and attacks are not redone."""
    from server.launcher import run_experiment

    store = RunDirectory.open(path)
    run_experiment(store.config(), store, resume=True)
    return Run(store.path)


def load_run(path: str | Path) -> Run:
    RunDirectory.open(path).close()  # a clear error when it is not a run directory
    return Run(Path(path))


def attack_case(case: str | Path, attack: str, params: Mapping[str, Any] | None = None,
                out: str | Path | None = None, truth: str | Path | None = None, device: str = "cpu") -> Run:
    """Attack one saved case file (`threat.save_cases: true`, or built around your own model)."""
    from server.offline import attack_case_file

    store = attack_case_file(Path(case), attack, dict(params or {}), Path(out) if out else None,
                             truth=Path(truth) if truth else None, device=device)
    return Run(store.path)


__all__ = ["Run", "load_config", "run", "resume", "load_run", "attack_case"]
