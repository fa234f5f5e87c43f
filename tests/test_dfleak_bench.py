"""The DFLeak benchmark (Table II / Table V): one victim, a few iterations, end to end.

It checks what a user reads: a run directory whose report holds the comparison table and
the picture grid, a table with a row per method, and a resumed benchmark that redoes nothing.
"""
from __future__ import annotations

import pandas as pd
import pytest

from benchmarks import dfleak_table


def test_dfleak_bench_writes_table_and_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--out", str(out), "--iterations", "4", "--victims", "1", "--attacks", "dfleak,invertg",
            "data.image_size=32", "threat.public_data.size=8"]
    assert dfleak_table.main(args) == 0
    first = capsys.readouterr().out
    assert "client 0 (identity" in first

    table = pd.read_csv(out / "table.csv")
    assert list(table["attack"]) == ["dfleak", "dfleak [paper select]", "invertg"]
    assert (table["victims"] == 1).all()
    metrics = pd.read_csv(out / "metrics.csv")
    assert sorted(metrics["attack"]) == ["dfleak", "invertg"]
    assert metrics["psnr"].notna().all() and metrics["id_similarity"].notna().all()
    assert (metrics["label_accuracy"] == 1.0).all()  # the sign rule on a single image
    html = (out / "report.html").read_text()
    assert "Table II / Table V" in html and "victims x methods" in html
    assert "bn_mode: eval" in (out / "config.yaml").read_text()  # the mode the gradients used

    saved = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.pt")}
    assert len(saved) == 2
    assert dfleak_table.main(["--resume", str(out)]) == 0
    assert "client 0 (identity" not in capsys.readouterr().out  # nothing attacked again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.pt")} == saved


def test_dfleak_bench_refuses_to_overwrite(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "config.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit, match="already holds a run"):
        dfleak_table.main(["--out", str(out), "--victims", "1"])


def test_bench_cases_equal_the_federations(tmp_path):
    """The bench builds its cases without Flower; they must be exactly what the server's
    strategy hands the attacks in a real run of the same config."""
    import torch

    from attacks.case import AttackCase
    from fl_sim.config import parse_config
    from fl_sim.results import RunDirectory
    from fl_sim.simulation import run_experiment

    tree = {
        "name": "same-cases", "seed": 3,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 30}},
        "model": {"name": "lenet"},
        "federation": {"num_clients": 20, "clients_per_round": 20, "rounds": 1, "algorithm": "fedsgd",
                       "batch_size": 1, "partitioning": "iid"},
        "threat": {"victims": {"mode": "explicit", "ids": [2, 5]}, "rounds": [1], "save_cases": True},
        "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    config = parse_config(tree)
    run = RunDirectory.create(tmp_path / "fed", config)
    run_experiment(config, run, resume=False)
    _, cases = dfleak_table.build_cases(config, config.federation.bn_mode)
    assert [pid for pid, *_ in cases] == [2, 5]
    for pid, case, truth, labels, _ in cases:
        served = AttackCase.load(tmp_path / "fed" / "cases" / f"r1_c{pid}.pt")
        served_truth = torch.load(tmp_path / "fed" / "cases" / f"r1_c{pid}_truth.pt", weights_only=True)
        assert torch.equal(served_truth["images"], truth) and torch.equal(served_truth["labels"], labels)
        assert list(served.update) == list(case.update)
        for name in case.update:
            torch.testing.assert_close(case.update[name], served.update[name], rtol=1e-5, atol=1e-7)
        for name in case.weights:
            assert torch.equal(case.weights[name], served.weights[name]), name
