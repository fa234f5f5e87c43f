"""The attack case, the registry of presets and Hungarian matching."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attacks.case import AttackCase
from attacks.matching import match_batch
from attacks.registry import ATTACKS, build_attack, config_fields
from attacks.synthetic import face_image, make_case

torch.set_num_threads(1)


def _case(**kw) -> AttackCase:
    img = torch.cat([face_image(32, i) for i in range(2)])
    return make_case("lenet", 10, img, torch.tensor([3, 7]), **kw)


def test_case_round_trip(tmp_path):
    case = _case(update_kind="weight-diff", local_lr=0.05, local_steps=3, local_batch_size=1, send_labels=True)
    case.meta.update({"round": 4, "client": "c17", "share": 0.5})
    path = case.save(tmp_path / "sub" / "case.pt")
    back = AttackCase.load(path)
    for f in dataclasses.fields(AttackCase):
        a, b = getattr(case, f.name), getattr(back, f.name)
        if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), f.name
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        else:
            assert a == b, f.name
    # The file is loadable with weights_only (no pickled classes).
    assert isinstance(torch.load(path, weights_only=True), dict)
    model = back.build_model()
    assert model.training
    assert all(torch.equal(v, case.weights[k]) for k, v in model.state_dict().items())


def test_case_rejects_bad_input(tmp_path):
    case = _case()
    with pytest.raises(ValueError, match="update_kind"):
        dataclasses.replace(case, update_kind="delta")
    with pytest.raises(ValueError, match="local_lr"):
        dataclasses.replace(case, update_kind="weight-diff", local_lr=0.0)
    with pytest.raises(ValueError, match="labels"):
        dataclasses.replace(case, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="not parameters"):
        dataclasses.replace(case, update={**case.update, "nope.weight": torch.zeros(1)}).parameter_names()
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an attack case"):
        AttackCase.load(tmp_path / "other.pt")


def test_case_ground_truth_free():
    case = _case()
    names = {f.name for f in dataclasses.fields(AttackCase)}
    assert not names & {"images", "truth", "ground_truth"}
    assert case.labels is None  # labels only when the client sends them


def test_registry_presets_and_overrides():
    for name in ("idlg-adam", "invertg", "gradinv", "ggl"):
        build_attack(name)
        assert name in ATTACKS
    inv = build_attack("invertg", iterations=7, tv=0.2)
    assert inv.config.iterations == 7 and inv.config.tv == 0.2 and inv.config.signed
    assert config_fields("invertg")["tv"] == 0.01  # DFLeak paper's value
    assert config_fields("idlg-adam")["objective"] == "l2"
    assert config_fields("gradinv")["objective"] == "l2"
    assert config_fields("ggl")["budget"] == 500
    with pytest.raises(ValueError) as err:
        build_attack("invertg", itrations=5)
    assert "itrations" in str(err.value) and "iterations" in str(err.value)
    with pytest.raises(ValueError, match="objective"):
        build_attack("invertg", objective="manhattan")
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("dlg-lbfgs-9000")


def test_match_batch_recovers_permutation():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(5, 3, 8, 8, generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    recon = torch.empty_like(truth)
    recon[perm] = truth + 0.05 * torch.randn(truth.shape, generator=g)
    assert torch.equal(match_batch(recon, truth), perm)
