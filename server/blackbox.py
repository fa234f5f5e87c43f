"""One black-box reconstruction attack against a similarity oracle, into an output folder:

    reconstruction.png   the best image the search scored
    trajectory.csv       queries, best_similarity (one row per iteration)
    trajectory.png       the same as a curve
    summary.json         attack, settings, queries, best similarity, why it stopped, seconds
    search.ckpt          the search's state: running the same command again resumes from it

`run_blackbox` is what `fl-sim attack eigenface|blobs --oracle URL ...` and the eigenface
benchmark call.
"""
from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attacks.blackbox import build_blackbox
from attacks.oracle import SimilarityOracle
from attacks.score_search import SearchResult


@dataclass(frozen=True)
class BlackBoxSummary:
    attack: str
    target: str
    queries: int
    similarity: float
    stopped_by: str
    iterations: int
    seconds: float
    settings: dict


def run_blackbox(attack_name: str, oracle: SimilarityOracle, target: str, out: str | Path,
                 params: dict[str, Any] | None = None, progress: Callable[[int, int, float], None] | None = None,
                 snapshots: tuple[int, ...] = (), stop: Callable[[], bool] | None = None
                 ) -> tuple[SearchResult, BlackBoxSummary]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    attack = build_blackbox(attack_name, **(params or {}))
    t0 = time.perf_counter()
    result = attack.run(oracle, progress=progress, checkpoint=out / "search.ckpt", stop=stop, snapshots=snapshots)
    summary = BlackBoxSummary(attack_name, target, result.queries, result.similarity, result.stopped_by,
                              result.iterations, time.perf_counter() - t0, asdict(attack.config))
    write_outputs(out, result, summary)
    return result, summary


def write_outputs(out: Path, result: SearchResult, summary: BlackBoxSummary) -> None:
    from torchvision.utils import save_image

    save_image(result.image, out / "reconstruction.png")
    with open(out / "trajectory.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["queries", "best_similarity"])
        writer.writerows((q, f"{s:.6f}") for q, s in result.trajectory)
    plot_trajectories({summary.attack: result.trajectory}, out / "trajectory.png",
                      title=f"{summary.attack} against {summary.target}")
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")


def plot_trajectories(curves: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, trajectory in curves.items():
        q, s = zip(*trajectory) if trajectory else ((), ())
        ax.plot(q, s, label=label, lw=1.4)
    ax.set_xlabel("queries")
    ax.set_ylabel("best oracle similarity")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["run_blackbox", "BlackBoxSummary", "write_outputs", "plot_trajectories"]
