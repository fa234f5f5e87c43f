"""`fl-sim sweep`: a real (small) grid end to end, resumed without redoing work, and sweep
files with mistakes refused before anything runs."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from rich.console import Console

from fl_sim.config import ConfigError

DATA = {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 8}}


def _configs(tmp_path):
    leakage = {
        "name": "leak", "seed": 0, "data": DATA, "model": {"name": "lenet"},
        "federation": {"num_clients": 8, "clients_per_round": 2, "rounds": 1, "algorithm": "fedsgd",
                       "batch_size": 1, "partitioning": "iid"},
        "threat": {"victims": {"mode": "explicit", "ids": [1, 2, 3]}, "rounds": [1]},
        "attacks": [{"name": "invertg", "label": "invertg", "params": {"iterations": 200}},
                    {"name": "idlg-adam", "label": "idlg", "params": {"iterations": 200}}],
        "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    utility = {
        "name": "util", "seed": 0, "data": DATA, "model": {"name": "lenet"},
        "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "algorithm": "fedavg",
                       "batch_size": 4, "local_epochs": 1, "local_lr": 0.05, "partitioning": "iid"},
        "threat": {"rounds": []}, "attacks": [], "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    (tmp_path / "leak.yaml").write_text(yaml.safe_dump(leakage))
    (tmp_path / "util.yaml").write_text(yaml.safe_dump(utility))
    return _sweep_tree(tmp_path)


def _sweep_tree(tmp_path):
    """The sweep over the config files `_configs` writes."""
    return {
        "name": "small",
        "leakage": {"config": str(tmp_path / "leak.yaml"), "attacks": ["invertg"], "iterations": 100, "victims": 2,
                    "adaptive": ["invertg"], "at_once": 2},
        "utility": {"config": str(tmp_path / "util.yaml"), "last_rounds": 2},
        "defenses": [{"name": "none"}, {"name": "noise", "param": "std", "values": [1.0, 10.0]},
                     {"name": "prune", "param": "rate", "values": [0.99]}],
    }


def test_a_sweep_measures_every_point_and_a_resumed_sweep_redoes_nothing(tmp_path, capsys):
    from fl_sim.results import RunDirectory
    from server.sweep import parse_sweep, points, run_point, run_sweep

    sweep = parse_sweep(_configs(tmp_path))
    out = tmp_path / "sweep"
    assert [p.label for p in points(sweep)] == ["none", "noise std=1", "noise std=10", "prune rate=0.99"]
    run_point(sweep, points(sweep)[0], out)  # a sweep stopped after its first point
    first = RunDirectory.open(out / "points" / "none" / "leakage")
    before = first.metrics_frame()[["client", "attack", "psnr", "seconds"]]
    first.close()

    capsys.readouterr()
    frame = run_sweep(sweep, out, Console(quiet=True))

    # the remaining points attack one global model: their 6 victims ran as two batches, one in
    # each of the two worker processes
    assert capsys.readouterr().out.count("invertg (3 victims together)") == 2
    after = pd.read_csv(out / "sweep.csv")
    # points x victims, one attack (the other is filtered out), and its adaptive twin where the
    # defense can be modelled (pruning; not noise, not without a defense)
    assert len(frame) == len(after) == 4 * 2 + 2
    assert set(after["attack"]) == {"invertg", "invertg-adaptive"}
    adaptive = after[after["adaptive"]]
    assert set(adaptive["point"]) == {"prune rate=0.99"} and set(adaptive["naive_attack"]) == {"invertg"}
    assert sorted(after["strength"].unique()) == [0, 1, 2]
    assert after["accuracy"].between(0, 1).all() and after["final_accuracy"].between(0, 1).all()
    # the finished point was not attacked again: the same records, seconds and all
    again = after[after["point"] == "none"][["client", "attack", "psnr", "seconds"]]
    pd.testing.assert_frame_equal(before.sort_values("client").reset_index(drop=True),
                                  again.sort_values("client").reset_index(drop=True), check_dtype=False)
    # noise far above the gradient's size destroys the reconstruction: PSNR falls, paired by
    # victim (measured -2.9 to -3.2 dB over seeds 0-2)
    summary = pd.read_csv(out / "summary.csv").set_index("point")
    assert math.isnan(summary.loc["none", "psnr_vs_none"])
    assert summary.loc["noise std=10", "psnr_vs_none"] < -1.0
    assert summary.loc["noise std=10", "psnr"] < summary.loc["none", "psnr"]
    assert summary.reset_index().set_index(["point", "attack"]).loc[("prune rate=0.99", "invertg-adaptive"),
                                                                    "psnr_vs_none"] == pytest.approx(
        (adaptive["psnr"].to_numpy() - after[(after["point"] == "none")].sort_values("client")["psnr"].to_numpy()).mean())
    for name in ("privacy_utility.png", "reconstructions.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    assert "data:image/png;base64," in (out / "report.html").read_text()

    # run again: everything is there, nothing is recomputed
    mtimes = {p: p.stat().st_mtime for p in (out / "points").rglob("results.sqlite")}
    run_sweep(sweep, out, Console(quiet=True))
    assert {p: p.stat().st_mtime for p in (out / "points").rglob("results.sqlite")} == mtimes

    # a config the sweep names, edited since: the finished points are not mixed with new ones
    leak = yaml.safe_load((tmp_path / "leak.yaml").read_text())
    leak["federation"]["bn_mode"] = "eval"
    (tmp_path / "leak.yaml").write_text(yaml.safe_dump(leak))
    with pytest.raises(ConfigError, match="ran another config than the sweep now builds"):
        run_sweep(parse_sweep(_sweep_tree(tmp_path)), out, Console(quiet=True))


def test_sweep_files_with_mistakes_are_refused_with_the_key(tmp_path):
    from server.sweep import open_sweep, parse_sweep

    tree = _configs(tmp_path)
    tree["defenses"][1]["nme"] = "x"
    with pytest.raises(ConfigError, match=r"unknown key 'defenses\.1\.nme'; allowed keys here: name, param, values"):
        parse_sweep(tree)
    tree = _configs(tmp_path)
    tree["defenses"].append({"name": "prune", "param": "rate", "values": [0.5, 1.5]})
    with pytest.raises(ConfigError, match=r"defenses\.3\.values\.1: rate must be in \[0, 1\)"):
        parse_sweep(tree)
    tree = _configs(tmp_path)
    tree["defenses"].append({"name": "shuffle"})
    with pytest.raises(ConfigError, match=r"defenses\.3.*'shuffle'.*prune"):
        parse_sweep(tree)
    tree = _configs(tmp_path)
    tree["leakage"]["attacks"] = ["gradinv"]
    with pytest.raises(ConfigError, match=r"gradinv.*invertg"):
        parse_sweep(tree)

    out = tmp_path / "sweep"
    open_sweep(out, parse_sweep(_configs(tmp_path)))
    other = _configs(tmp_path)
    other["leakage"]["iterations"] = 31
    with pytest.raises(ConfigError, match="holds another sweep.*--resume"):
        open_sweep(out, parse_sweep(other))
