"""The server's own BatchNorm statistics (`federation.bn_statistics: public`): what lets
batch-1 clients with frozen BatchNorm train at all.

Real pieces throughout: ORL at 64 px, ResNet18, the server's DCGAN public faces, the real
Flower federation in-process.
"""
from __future__ import annotations

import math

import pytest
import torch

from fl_sim.models import build_model
from fl_sim.training import calibrate_batchnorm
from tests.test_federation import run_tree


def test_calibration_sets_each_layers_exact_statistics_and_nothing_else():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    x = torch.randn(24, 3, 32, 32) * 2 + 1
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.bn1.momentum = 0.3
    model.layer1.eval()  # a mixed mode, as a client with frozen BatchNorm has: kept as it was
    calibrate_batchnorm(model, x)
    with torch.no_grad():
        h = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, h.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and deeper layers see the calibrated layers before them
        h2 = model.layer1[0].conv1(model.maxpool(model.relu(model.bn1(h))))
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, h2.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.3 and model.training and model.bn1.training
    assert not model.layer1.training and not model.layer1[0].bn1.training
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_calibration_draws_nothing_from_the_global_generator():
    """MobileNetV2's dropout stays off while statistics are estimated: a client's update must not
    depend on whether the server calibrated before it in the same process."""
    model = build_model("mobilenet_v2", 10)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    calibrate_batchnorm(model, x)
    assert torch.equal(torch.rand(3), expected)


def _tree(bn_statistics: str, rounds: int) -> dict:
    return {"name": "bnstats", "seed": 0, "data": {"name": "orl", "image_size": 64},
            "model": {"name": "resnet18"},
            "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": rounds, "algorithm": "fedsgd",
                           "batch_size": 1, "server_lr": 0.1, "bn_mode": "eval", "bn_statistics": bn_statistics},
            "threat": {"victims": {"mode": "sampled", "k": 1}, "rounds": [1], "save_cases": True,
                       "public_data": {"name": "synthetic", "size": 100}},
            "attacks": [], "engine": {"backend": "inprocess"}, "metrics": {"lpips": False, "id_backend": None}}


def test_the_server_estimates_statistics_on_its_public_faces_every_round(tmp_path):
    """The model the clients train (and the attacker attacks) carries statistics of the
    server's public faces from round 1 on, re-estimated for every new global model."""
    from attacks.case import AttackCase
    from fl_sim.federated_data import federated_data, public_set
    from fl_sim.config import parse_config
    from server.federation import STATE_ROUND

    run = run_tree(_tree("public", 2), tmp_path / "run")
    [path] = [p for p in (run.path / "cases").glob("r1_c*.pt") if not p.name.endswith("_truth.pt")]
    start = AttackCase.load(path).weights
    config = parse_config(_tree("public", 2))
    data = federated_data(config)
    public = data.dataset.normalise(public_set(config, data).images)
    model = build_model("resnet18", data.num_classes)
    model.load_state_dict(start)
    with torch.no_grad():
        first = model.conv1(public)
    torch.testing.assert_close(start["bn1.running_mean"], first.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert float(start["bn1.running_var"].mean()) != pytest.approx(1.0, abs=0.05)  # not the start-up values

    _, after = run.checkpoint(STATE_ROUND)
    model.load_state_dict(after)
    with torch.no_grad():
        h = model.conv1(public)
    assert not torch.equal(after["conv1.weight"], start["conv1.weight"])
    torch.testing.assert_close(after["bn1.running_mean"], h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_frozen_batchnorm_clients_learn_on_the_servers_statistics(tmp_path):
    """Batch-1 clients with frozen BatchNorm, 30 rounds of FedSGD. On the start-up statistics
    the test loss stays at chance (measured 3.66-3.69 in rounds 21-30; ln 40 = 3.69); on the
    server's public-face statistics the model learns (accuracy 7.5-25 %, mean 15.5 %, and
    test loss 3.14-3.51 in rounds 21-30)."""
    frames = {stats: run_tree(_tree(stats, 30), tmp_path / stats).rounds_frame() for stats in ("clients", "public")}
    late = {stats: f[f["round"] > 20] for stats, f in frames.items()}
    public, start_up = late["public"], late["clients"]
    assert public["test_accuracy"].mean() >= 0.075, public  # three times chance
    assert public["test_loss"].min() < math.log(40) - 0.3, public
    assert public["test_loss"].mean() < start_up["test_loss"].mean() - 0.2, (public, start_up)
