"""A bad config never starts a run and never leaves a run directory behind: every setting,
attack and defense parameters included, is validated with a one-line error naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from fl_sim.cli import main

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@pytest.mark.parametrize("override, message", [
    ("data.name=image-folder", "data: data set 'image-folder' needs data.root"),
    ("data.name=lfw", "data: data set 'lfw' not found under"),
    ("attacks.0.params.iterations=abc", "attacks.0.params.iterations: Input should be a valid integer"),
    ("attacks.1.params.init_search=best", "attacks.1.params.init_search: not allowed; allowed: 'nearest'"),
    ("attacks.0.params.itterations=5", "attacks.0.params: no setting 'itterations'; allowed: iterations"),
    ("defenses=[{name: blur}]", "defenses.0.name: unknown defense 'blur'; allowed: ats, clip"),
    ("defenses=[{name: clip, params: {max_norm: -1}}]", "defenses.0.params: max_norm must be > 0"),
    ("metrics.reference=dflek", "metrics.reference: 'dflek' is not a configured attack; allowed: invertg, dfleak"),
    ("threat.victims.ids=[500]", "threat.victims.ids: clients [500] hold no images"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["run", DEMO, override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert len(err.strip().splitlines()) <= 2  # one line (rich may wrap a long one)
    assert not out.exists()
    # ... so the same directory is free for the corrected command
    assert not (out / "config.yaml").exists()


def test_unknown_key_names_the_allowed_ones(capsys):
    assert main(["config", DEMO, "federation.clients_per_rnd=5"]) == 2
    assert "unknown key 'federation.clients_per_rnd'; allowed keys here: num_clients" in capsys.readouterr().err


_BN_TRAIN = ["model.name=mobilenet_v2", "data.image_size=32", "federation.algorithm=fedavg",
             "federation.bn_mode=train", "federation.bn_statistics=clients"]


def test_batchnorm_on_too_few_values_fails_before_the_run(tmp_path, capsys):
    """MobileNetV2 at 32 px ends in 1x1 feature maps: on batches of 2, BatchNorm in train mode
    normalises 2 values per channel and local training reaches NaN in round 1 (measured)."""
    out = tmp_path / "run"
    assert main(["run", DEMO, *_BN_TRAIN, "federation.batch_size=2", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "federation.batch_size: mobilenet_v2 at 32 px ends in feature maps of 1 value(s) per channel" in err, err
    assert "normalises 2 values per channel on batches of 2" in err and "federation.batch_size >= 3" in err, err
    assert not out.exists()


@pytest.mark.parametrize("overrides", [
    [*_BN_TRAIN, "federation.batch_size=3"],                          # 3 values per channel
    [*_BN_TRAIN, "federation.batch_size=2", "federation.bn_mode=eval"],  # running statistics: no batch
    ["federation.bn_mode=train", "federation.bn_statistics=clients"],  # ResNet18 at 64 px: 2x2 maps, batch 1
])
def test_batchnorm_on_enough_values_passes(overrides):
    from fl_sim.config import load_config
    from server.preflight import preflight

    preflight(load_config(DEMO, overrides))
