"""Paired comparisons of methods on the same victims.

Two attacks run on the same victims are compared victim by victim: the difference
(method - reference) per victim, its mean with a Student's t confidence interval, and how
many victims the method wins, ties or loses. Pairing removes the victim-to-victim spread
(some faces are easy for every attack), which is usually far larger than the gap between
methods; comparing two independent means would hide real differences in that spread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as _scipy_stats

HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True,
    "mse": False,
    "ssim": True,
    "lpips": False,
    "id_similarity": True,
    "id_rank1": True,
    "id_rank": False,
    "label_accuracy": True,
    "oracle_similarity": True,
    "critic_similarity": True,
    "rank1": True,
}

# |method - reference| at or below these is a tie: a difference nobody should call a win.
TIE_TOLERANCE: dict[str, float] = {
    # below what the eye sees, and below the run-to-run drift of the CPU optimisation
    # (attacks/multi.py reproduces single runs to within ~0.2 dB)
    "psnr": 0.1,
    # 0.005 on a 0-1 scale: the third decimal, which papers report but no viewer perceives
    "ssim": 0.005,
    "lpips": 0.005,
    # images in [0, 1]: 1e-4 is ~0.04 dB of PSNR at 20 dB, i.e. under the PSNR tolerance
    "mse": 1e-4,
    # cosine similarity of face embeddings: verification thresholds sit at ~0.3-0.6 and
    # same-identity scores spread over tenths, so no match decision turns on 0.01
    "id_similarity": 0.01,
    # a share of re-identified images: any difference is a whole image, so only equality ties
    "id_rank1": 0.0,
    # a rank moves by whole places: only equality ties
    "id_rank": 0.0,
    # a fraction of a batch's labels: any difference is a whole label, so only equality ties
    "label_accuracy": 0.0,
    # the black-box attacks' scores: cosines, as id_similarity; rank-1 is a hit or a miss
    "oracle_similarity": 0.01,
    "critic_similarity": 0.01,
    "rank1": 0.0,
}

@dataclass(frozen=True)
class PairedComparison:
    method: str
    reference: str
    metric: str
    n: int  # victims both methods have a finite value for
    mean_difference: float  # mean of (method - reference), in the metric's own units
    ci_low: float  # confidence interval of the mean difference (NaN when n < 2)
    ci_high: float
    wins: int  # victims where the method is better (direction-aware, beyond the tie tolerance)
    ties: int
    losses: int

    @property
    def excludes_zero(self) -> bool:
        # NaN compares False both ways, so an undefined interval excludes nothing
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def verdict(self) -> str:
        if not self.excludes_zero:
            return "no difference shown"
        method_higher = self.ci_low > 0
        return "better" if method_higher == HIGHER_IS_BETTER[self.metric] else "worse"


def _check_metric(metric: str) -> None:
    if metric not in HIGHER_IS_BETTER or metric not in TIE_TOLERANCE:
        raise ValueError(f"metric {metric!r} has no known direction; allowed: {', '.join(HIGHER_IS_BETTER)}")


def _compare(method: str, reference: str, metric: str, ours: np.ndarray, theirs: np.ndarray,
             confidence: float) -> PairedComparison:
    diff = ours - theirs
    n = len(diff)
    mean = float(diff.mean()) if n else math.nan
    low = high = math.nan
    if n >= 2:
        # mean ± t_{(1+c)/2, n-1} · s/√n with the sample standard deviation (ddof=1); with a
        # few victims t is much wider than the normal quantile (t_{0.975,3} = 3.18 vs 1.96)
        half = _scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n)
        low, high = mean - half, mean + half
    # The tolerance is widened by a relative 1e-9 so that a difference of exactly the
    # tolerance as written in decimal is a tie despite binary rounding
    # (12.6 - 12.5 = 0.10000000000000142).
    tol = TIE_TOLERANCE[metric] * (1 + 1e-9)
    signed = diff if HIGHER_IS_BETTER[metric] else -diff  # > 0: the method is better
    tie = np.abs(diff) <= tol
    wins = int((~tie & (signed > 0)).sum())
    ties = int(tie.sum())
    return PairedComparison(method, reference, metric, n, mean, float(low), float(high),
                            wins, ties, n - wins - ties)


def paired_comparisons(frame: pd.DataFrame, reference: str,
                       metrics: Sequence[str] = ("psnr", "ssim", "lpips", "id_similarity"),
                       method_column: str = "attack", victim_columns: Sequence[str] = ("round", "client"),
                       confidence: float = 0.95) -> list[PairedComparison]:
    """Every method other than `reference` against it, per metric, on the victims both have.

    Rows are paired on `victim_columns`; a victim missing for either method, or with a
    non-finite value for either, is left out of that (method, metric) pair only. A metric
    is compared when its column is in the frame and holds at least one finite value (the
    results store always has every column; a metric switched off is all NaN). Order:
    methods by first appearance, then metrics in the order given.
    """
    victims = list(victim_columns)
    methods = list(dict.fromkeys(frame[method_column]))
    if reference not in methods:
        raise ValueError(f"reference {reference!r} is not among the methods in column {method_column!r}; "
                         f"present: {', '.join(map(str, methods)) or 'none'}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    repeated = frame.duplicated(subset=[*victims, method_column])
    if repeated.any():
        # averaging silently would hide the repeat and shrink the interval
        first = frame.loc[repeated, [*victims, method_column]].iloc[0].to_dict()
        raise ValueError(f"{int(repeated.sum())} rows repeat a (victim, method) pair, e.g. {first}; "
                         f"pairing needs one row per victim and method")
    present = []
    for m in metrics:
        _check_metric(m)
        if m in frame and np.isfinite(pd.to_numeric(frame[m], errors="coerce")).any():
            present.append(m)

    ref = frame[frame[method_column] == reference]
    out = []
    for method in methods:
        if method == reference:
            continue
        # pairs by victim, not by row order; victims only one method has drop out here
        both = frame[frame[method_column] == method].merge(ref, on=victims, how="inner", suffixes=("_m", "_r"))
        for m in present:
            ours = both[f"{m}_m"].to_numpy(dtype=float)
            theirs = both[f"{m}_r"].to_numpy(dtype=float)
            keep = np.isfinite(ours) & np.isfinite(theirs)
            out.append(_compare(str(method), reference, m, ours[keep], theirs[keep], confidence))
    return out


def comparison_frame(comparisons: Sequence[PairedComparison]) -> pd.DataFrame:
    """One tidy row per comparison, with its verdict."""
    columns = [f.name for f in fields(PairedComparison)] + ["verdict"]
    return pd.DataFrame([[getattr(c, name) for name in columns] for c in comparisons], columns=columns)


# -- formatting shared by the markdown table and the HTML report ---------------------------

_DEFAULT_DIGITS: dict[str, int] = {"psnr": 2, "mse": 5, "ssim": 3, "lpips": 3, "id_similarity": 3,
                                  "label_accuracy": 2}
_TABLE_COLUMNS = ("method", "metric", "n", "mean diff. [95 % CI]", "W/T/L", "verdict")


def _number(v: float, digits: int) -> str:
    return "–" if math.isnan(v) else f"{v:+.{digits}f}"


def _cells(c: PairedComparison, digits: dict[str, int] | None = None) -> list[str]:
    d = {**_DEFAULT_DIGITS, **(digits or {})}.get(c.metric, 3)
    interval = "n < 2" if math.isnan(c.ci_low) else f"{_number(c.ci_low, d)}, {_number(c.ci_high, d)}"
    return [c.method, c.metric, str(c.n), f"{_number(c.mean_difference, d)} [{interval}]",
            f"{c.wins}/{c.ties}/{c.losses}", c.verdict]


def _caption(comparisons: Sequence[PairedComparison]) -> str:
    references = ", ".join(dict.fromkeys(c.reference for c in comparisons))
    metrics = list(dict.fromkeys(c.metric for c in comparisons))
    higher = [m for m in metrics if HIGHER_IS_BETTER[m]]
    lower = [m for m in metrics if not HIGHER_IS_BETTER[m]]
    direction = "; ".join(part for part in (
        f"higher is better for {', '.join(higher)}" if higher else "",
        f"lower is better for {', '.join(lower)}" if lower else "") if part)
    ties = ", ".join(f"{m} {TIE_TOLERANCE[m]:g}{' dB' if m == 'psnr' else ''}" for m in metrics)
    return (f"Each method against {references} on the same victims: differences are method minus "
            f"{references}, with a 95 % Student's t interval over the n victims both have; {direction}. "
            f"W/T/L counts victims the method wins, ties (|difference| at most {ties}) and loses.")


def comparison_markdown(comparisons: Sequence[PairedComparison], digits: dict[str, int] | None = None) -> str:
    """A caption line and a markdown table, one line per comparison ('' when there are none).

    `digits` overrides the decimals per metric (defaults: psnr 2, mse 5, label_accuracy 2, others 3). The header says
    95 %: comparisons made at another confidence level should not be printed with it.
    """
    if not comparisons:
        return ""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |"

    rows = [line(_TABLE_COLUMNS), "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"]) + "|"]
    rows += [line(_cells(c, digits)) for c in comparisons]
    return _caption(comparisons) + "\n\n" + "\n".join(rows) + "\n"
