"""The run directory contract: store, CSV exports, no silent overwrite, the HTML report."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fl_sim.config import ExperimentConfig
from fl_sim.report import write_report
from fl_sim.results import AttackRecord, RoundRecord, RunDirectory, RunExists


def _filled_run(tmp_path, orl64) -> RunDirectory:
    run = RunDirectory.create(tmp_path / "run", ExperimentConfig(name="t"))
    for client in range(2):
        truth = run.save_image(f"r1_c{client}_truth", orl64.images[client * 10][None])
        for attack in ("invertg", "idlg-adam"):
            img = run.save_image(f"r1_c{client}_{attack}", torch.rand(1, 3, 64, 64))
            run.add_attack(AttackRecord(1, client, attack, psnr=12.5 + client, image=img, truth_image=truth))
    for r in (1, 2):
        run.add_round(RoundRecord(r, 0.2 * r, 1.0 / r, 10, 2.0))
    return run


def test_store_exports_csv_and_knows_what_is_done(tmp_path, orl64):
    run = _filled_run(tmp_path, orl64)
    metrics = pd.read_csv(run.path / "metrics.csv")
    assert len(metrics) == 4 and {"round", "client", "attack", "psnr", "ssim", "lpips"} <= set(metrics)
    assert list(pd.read_csv(run.path / "rounds.csv")["test_accuracy"]) == pytest.approx([0.2, 0.4])
    assert (1, 1, "invertg") in run.done_attacks() and run.done_rounds() == {1, 2}
    reopened = RunDirectory.open(run.path)
    assert reopened.done_attacks() == run.done_attacks()
    assert reopened.config().name == "t"


def test_existing_run_is_never_overwritten(tmp_path, orl64):
    _filled_run(tmp_path, orl64)
    with pytest.raises(RunExists, match="--resume"):
        RunDirectory.create(tmp_path / "run", ExperimentConfig(name="other"))
    assert RunDirectory.open(tmp_path / "run").config().name == "t"


def test_report_inlines_every_reconstruction_and_the_curves(tmp_path, orl64):
    run = _filled_run(tmp_path, orl64)
    html = write_report(run).read_text()
    # 2 victims x (truth + 2 attacks) + accuracy curve + leakage curve
    assert html.count("data:image/png;base64,") == 2 * 3 + 2
    assert "invertg" in html and "idlg-adam" in html and "13.50" in html
