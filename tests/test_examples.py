"""The example notebook runs, top to bottom, through the public Python API."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # Executed cell by cell in one namespace, as a kernel would (no Jupyter needed for CI).
    monkeypatch.chdir(tmp_path)
    nb = json.loads(NOTEBOOK.read_text())
    namespace: dict = {"__name__": "__main__"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}[{i}]", "exec"), namespace)
    run, metrics = namespace["run"], namespace["metrics"]
    assert (tmp_path / "runs" / "notebook" / "report.html").exists()
    assert sorted(metrics["attack"].unique()) == ["idlg-adam", "invertg"] and len(metrics) == 4
    assert len(run.rounds) == 2
    # The attacks do something: InvertG reached 18.4 dB here from a random start near 8 dB.
    assert metrics.groupby("attack")["psnr"].max()["invertg"] > 14
    comparisons = run.comparisons()
    assert {c.metric for c in comparisons} >= {"psnr", "ssim"} and all(c.n == 2 for c in comparisons)
