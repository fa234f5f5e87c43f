"""The sweep's pictures and page: the privacy-utility chart, a grid of reconstructions per
point, and report.html (self-contained, images inlined)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

METRIC_LABELS = {"psnr": "PSNR (dB) ↑ leaks more", "id_similarity": "identity similarity ↑ leaks more"}
MARKERS = "os^Dv<>"
LINES = ["-", "--", ":", "-."]


def privacy_utility_figure(summary: pd.DataFrame, path: Path) -> None:
    """Leakage against accuracy (left) and against strength (right), one curve per defense
    from no defense (strength 0) to its strongest setting, one line style per attack."""
    from server.sweep import naive_attack

    has_accuracy = summary["accuracy"].notna().any()
    metrics = list(METRIC_LABELS)
    cols = 2 if has_accuracy else 1
    fig, axes = plt.subplots(len(metrics), cols, figsize=(5.2 * cols, 3.6 * len(metrics)), squeeze=False)
    attacks = list(dict.fromkeys(summary["attack"]))
    defenses = [d for d in dict.fromkeys(summary["defense"]) if d != "none"]
    colours = plt.get_cmap("tab10")
    base = summary[summary["defense"] == "none"]
    for i, metric in enumerate(metrics):
        for k, attack in enumerate(attacks):
            start = base[base["attack"] == naive_attack(attack)]  # without defense an adaptive attack is naive
            for j, defense in enumerate(defenses):
                curve = pd.concat([start, summary[(summary["defense"] == defense) & (summary["attack"] == attack)]])
                curve = curve.sort_values("strength")
                style = dict(color=colours(j), linestyle=LINES[k % len(LINES)], marker=MARKERS[k % len(MARKERS)],
                             label=f"{defense}, {attack}")
                if has_accuracy:
                    ax = axes[i][0]
                    ax.plot(curve["accuracy"] * 100, curve[metric], **style)
                    for r in curve.itertuples():
                        if r.strength > 0 and k == 0:
                            ax.annotate(str(r.value), (r.accuracy * 100, getattr(r, metric)), fontsize=6,
                                        xytext=(3, 3), textcoords="offset points", color=colours(j))
                axes[i][cols - 1].plot(curve["strength"], curve[metric], **style)
            if has_accuracy and not start.empty:  # no defense: where every curve starts
                axes[i][0].scatter(start["accuracy"] * 100, start[metric], marker="*", s=120, color="black",
                                   zorder=5)
        if has_accuracy:
            axes[i][0].set_xlabel("test accuracy (%) of the federation with the defense →")
            axes[i][0].set_ylabel(METRIC_LABELS[metric])
            axes[i][0].grid(alpha=0.3)
        ax = axes[i][cols - 1]
        ax.set_xlabel("strength (0: no defense; then the settings, weakest first)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_xticks(sorted(summary["strength"].unique()))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][cols - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.015 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reconstruction_grid(frame: pd.DataFrame, out: Path, path: Path, victims: int = 2) -> None:
    """Rows: points; columns: for the first `victims` victims, the truth and every attack."""
    import numpy as np
    from PIL import Image

    points = list(dict.fromkeys(frame["point"]))
    attacks = list(dict.fromkeys(frame["attack"]))
    clients = list(dict.fromkeys(frame["client"]))[:victims]
    cols = [(c, a) for c in clients for a in [None, *attacks]]
    fig, axes = plt.subplots(len(points), len(cols), figsize=(1.2 * len(cols) + 0.8, 1.2 * len(points) + 0.4),
                             squeeze=False)
    for i, point in enumerate(points):
        rows = frame[frame["point"] == point]
        for j, (client, attack) in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            sel = rows[rows["client"] == client]
            rel = (sel["truth_image"] if attack is None else sel[sel["attack"] == attack]["image"])
            if len(rel) and rel.iloc[0]:
                ax.imshow(np.asarray(Image.open(out / rel.iloc[0]).convert("RGB")))
            if i == 0:
                ax.set_title(f"client {client}\n{attack or 'truth'}", fontsize=6)
            if j == 0:
                ax.set_ylabel(point, fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_report(sweep, out: Path, summary: pd.DataFrame) -> Path:
    from jinja2 import Environment, select_autoescape

    from fl_sim.report import _file_uri

    table = pd.DataFrame({
        "point": summary["point"], "attack": summary["attack"], "victims": summary["victims"],
        "PSNR": summary["psnr"].map("{:.2f}".format),
        "Δ PSNR vs none [95 % CI]": [
            "-" if math.isnan(m) else f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            for m, lo, hi in zip(summary["psnr_vs_none"], summary["psnr_vs_none_low"], summary["psnr_vs_none_high"])],
        "LPIPS": summary["lpips"].map("{:.3f}".format),
        "id similarity": summary["id_similarity"].map("{:.3f}".format),
        "Δ id vs none [95 % CI]": [
            "-" if math.isnan(m) else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            for m, lo, hi in zip(summary["id_similarity_vs_none"], summary["id_similarity_vs_none_low"],
                                 summary["id_similarity_vs_none_high"])],
        "rank-1": summary["id_rank1"].map("{:.0%}".format),
        "id rank": summary["id_rank"].map("{:.1f}".format),
        "accuracy": summary["accuracy"].map(lambda v: "-" if math.isnan(v) else f"{v:.1%}"),
        "epsilon": summary["epsilon"].map(lambda v: "-" if math.isnan(v) else f"{v:.3g}"),
    })
    links = [(p, f"points/{p}/leakage/report.html", f"points/{p}/utility/report.html")
             for p in sorted({d.name for d in (out / "points").iterdir()})] if (out / "points").exists() else []
    html = Environment(autoescape=select_autoescape(default_for_string=True)).from_string(PAGE).render(
        sweep=sweep, table=table.to_html(index=False, border=0), chart=_file_uri(out / "privacy_utility.png"),
        grid=_file_uri(out / "reconstructions.png"), links=links)
    page = out / "report.html"
    page.write_text(html)
    return page


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fl-sim sweep: {{ sweep.name }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1150px; color: #222; }
 .sub { color: #666; } table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1.5rem; }
 th, td { border-bottom: 1px solid #ddd; padding: .25rem .5rem; text-align: right; }
 th:first-child, td:first-child, td:nth-child(2) { text-align: left; } img { max-width: 100%; }
</style></head><body>
<h1>Sweep: {{ sweep.name }}</h1>
<p class="sub">Leakage: {{ sweep.leakage.config }}{% if sweep.leakage.overrides %} ({{ sweep.leakage.overrides | join(', ') }}){% endif %},
 attacks {{ (sweep.leakage.attacks or ['all']) | join(', ') }}{% if sweep.leakage.iterations %}, {{ sweep.leakage.iterations }} iterations{% endif %}.
{% if sweep.utility %}Utility: {{ sweep.utility.config }}{% if sweep.utility.overrides %} ({{ sweep.utility.overrides | join(', ') }}){% endif %};
 accuracy is the mean test accuracy of its last {{ sweep.utility.last_rounds }} rounds.{% endif %}
 Differences against no defense are paired by victim, with a 95 % Student's t interval.</p>
<h2>Privacy and utility</h2>
<figure><img src="{{ chart }}" alt="leakage against accuracy and strength"></figure>
<h2>Per defense and strength</h2>
{{ table | safe }}
<h2>Reconstructions</h2>
<figure><img src="{{ grid }}" alt="reconstructions per point"></figure>
<h2>Each point's own reports</h2>
<ul>{% for name, leak, util in links %}<li>{{ name }}: <a href="{{ leak }}">leakage</a>{% if sweep.utility %}, <a href="{{ util }}">federation</a>{% endif %}</li>{% endfor %}</ul>
</body></html>
"""

__all__ = ["privacy_utility_figure", "reconstruction_grid", "write_sweep_report"]
