"""The DFLeak benchmark (Table II / Table V) and the one case pipeline it shares with the
federation.

What a user reads: a run directory whose table and report hold every method, paired
differences against the reference, the picture grid; DFLeak's trigger and restoration events
recorded; a resumed benchmark that redoes nothing; shards of one run started together.
"""
from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks import dfleak_table

SMALL = ["--iterations", "6", "data.image_size=32", "threat.public_data.size=8",
         "threat.victims.ids=[0,1]", "threat.victims.dev_ids=[2]",
         # a trigger every run reaches, so the restoration events happen within 6 iterations
         "attacks.0.params.epsilon=10", "attacks.0.params.restorer=eigenface"]


def test_bench_writes_table_comparisons_and_report_then_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--out", str(out), "--attacks", "dfleak,invertg", *SMALL]
    assert dfleak_table.main(args) == 0
    first = capsys.readouterr().out
    assert first.count("(identity") == 4  # 2 victims x 2 attacks

    victims = pd.read_csv(out / "victims.csv")
    assert sorted(victims["client"].unique()) == [0, 1]  # the evaluation victims only
    main = victims[victims["attack"].isin(["dfleak", "invertg"])]
    assert len(main) == 4
    assert main["psnr"].between(5, 40).all() and main["ssim"].between(-1, 1).all()
    assert main["lpips"].between(0, 1.5).all() and main["id_similarity"].between(-1, 1).all()
    assert (main["label_accuracy"] == 1.0).all()  # the sign rule on a single image
    dfleak = victims[victims["attack"] == "dfleak"]
    # epsilon 10 fires at the first iteration; 5 events (shares 0..100 %) all happened
    assert (dfleak["x_trigger_iteration"] == 0).all() and (dfleak["x_restoration_events"] >= 4).all()
    assert (dfleak["x_replaced_share"] == 1.0).all()
    # the same DFLeak runs returned by the paper's select rule are rows of their own
    assert {"dfleak [lowest-loss]"} <= set(victims["attack"])

    table = pd.read_csv(out / "table.csv")
    assert list(table["attack"])[:2] == ["dfleak", "invertg"] and (table["victims"] == 2).all()
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert set(comparisons["reference"]) == {"dfleak"} and (comparisons["n"] == 2).all()
    row = comparisons[(comparisons["method"] == "invertg") & (comparisons["metric"] == "psnr")].iloc[0]
    diff = (main.set_index(["client", "attack"])["psnr"].unstack()).eval("invertg - dfleak")
    assert row["mean_difference"] == pytest.approx(diff.mean(), abs=1e-9)
    assert row["wins"] + row["ties"] + row["losses"] == 2
    md = (out / "table.md").read_text()
    assert "orl at 32 px" in md and "evaluation victims (clients 0, 1)" in md and "W/T/L" in md
    # throughput: 6 iterations per victim over each victim's share of its batch's seconds
    for attack in ("dfleak", "invertg"):
        rows = main[main["attack"] == attack]
        speed = table.set_index("attack").loc[attack, "victim_it_per_s"]
        assert speed == pytest.approx(12 / rows["seconds"].sum(), rel=1e-6)
    assert "DFLeak at" in md and "of InvertG" in md
    html = (out / "report.html").read_text()
    assert "Table II / Table V" in html and "victims x methods" in html and "Paired differences" in html

    before = {r.attack: (r.client, r.seconds) for r in _records(out)}
    assert dfleak_table.main(["--resume", str(out)]) == 0
    again = capsys.readouterr().out
    assert "(identity" not in again and "Paired, victim by victim" in again  # nothing attacked again
    assert {r.attack: (r.client, r.seconds) for r in _records(out)} == before


def _records(out):
    from fl_sim.results import RunDirectory

    run = RunDirectory.open(out)
    try:
        return run.attack_records()
    finally:
        run.close()


def test_bench_dev_split_and_shards_started_together(tmp_path, capsys):
    out = tmp_path / "dev"
    base = ["--out", str(out), "--attacks", "invertg", "--split", "dev", *SMALL[:-2],
            "threat.victims.dev_ids=[2,3]"]
    codes: list[int] = []
    threads = [threading.Thread(target=lambda i=i: codes.append(dfleak_table.main(base + ["--shard", f"{i}/2"])))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0]
    victims = pd.read_csv(out / "victims.csv")  # the shard that finished last tabulated
    assert sorted(victims["client"]) == [2, 3]
    assert "development victims (clients 2, 3)" in (out / "table.md").read_text()


