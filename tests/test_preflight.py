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
