"""Secure aggregation (Flower's SecAgg+): the server learns the weighted mean of a round's
updates and never an individual one; the attacks target the aggregate.

The easy task of test_federation.py (4 synthetic identities, LeNet, 100 clients, 10 a round).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_sim.config import ConfigError, parse_config
from fl_sim.results import RunDirectory
from test_federation import easy_config, lenet_init, run_tree  # noqa: F401 - fixture

SECURE = {"num_shares": 3, "reconstruction_threshold": 2}


def quantisation_bound(tree: dict, run: RunDirectory) -> float:
    """The largest error SecAgg+'s quantisation can put on an entry of the mean update:
    each client's value x (n_k / max_weight) is stochastically rounded to a step of
    2 x clipping_range / quantization_range, and the sum is divided by sum n_k / max_weight,
    so the mean is off by less than step x max_weight / min n_k (computed, not measured)."""
    from fl_sim.federated_data import federated_data

    config = parse_config(tree)
    sa = config.federation.secure_aggregation
    data = federated_data(config)
    sizes = [len(p) for p in data.partitions if len(p)]
    if config.federation.algorithm == "fedsgd":
        sizes = [min(s, config.federation.batch_size) for s in sizes]
    step = 2 * sa.clipping_range / sa.quantization_range
    return step * max(sizes) / min(sizes)


def global_weights(run: RunDirectory) -> dict[str, torch.Tensor]:
    return torch.load(run.path / "global_model.pt", weights_only=True)


def record_replies(monkeypatch) -> list:
    """Every reply the server receives from now on, and a strategy that fails if it is ever
    handed the clients' replies (it must see only the unmasked aggregate)."""
    from server.grid import InProcessGrid
    from server.strategy import CuriousFedAvg

    replies: list = []
    pull = InProcessGrid.pull_messages

    def recording(self, ids):
        got = list(pull(self, ids))
        replies.extend(got)
        return got

    def refuse(self, *args, **kwargs):
        raise AssertionError("the strategy was handed individual replies")

    monkeypatch.setattr(InProcessGrid, "pull_messages", recording)
    monkeypatch.setattr(CuriousFedAvg, "screen", refuse)
    monkeypatch.setattr(CuriousFedAvg, "aggregate_train", refuse)
    return replies


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsgd"])
def test_the_server_learns_the_mean_and_never_an_update(tmp_path, lenet_init, monkeypatch, algorithm):
    """Two rounds under SecAgg+: the global model equals plain FedAvg's after round 1 within
    the protocol's quantisation bound; no reply carries an update the server can read (arrays
    empty, masked vectors uniform over the modulus, where a plain quantised update sits in a
    narrow band around the range's middle); the strategy never saw a reply; the attack ran on
    the aggregate, a batch of every sampled client's images, and says so."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    sections = dict(federation={"rounds": 1, "algorithm": algorithm, "batch_size": 2},
                    threat={"victims": {"mode": "sampled", "k": 1}, "rounds": [1]},
                    attacks=[{"name": "invertg", "params": {"iterations": 5}}])
    plain_tree = easy_config(lenet_init, **sections)
    secure_tree = easy_config(lenet_init, **{**sections, "federation": {**sections["federation"],
                                                                          "secure_aggregation": SECURE}})
    plain_weights = global_weights(run_tree(plain_tree, tmp_path / "plain"))
    recorded = record_replies(monkeypatch)
    secure = run_tree(secure_tree, tmp_path / "secure")
    assert recorded, "no reply was recorded"
    masked = []
    for msg in recorded:
        assert not msg.has_error(), msg.error.reason if msg.has_error() else ""
        for record in msg.content.array_records.values():
            assert len(record) == 0, "a reply carried readable arrays"
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            masked.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in configs[Key.MASKED_PARAMETERS]]))
    assert len(masked) == 10  # one masked vector per sampled client
    for vec in masked:
        # a plain quantised update of this size lies within +-1 % of 2^21; a masked one is
        # uniform over [0, 2^32): 1 % of 2^22 in a 2^32 range holds ~1e-5 of its entries
        band = np.abs(vec.astype(np.float64) - 2**21) < 0.01 * 2**22
        assert band.mean() < 0.01, band.mean()

    bound = quantisation_bound(secure_tree, secure)
    secure_weights = global_weights(secure)
    gap = max(float((secure_weights[k].double() - plain_weights[k].double()).abs().max())
              for k in plain_weights if plain_weights[k].is_floating_point())
    lr = 1.0 if algorithm == "fedavg" else parse_config(secure_tree).federation.server_lr
    assert gap <= bound * lr * 1.01, (gap, bound)
    assert gap > 0  # it did go through the quantiser (a plain run would be bit-equal)

    metrics = secure.metrics_frame()
    assert list(metrics["client"].unique()) == [-1]
    rounds = secure.rounds_frame()
    sampled = [int(p) for p in rounds["sampled"].iloc[0].split()]
    assert int(metrics["num_images"].iloc[0]) == _images_of(secure_tree, sampled)
    html = (secure.path / "report.html").read_text()
    assert "the aggregate" in html and "secure aggregation" in html


def _images_of(tree: dict, sampled: list[int]) -> int:
    from fl_sim.federated_data import client_sample, federated_data

    config = parse_config(tree)
    data = federated_data(config)
    return sum(len(client_sample(config, data, p, 1)) for p in sampled)


def test_fedsgd_aggregate_is_the_union_batch_gradient(tmp_path, lenet_init):
    """FedSGD's weighted mean gradient is the gradient of the union of the clients' batches
    (no BatchNorm in the LeNet): the attacked case holds it, within the quantisation bound."""
    from attacks.case import AttackCase
    from fl_sim.federated_data import client_sample, federated_data, stack
    from fl_sim.models import build_model
    from fl_sim.training import fedsgd_gradient

    tree = easy_config(lenet_init, federation={"rounds": 1, "algorithm": "fedsgd", "batch_size": 2,
                                               "secure_aggregation": SECURE},
                       threat={"victims": {"mode": "sampled", "k": 1}, "rounds": [1], "save_cases": True})
    run = run_tree(tree, tmp_path / "run")
    case = AttackCase.load(run.path / "cases" / "r1_c-1.pt")
    config = parse_config(tree)
    data = federated_data(config)
    sampled = [int(p) for p in run.rounds_frame()["sampled"].iloc[0].split()]
    images, labels = stack(data, np.concatenate([client_sample(config, data, p, 1) for p in sampled]))
    model = build_model("lenet", data.num_classes)
    model.load_state_dict(torch.load(lenet_init, weights_only=True))
    grads, _ = fedsgd_gradient(model, data.dataset.normalise(images), labels, config.federation.bn_mode)
    bound = quantisation_bound(tree, run)
    assert case.num_images == len(images)
    for name, g in grads.items():
        assert float((case.update[name] - g).abs().max()) <= bound * 1.01, name


def test_secure_aggregation_settings_are_checked(lenet_init):
    with pytest.raises(ConfigError, match="central_dp"):
        parse_config(easy_config(lenet_init, federation={"secure_aggregation": SECURE,
                                                         "central_dp": {"noise_multiplier": 1.0}}))
    with pytest.raises(ConfigError, match="num_shares"):
        parse_config(easy_config(lenet_init, federation={"clients_per_round": 4,
                                                         "secure_aggregation": {"num_shares": 5}}))
    with pytest.raises(ConfigError, match="secure_aggregation.*nonsense|nonsense"):
        parse_config(easy_config(lenet_init, federation={"secure_aggregation": {"nonsense": 1}}))


def test_secure_aggregation_under_flowers_ray_engine(tmp_path, lenet_init):
    """The same protocol under Flower's simulation engine (Ray, one process per client
    actor, messages serialised): the round's model matches plain FedSGD within the
    quantisation bound and the aggregate was attacked."""
    sections = dict(federation={"rounds": 1, "algorithm": "fedsgd", "batch_size": 2},
                    attacks=[{"name": "invertg", "params": {"iterations": 3}}])
    plain = global_weights(run_tree(easy_config(lenet_init, **sections), tmp_path / "plain"))
    tree = easy_config(lenet_init, **{**sections, "federation": {**sections["federation"], "secure_aggregation": SECURE},
                                      "engine": {"backend": "ray", "client_num_cpus": 1}})
    run = run_tree(tree, tmp_path / "ray")
    weights = global_weights(run)
    lr = parse_config(tree).federation.server_lr
    gap = max(float((weights[k].double() - plain[k].double()).abs().max()) for k in plain)
    assert 0 < gap <= quantisation_bound(tree, run) * lr * 1.01
    assert list(run.metrics_frame()["client"]) == [-1]


def test_flowers_own_protocol_checks_run_before_anything_is_written(tmp_path, lenet_init):
    from server.preflight import preflight

    config = parse_config(easy_config(lenet_init, federation={"secure_aggregation": {
        "quantization_range": 2**22, "modulus_range": 3 * 2**30}}))
    with pytest.raises(ConfigError, match="secure_aggregation.*power of 2"):
        preflight(config)


def test_a_securely_aggregated_run_repeats(tmp_path, lenet_init):
    """The protocol's stochastic rounding is seeded per (seed, round, client): the same
    config gives the same model (the masks differ every run and cancel exactly)."""
    tree = easy_config(lenet_init, federation={"rounds": 2, "secure_aggregation": SECURE})
    a, b = (global_weights(run_tree(tree, tmp_path / name)) for name in ("a", "b"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