def test_bench_refuses_to_overwrite_and_names_bad_settings(tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "config.yaml").write_text("name: x\n")
    assert dfleak_table.main(["--out", str(out), "--victims", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert dfleak_table.main(["--out", str(fresh), "attacks.0.params.iterations=abc"]) == 2
    assert "attacks.0.params.iterations" in capsys.readouterr().err and not fresh.exists()


# ---------------------------------------------------------------------------------------
# One case pipeline: the benchmark's cases are the federation's


@pytest.mark.parametrize("model, bn_mode, batch", [("resnet18", "eval", 1), ("resnet18", "train", 3),
                                                   ("mobilenet_v2", "eval", 1), ("mobilenet_v2", "train", 3)])
def test_bench_cases_equal_the_federations(tmp_path, model, bn_mode, batch):
    """The cases `simulate_victims` builds without Flower are exactly what the strategy hands
    the attacks in a real (in-process Flower) run of the same config, defenses included."""
    from attacks.case import AttackCase
    from fl_sim.config import parse_config
    from fl_sim.results import RunDirectory
    from server.cases import simulate_victims
    from server.launcher import run_experiment

    tree = {
        "name": "same-cases", "seed": 3,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 12}},
        "model": {"name": model},
        "federation": {"num_clients": 12, "clients_per_round": 2, "rounds": 1, "algorithm": "fedsgd",
                       "batch_size": batch, "partitioning": "iid", "bn_mode": bn_mode},
        "threat": {"victims": {"mode": "explicit", "ids": [2, 5]}, "rounds": [1], "save_cases": True},
        "defenses": [{"name": "clip", "params": {"max_norm": 0.5}}],
        "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    config = parse_config(tree)
    run = RunDirectory.create(tmp_path / "fed", config)
    run_experiment(config, run, resume=False)
    victims = simulate_victims(config, [2, 5])
    for v in victims:
        served = AttackCase.load(tmp_path / "fed" / "cases" / f"r1_c{v.client}.pt")
        truth = torch.load(tmp_path / "fed" / "cases" / f"r1_c{v.client}_truth.pt", weights_only=True)
        assert torch.equal(truth["images"], v.truth_images) and torch.equal(truth["labels"], v.truth_labels)
        assert served.bn_mode == v.case.bn_mode == bn_mode and served.meta == v.case.meta
        assert served.meta["defenses"] == "clip"
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in served.update.values()]))
        assert float(norm) <= 0.5 + 1e-5  # the server saw the clipped update
        assert list(served.update) == list(v.case.update)
        for name in v.case.update:  # the same function in another process: equal up to rounding
            torch.testing.assert_close(v.case.update[name], served.update[name], rtol=1e-5, atol=1e-7)
        for name in v.case.weights:
            assert torch.equal(v.case.weights[name], served.weights[name]), name


def test_a_saved_case_holds_nothing_of_the_clients_images(tmp_path):
    """A case file is what the server knows: no tensor in it equals (or contains) a victim's
    images, the truth is in a separate file."""
    from fl_sim.config import parse_config
    from fl_sim.results import RunDirectory
    from server.launcher import run_experiment

    tree = {
        "name": "no-truth", "seed": 1,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 12}},
        "model": {"name": "lenet"},
        "federation": {"num_clients": 12, "clients_per_round": 2, "rounds": 1, "algorithm": "fedavg",
                       "batch_size": 2, "local_steps": 2, "partitioning": "iid"},
        "threat": {"victims": {"mode": "explicit", "ids": [4]}, "rounds": [1], "save_cases": True},
        "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    config = parse_config(tree)
    run_experiment(config, RunDirectory.create(tmp_path / "fed", config), resume=False)
    saved = torch.load(tmp_path / "fed" / "cases" / "r1_c4.pt", weights_only=True)
    truth = torch.load(tmp_path / "fed" / "cases" / "r1_c4_truth.pt", weights_only=True)["images"]
    images = {truth.numpy().tobytes()} | {im.numpy().tobytes() for im in truth}
    normalised = (truth - 0.5) / 0.5

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    found = list(tensors(saved))
    assert len(found) > 10
    for t in found:
        assert t.numpy().tobytes() not in images
        if t.shape[-3:] == truth.shape[-3:]:
            assert not torch.allclose(t, truth) and not torch.allclose(t, normalised)
    assert saved["labels"] is None  # labels_known: false
    assert np.isfinite(truth.numpy()).all()
