"""Paired comparisons: the interval, wins/ties/losses, pairing by victim, the tables."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from fl_sim.stats import (HIGHER_IS_BETTER, TIE_TOLERANCE, PairedComparison, comparison_frame,
                          comparison_markdown, paired_comparisons)


def _frame(rows: dict[str, dict[str, list[float]]], clients: list[int] | None = None) -> pd.DataFrame:
    """{attack: {metric: values per victim}} -> one row per (round 1, client, attack)."""
    out = []
    for attack, metrics in rows.items():
        n = len(next(iter(metrics.values())))
        for i, client in enumerate(clients or range(n)):
            out.append({"round": 1, "client": client, "attack": attack, **{m: v[i] for m, v in metrics.items()}})
    return pd.DataFrame(out)


def test_interval_is_students_t_on_the_paired_differences():
    ref = [10.0, 14.0, 9.0, 12.0, 11.0]
    new = [11.0, 16.0, 9.5, 15.0, 10.8]  # differences 1, 2, 0.5, 3, -0.2
    (c,) = paired_comparisons(_frame({"ref": {"psnr": ref}, "new": {"psnr": new}}), "ref")
    d = np.array(new) - np.array(ref)
    mean, sem = d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    low, high = st.t.interval(0.95, df=len(d) - 1, loc=mean, scale=sem)
    assert (c.method, c.reference, c.metric, c.n) == ("new", "ref", "psnr", 5)
    assert c.mean_difference == pytest.approx(1.26)
    assert (c.ci_low, c.ci_high) == pytest.approx((low, high))
    # neither the naive mean ± std nor the normal approximation
    assert c.ci_low != pytest.approx(mean - d.std(), abs=1e-3)
    assert c.ci_low != pytest.approx(mean - 1.96 * sem, abs=1e-3)
    assert c.excludes_zero is False and c.verdict == "no difference shown"  # t_{.975,4}=2.78 keeps 0 in
    (c90,) = paired_comparisons(_frame({"ref": {"psnr": ref}, "new": {"psnr": new}}), "ref", confidence=0.9)
    assert (c90.ci_low, c90.ci_high) == pytest.approx(st.t.interval(0.9, df=4, loc=mean, scale=sem))


def test_wins_ties_losses_follow_direction_and_tolerance():
    frame = _frame({
        "ref": {"psnr": [12.5, 12.5, 12.5, 12.5], "lpips": [0.5, 0.5, 0.5, 0.5]},
        # psnr: +0.1 exactly at the tolerance (a tie despite 12.6 - 12.5 > 0.1 in binary), +0.2, -0.5, +0.05
        # lpips: -0.1 (lower: a win), +0.005 (tie at tolerance), +0.1 (a loss), -0.003 (tie)
        "new": {"psnr": [12.6, 12.7, 12.0, 12.55], "lpips": [0.4, 0.505, 0.6, 0.497]},
    })
    psnr, lpips = paired_comparisons(frame, "ref", metrics=("psnr", "lpips"))
    assert (psnr.wins, psnr.ties, psnr.losses) == (1, 2, 1)
    assert (lpips.wins, lpips.ties, lpips.losses) == (1, 2, 1)
    assert TIE_TOLERANCE["psnr"] == 0.1 and TIE_TOLERANCE["lpips"] == 0.005


def test_verdict_reads_the_interval_in_the_metrics_direction():
    frame = _frame({"ref": {"psnr": [10.0, 11.0, 12.0, 13.0], "lpips": [0.5, 0.6, 0.4, 0.5]},
                    "good": {"psnr": [12.0, 13.5, 13.9, 15.2], "lpips": [0.3, 0.41, 0.19, 0.32]},
                    "bad": {"psnr": [8.0, 9.5, 9.9, 11.2], "lpips": [0.7, 0.81, 0.59, 0.72]}})
    by = {(c.method, c.metric): c for c in paired_comparisons(frame, "ref", metrics=("psnr", "lpips"))}
    assert by["good", "psnr"].verdict == "better" and by["good", "psnr"].ci_low > 0
    assert by["good", "lpips"].mean_difference < 0 and by["good", "lpips"].verdict == "better"
    assert by["good", "lpips"].wins == 4
    assert by["bad", "psnr"].verdict == "worse" and by["bad", "lpips"].verdict == "worse"
    assert by["bad", "lpips"].losses == 4
    assert HIGHER_IS_BETTER["lpips"] is False and HIGHER_IS_BETTER["mse"] is False


def test_pairs_by_victim_whatever_the_row_order_and_missing_victims():
    ref = _frame({"ref": {"psnr": [10.0, 11.0, 12.0, 13.0, 20.0]}}, clients=[0, 1, 2, 3, 4])
    # the method lacks client 4, has client 9 the reference lacks, and a NaN for client 2
    new = _frame({"new": {"psnr": [12.0, 11.5, float("nan"), 14.5, 0.0]}}, clients=[0, 1, 2, 3, 9])
    shuffled = pd.concat([new, ref]).sample(frac=1, random_state=3).reset_index(drop=True)
    (c,) = paired_comparisons(shuffled, "ref", metrics=("psnr",))
    d = np.array([2.0, 0.5, 1.5])  # clients 0, 1, 3
    assert c.n == 3 and c.mean_difference == pytest.approx(d.mean())
    half = st.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert (c.wins, c.ties, c.losses) == (3, 0, 0)
    # the same victim in two rounds is two victims
    rounds = pd.concat([ref.assign(round=1), ref.assign(round=2),
                        new.assign(round=1), new.assign(round=2, psnr=new["psnr"] - 1)])
    (c2,) = paired_comparisons(rounds, "ref", metrics=("psnr",))
    assert c2.n == 6 and c2.mean_difference == pytest.approx((d.sum() + (d - 1).sum()) / 6)


def test_absent_reference_is_named_with_the_methods_present():
    frame = _frame({"invertg": {"psnr": [1.0, 2.0]}, "dfleak": {"psnr": [2.0, 3.0]}})
    with pytest.raises(ValueError, match=r"'idlg'.*invertg, dfleak"):
        paired_comparisons(frame, "idlg")


def test_repeated_victim_rows_are_refused():
    frame = _frame({"a": {"psnr": [1.0, 2.0]}, "b": {"psnr": [2.0, 3.0]}})
    with pytest.raises(ValueError, match="repeat"):
        paired_comparisons(pd.concat([frame, frame.iloc[[0]]]), "a")


def test_order_missing_metrics_and_too_few_victims():
    frame = _frame({"z": {"psnr": [1.0, 2.0], "ssim": [0.1, 0.2], "lpips": [np.nan, np.nan]},
                    "ref": {"psnr": [1.0, 1.0], "ssim": [0.1, 0.1], "lpips": [np.nan, np.nan]},
                    "a": {"psnr": [3.0, np.nan], "ssim": [0.5, 0.5], "lpips": [np.nan, np.nan]}})
    got = paired_comparisons(frame, "ref", metrics=("ssim", "psnr", "lpips", "id_similarity"))
    # methods by first appearance, metrics as given; lpips (all NaN) and id_similarity (absent) skipped
    assert [(c.method, c.metric) for c in got] == [("z", "ssim"), ("z", "psnr"), ("a", "ssim"), ("a", "psnr")]
    one = got[-1]
    assert one.n == 1 and one.mean_difference == 2.0 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert not one.excludes_zero and one.verdict == "no difference shown" and one.wins == 1
    with pytest.raises(ValueError, match="seconds"):
        paired_comparisons(frame, "ref", metrics=("seconds",))


def test_frame_and_markdown():
    frame = _frame({"ref": {"psnr": [10.0, 11.0, 12.0], "lpips": [0.5, 0.6, 0.4]},
                    "new": {"psnr": [12.0, 13.5, 13.9], "lpips": [0.3, 0.61, 0.19]}})
    comps = paired_comparisons(frame, "ref", metrics=("psnr", "lpips"))
    tidy = comparison_frame(comps)
    assert list(tidy.columns) == ["method", "reference", "metric", "n", "mean_difference", "ci_low", "ci_high",
                                  "wins", "ties", "losses", "verdict"]
    assert list(tidy["verdict"]) == [c.verdict for c in comps] and list(tidy["n"]) == [3, 3]

    md = comparison_markdown(comps).splitlines()
    caption, blank, header, rule, *rows = md
    assert blank == "" and "ref" in caption and "minus" in caption
    assert "higher is better for psnr" in caption and "lower is better for lpips" in caption
    assert header == "| method | metric | n | mean diff. [95 % CI] | W/T/L | verdict |"
    p = comps[0]
    assert rows[0] == (f"| new | psnr | 3 | {p.mean_difference:+.2f} [{p.ci_low:+.2f}, {p.ci_high:+.2f}] | "
                       f"3/0/0 | {p.verdict} |")
    assert rows[1].startswith("| new | lpips | 3 | -0.133 [") and "| 2/0/1 |" in rows[1]
    assert f"| {p.mean_difference:+.4f} [{p.ci_low:+.4f}, " in comparison_markdown(comps, digits={"psnr": 4})
    assert comparison_markdown([]) == ""


def test_comparison_is_a_frozen_value():
    c = PairedComparison("a", "b", "psnr", 0, math.nan, math.nan, math.nan, 0, 0, 0)
    with pytest.raises(AttributeError):
        c.n = 3  # type: ignore[misc]
    assert c.verdict == "no difference shown"
