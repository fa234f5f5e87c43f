"""report.html: a self-contained page (images inlined) built from a run's results store."""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from jinja2 import Environment, select_autoescape  # noqa: E402

from fl_sim.report_template import REPORT_TEMPLATE  # noqa: E402
from fl_sim.config import ExperimentConfig  # noqa: E402
from fl_sim.results import RunDirectory  # noqa: E402
# the caption and cells are shared so the HTML table says what comparison_markdown says
from fl_sim.stats import HIGHER_IS_BETTER, PairedComparison, paired_comparisons  # noqa: E402
from fl_sim.stats import _TABLE_COLUMNS, _caption, _cells  # noqa: E402

IMAGE_METRICS = ["psnr", "mse", "ssim", "lpips", "id_similarity", "id_rank1", "id_rank", "label_accuracy"]
PAIRED_METRICS = ("psnr", "ssim", "lpips", "id_similarity")


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.exists() else ""


def _round_ticks(ax, rounds: pd.Series) -> None:
    """Whole rounds on the x axis: each round when few, integer ticks otherwise."""
    uniq = sorted(rounds.unique())
    if len(uniq) <= 12:
        ax.set_xticks(uniq)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def accuracy_figure(rounds: pd.DataFrame, mark: int | None = None) -> str | None:
    """Test accuracy per round; `mark`: a round to draw a line at (the one whose model was kept)."""
    rounds = rounds.dropna(subset=["test_accuracy"])
    if rounds.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(rounds["round"], rounds["test_accuracy"] * 100, marker="o" if len(rounds) <= 50 else None)
    if mark is not None:
        ax.axvline(mark, color="tab:red", alpha=0.6, linestyle="--")
    ax.set_xlabel("round")
    _round_ticks(ax, rounds["round"])
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    return _figure_uri(fig)


@dataclass
class TrainingHistory:
    """The federation run that trained the attacked model (`model.weights` inside a run directory)."""

    run: Path
    round: int  # the round whose global model was attacked
    rounds: pd.DataFrame

    @property
    def accuracy(self) -> float:
        row = self.rounds[self.rounds["round"] == self.round]["test_accuracy"]
        return float(row.iloc[0]) if len(row) else float("nan")


def training_history(config: ExperimentConfig) -> TrainingHistory | None:
    """Where the attacked model came from, when `model.weights` is a run's `global_model.pt` or
    `models/round-NNN.pt` and that run's rounds.csv is still there; else None. An attack on a
    trained model is read against how far it learned."""
    saved_by = RunDirectory.of_model(config.model.weights) if config.model.weights else None
    if saved_by is None or not (saved_by[0] / "rounds.csv").is_file():
        return None
    run, rnd = saved_by
    # the exported CSV, not the run's store: reading another run must not touch its directory
    rounds = pd.read_csv(run / "rounds.csv")
    if rounds.empty or "test_accuracy" not in rounds:
        return None
    return TrainingHistory(run, rnd if rnd is not None else int(rounds["round"].max()), rounds)


