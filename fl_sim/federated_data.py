"""The federation's data, built deterministically from a config: every process that needs it
(the server for evaluation and ground truth, each simulated client, an offline tool) builds
the same partitions from the same config and seed, so nothing but the config travels.

- `FederatedData`: the data set, its train/test split and one index set per client.
- `client_sample`: which of a client's images it trains on in a round, in the order it uses
  them (FedSGD: `batch_size` images drawn per round; FedAvg: its whole local set).
- `public_set`: the attacker's public face set D_c, disjoint from every client's data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass

import numpy as np
import torch

from fl_sim.config import DataConfig, ExperimentConfig
from fl_sim.data import DataSpec, FaceDataset, assert_disjoint, load_dataset, partition, split_train_test, to_grey


@dataclass
class FederatedData:
    dataset: FaceDataset  # every image; indices below point into it
    train: np.ndarray
    test: np.ndarray
    partitions: list[np.ndarray]  # one index set per partition id (client)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.dataset.images.shape[1:])  # type: ignore[return-value]

    def non_empty(self) -> list[int]:
        return [pid for pid, p in enumerate(self.partitions) if len(p) > 0]

    def test_set(self) -> FaceDataset:
        return self.dataset.subset(self.test)


def data_spec(data: DataConfig, seed: int) -> DataSpec:
    return DataSpec(name=data.name, image_size=data.image_size, root=data.root, download=data.download,
                    max_images=data.max_images, seed=seed, options=dict(data.options))


def _key(config: ExperimentConfig) -> str:
    fed = config.federation
    blob = json.dumps({"data": config.data.model_dump(mode="json"), "seed": config.seed,
                       "n": fed.num_clients, "scheme": fed.partitioning, "alpha": fed.dirichlet_alpha},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


_CACHE: dict[str, FederatedData] = {}
_LOCK = threading.Lock()


def federated_data(config: ExperimentConfig) -> FederatedData:
    """The federation's data for a config; cached per process (clients call it every round)."""
    key = _key(config)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one experiment per process at a time; do not hoard data sets
            _CACHE[key] = build_federated_data(config)
        return _CACHE[key]


def build_federated_data(config: ExperimentConfig) -> FederatedData:
    fed = config.federation
    ds = load_dataset(data_spec(config.data, config.seed))
    train, test = split_train_test(ds, config.data.test_fraction, config.seed)
    parts = partition(ds, train, fed.num_clients, fed.partitioning, config.seed, fed.dirichlet_alpha)
    return FederatedData(ds, train, test, parts)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def client_sample(config: ExperimentConfig, data: FederatedData, partition_id: int, server_round: int) -> np.ndarray:
    """Indices (into data.dataset) of the images a client uses this round, in its order.

    FedSGD: `batch_size` images drawn without replacement (all when it holds fewer), seeded
    by (seed, round, client). FedAvg: the client's whole local set in a seeded per-round
    order; its local step s uses images (s * b + j) mod n, j < b, the order the attacker's
    unrolling assumes.
    """
    part = data.partitions[partition_id]
    rng = _rng(config.seed, server_round, partition_id, 17)
    if config.federation.algorithm == "fedsgd":
        k = min(config.federation.batch_size, len(part))
        return np.sort(rng.choice(part, size=k, replace=False))
    return rng.permutation(part)


def client_seed(config: ExperimentConfig, partition_id: int, server_round: int) -> int:
    """The seed of a client's randomness in a round (dropout masks, a defense's noise): the
    same in every process, different for every (seed, round, client)."""
    return int(np.random.SeedSequence([config.seed, server_round, partition_id, 41]).generate_state(1)[0])


def fedavg_steps(config: ExperimentConfig, n: int) -> int:
    fed = config.federation
    if fed.local_steps is not None:
        return fed.local_steps
    return fed.local_epochs * max(1, -(-n // fed.batch_size))


def sample_clients(config: ExperimentConfig, population: list[int], server_round: int) -> list[int]:
    """The partition ids trained in a round: seeded by (seed, round), so reproducible and
    independent of Flower's random node ids (flower.md pitfall 4)."""
    k = min(config.federation.clients_per_round, len(population))
    rng = _rng(config.seed, server_round, 29)
    return sorted(int(p) for p in rng.choice(np.asarray(sorted(population)), size=k, replace=False))


def choose_victims(config: ExperimentConfig, sampled: list[int], server_round: int) -> list[int]:
    """The round's victims among its sampled clients (explicit victims are sampled by
    `force_victims`)."""
    victims = config.threat.victims
    if server_round not in config.threat.rounds:
        return []
    if victims.mode == "all":
        return list(sampled)
    if victims.mode == "explicit":
        return [p for p in sampled if p in set(victims.ids)]
    k = min(victims.k, len(sampled))
    rng = _rng(config.seed, server_round, 31)
    return sorted(int(p) for p in rng.choice(np.asarray(sampled), size=k, replace=False))


def force_victims(config: ExperimentConfig, sampled: list[int], population: list[int], server_round: int) -> list[int]:
    """Explicit victims are in every attacked round: the server controls the sampling, so it
    includes them (replacing other clients, the round's size unchanged)."""
    if config.threat.victims.mode != "explicit" or server_round not in config.threat.rounds:
        return sampled
    wanted = [p for p in config.threat.victims.ids if p in set(population)]
    others = [p for p in sampled if p not in wanted]
    keep = max(0, len(sampled) - len(wanted))
    return sorted(set(wanted) | set(others[:keep]))


def public_set(config: ExperimentConfig, data: FederatedData) -> FaceDataset:
    """The attacker's public faces, at the clients' size, grey when theirs are, disjoint."""
    pub_cfg = config.threat.public_data
    spec = data_spec(pub_cfg, config.seed + 1)
    spec = dataclasses.replace(spec, image_size=config.data.image_size,
                               max_images=min(pub_cfg.max_images or pub_cfg.size, pub_cfg.size))
    pub = load_dataset(spec)
    if data.dataset.grey and not pub.grey:
        pub = FaceDataset(pub.name, to_grey(pub.images), pub.labels, pub.identities, pub.num_classes,
                          True, pub.mean, pub.std, pub.licence)
    assert_disjoint(pub, data.dataset)
    return pub


def stack(data: FederatedData, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
    return data.dataset.images[idx], data.dataset.labels[idx]


__all__ = ["FederatedData", "federated_data", "build_federated_data", "client_sample", "client_seed", "sample_clients",
           "choose_victims", "force_victims", "public_set", "fedavg_steps", "stack", "data_spec"]
