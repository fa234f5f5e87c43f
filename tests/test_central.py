"""`fl-sim bench central`: the same model trained centrally, the accuracy a federation is
read against."""
from __future__ import annotations

import pytest

from benchmarks.central import federation_epochs, main, train_central
from fl_sim.config import parse_config


def _config(**federation) -> object:
    fed = {"num_clients": 100, "clients_per_round": 10, "rounds": 40, "algorithm": "fedavg",
           "batch_size": 4, "local_lr": 0.05, "local_epochs": 5, "partitioning": "iid", **federation}
    return parse_config({"data": {"name": "orl", "image_size": 64}, "model": {"name": "resnet18"},
                         "federation": fed, "threat": {"rounds": []}})


def test_epochs_match_what_the_federations_clients_train():
    assert federation_epochs(_config(), 360) == pytest.approx(40 * 0.1 * 5)
    assert federation_epochs(_config(local_steps=3), 360) == pytest.approx(40 * 10 * 3 * 4 / 360)
    assert federation_epochs(_config(algorithm="fedsgd", batch_size=1), 360) == pytest.approx(400 / 360)


def test_central_training_learns_orl(tmp_path, capsys):
    """ResNet18 on ORL's 360 training faces at 64 px, 4 epochs of the federation's SGD:
    measured over seeds 0-2, epochs 3-4 at 55-88 % (chance is 2.5 %), train loss 4.2-4.3 ->
    0.7-0.9. The CLI prints the gap to a run."""
    records = train_central(_config(), epochs=4)
    assert [r.epoch for r in records] == [1, 2, 3, 4]
    assert max(r.test_accuracy for r in records[2:]) >= 0.4, [r.test_accuracy for r in records]
    assert records[-1].train_loss < records[0].train_loss / 2

    run = tmp_path / "run"
    run.mkdir()
    (run / "rounds.csv").write_text("round,test_accuracy\n1,0.1\n2,0.5\n")
    out = tmp_path / "central.csv"
    assert main(["configs/bench/federation.yaml", "data.image_size=32", "--epochs", "1", "--run", str(run),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round 2 50.0%" in printed and "gap to central" in printed
    assert out.read_text().startswith("epoch,test_accuracy,test_loss,train_loss,seconds")


def test_overrides_alone_apply_to_the_default_config_and_bad_keys_are_named():
    from fl_sim.config import ConfigError

    with pytest.raises(ConfigError, match="federation.bogus"):
        main(["federation.bogus=1"])