def leakage_figure(metrics: pd.DataFrame, metric: str = "psnr") -> str | None:
    if metrics.empty or metrics[metric].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    for attack, grp in metrics.groupby("attack"):
        per_round = grp.groupby("round")[metric].mean()
        ax.plot(per_round.index, per_round.values, marker="o", label=attack)
    ax.set_xlabel("round")
    _round_ticks(ax, metrics["round"])
    ax.set_ylabel(f"mean {metric}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_uri(fig)


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean of every metric per attack (the shape of the DFLeak paper's Table II)."""
    cols = [c for c in IMAGE_METRICS + ["seconds", "iterations"] if c in metrics and metrics[c].notna().any()]
    table = metrics.groupby("attack")[cols].mean()
    table.insert(0, "victims", metrics.groupby("attack").size())
    return table.reset_index()


def reference_attack(config: ExperimentConfig, metrics: pd.DataFrame) -> str:
    """The attack others are compared with: `metrics.reference` if set (even when it has no
    results, so a misspelt name is reported rather than replaced), else the first configured
    attack that has results, else the first attack in the metrics."""
    if config.metrics.reference:
        return config.metrics.reference
    present = list(dict.fromkeys(metrics["attack"]))
    return next((a.key for a in config.attacks if a.key in present), present[0])


def _has_pairs(metrics: pd.DataFrame) -> bool:
    """At least one victim attacked by two attacks or more."""
    return not metrics.empty and bool((metrics.groupby(["round", "client"])["attack"].nunique() >= 2).any())


def run_comparisons(run: RunDirectory, metrics: tuple[str, ...] = PAIRED_METRICS,
                    reference: str | None = None) -> list[PairedComparison]:
    """Every attack of a run against the reference attack, victim by victim.

    [] when no victim has two attacks; ValueError (naming the attacks present) when the
    reference, given or configured, has no results in the run.
    """
    frame = run.metrics_frame()
    if not _has_pairs(frame):
        return []
    return paired_comparisons(frame, reference or reference_attack(run.config(), frame), metrics)


def _paired_section(run: RunDirectory, metrics: pd.DataFrame) -> dict | None:
    if not _has_pairs(metrics):
        return None
    reference = reference_attack(run.config(), metrics)
    title = f"Paired differences against {reference}"
    try:
        comparisons = paired_comparisons(metrics, reference, PAIRED_METRICS)
    except ValueError as err:  # a report at the end of a long run should say so, not crash
        return {"title": title, "caption": str(err), "columns": [], "rows": []}
    return {"title": title, "caption": _caption(comparisons) if comparisons else "No metric to compare.",
            "columns": list(_TABLE_COLUMNS), "rows": [_cells(c) for c in comparisons]}


def _fmt(v: object, column: str = "") -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if column in ("iterations", "clients", "round", "victims"):
            return f"{v:.0f}"
        if column == "seconds":
            return f"{v:.1f}"
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _rows(frame: pd.DataFrame) -> list[list[str]]:
    return [[_fmt(v, c) for v, c in zip(row, frame.columns)] for row in frame.itertuples(index=False)]


def _privacy(config: ExperimentConfig) -> str | None:
    from fl_sim.defenses import build_defenses, central_epsilon, privacy_statement

    fed = config.federation
    local = privacy_statement(build_defenses(config.defenses), fed.rounds, fed.clients_per_round / fed.num_clients)
    dp = fed.central_dp
    central = None
    if dp is not None:
        eps = central_epsilon(config)
        central = (f"central DP of the released model (Flower's server-side fixed clipping, z = "
                   f"{dp.noise_multiplier:g}, C = {dp.clipping_norm:g}): "
                   + (f"epsilon {eps:.3g} at delta {dp.delta:g} after {fed.rounds} rounds" if eps is not None
                      else "no noise, no epsilon")
                   + "; the server itself sees every update before clipping")
    sa = fed.secure_aggregation
    secure = None
    if sa is not None:
        secure = (f"secure aggregation (Flower's SecAgg+, {sa.num_shares:g} shares, threshold "
                  f"{sa.reconstruction_threshold:g}): the server sees only each round's aggregate of "
                  f"{fed.clients_per_round} clients, and the attacks target it (a batch of all their images)")
    return "; ".join(x for x in (local, central, secure) if x) or None


def write_report(run: RunDirectory, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Render report.html; `extra_sections` are (title, html) pairs a caller adds (e.g. sweeps)."""
    config = run.config()
    metrics = run.metrics_frame()
    rounds = run.rounds_frame()
    table = summary_table(metrics) if not metrics.empty else pd.DataFrame()
    history = training_history(config)

    victims = []
    for (rnd, client), grp in metrics.groupby(["round", "client"], sort=True):
        victims.append({
            "round": rnd,
            "who": "the aggregate" if client < 0 else f"client {client}",
            "truth": _file_uri(run.path / grp["truth_image"].iloc[0]) if grp["truth_image"].iloc[0] else "",
            "attacks": [
                {"name": r.attack, "image": _file_uri(run.path / r.image) if r.image else "",
                 "metrics": {m: _fmt(getattr(r, m)) for m in IMAGE_METRICS if not pd.isna(getattr(r, m))}}
                for r in grp.itertuples()
            ],
        })

    env = Environment(autoescape=select_autoescape(default_for_string=True))
    html = env.from_string(REPORT_TEMPLATE).render(
        config=config,
        config_yaml=config.to_yaml(),
        privacy=_privacy(config),
        accuracy=accuracy_figure(rounds) if not rounds.empty else None,
        history=history,
        history_figure=accuracy_figure(history.rounds, mark=history.round) if history else None,
        leakage=leakage_figure(metrics) if not metrics.empty else None,
        table_columns=list(table.columns),
        table_rows=_rows(table),
        rounds_rows=_rows(rounds.drop(columns=["sampled"])),
        rounds_columns=[c for c in rounds.columns if c != "sampled"],
        victims=victims,
        paired=_paired_section(run, metrics),
        extra_sections=extra_sections or [],
        higher_is_better=HIGHER_IS_BETTER,
    )
    out = run.path / "report.html"
    out.write_text(html)
    return out
