"""One way to build an attack case: what the curious server knows of a victim's update.

The federation (the strategy's observer), `fl-sim bench dfleak` and any other benchmark get
their cases here, from the same two pieces:

- the client's reply, which only `clients.training.local_update` produces (the function the
  ClientApp runs, defenses included), and
- `make_case`, which turns a reply into an `AttackCase` with exactly what the threat model
  lets the server know.

`simulate_victims` runs both without Flower for a round whose global model is known (round
1: the model the server initialises); a test checks its cases equal a real federation's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from attacks.case import AttackCase
from clients.messages import TrainReply
from clients.training import local_update
from fl_sim.config import ExperimentConfig
from server.bn_statistics import PublicStatistics, server_statistics
from fl_sim.federated_data import FederatedData, client_sample, federated_data, stack
from fl_sim.models import build_model
from server.attack_runner import Victim


def initial_global_state(config: ExperimentConfig, data: FederatedData,
                         statistics: PublicStatistics | None = None) -> dict[str, torch.Tensor]:
    """The global model the server starts from (seeded: the same in every process).

    `statistics`: the server's BatchNorm re-estimation when the caller has built it already
    (the federation shares one with its strategy); otherwise built here from the config."""
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, data.num_classes, config.model.weights)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if statistics is None:
        statistics = server_statistics(config, data)
    return statistics(state) if statistics is not None else state


def parameter_names(config: ExperimentConfig, data: FederatedData) -> list[str]:
    return [n for n, _ in build_model(config.model.name, data.num_classes).named_parameters()]


def make_case(config: ExperimentConfig, data: FederatedData, server_round: int, reply: TrainReply,
              global_state: dict[str, torch.Tensor], param_names: Sequence[str]) -> AttackCase:
    """What the server knows of one client's update, and nothing more (no ground truth)."""
    fed = config.federation
    if fed.algorithm == "fedsgd":
        update = {n: reply.arrays[n] for n in param_names}
        kind = "gradient"
    else:
        update = {n: reply.arrays[n] - global_state[n] for n in param_names}
        kind = "weight-diff"
    labels = None
    if config.threat.labels_known and reply.labels is not None:
        labels = torch.tensor(reply.labels, dtype=torch.long)
    ds = data.dataset
    return AttackCase(
        model_name=config.model.name, num_classes=data.num_classes, image_shape=data.image_shape,
        weights=global_state, update=update, update_kind=kind, num_images=reply.num_examples,
        local_lr=fed.local_lr, local_steps=reply.local_steps,
        local_batch_size=fed.batch_size if fed.algorithm == "fedavg" else 0,
        mean=ds.mean, std=ds.std, labels=labels, grey=ds.grey,
        meta={"round": server_round, "client": reply.partition_id, "dataset": ds.name,
              "defenses": ",".join(d.name for d in config.defenses)},
        bn_mode=fed.bn_mode, defenses=[d.model_dump(mode="json") for d in config.defenses],
    )


def identity_gallery(config: ExperimentConfig, data: FederatedData):
    """The critic's view of every identity in the clients' data set, for rank-1
    re-identification of reconstructions; None without a critic, attacks or identities."""
    from fl_sim.metrics import IdentityGallery

    ds = data.dataset
    if not config.metrics.id_backend or not config.attacks or not bool((ds.identities >= 0).any()):
        return None
    return IdentityGallery.of(ds.images, ds.identities, config.metrics.id_backend)


def simulate_victims(config: ExperimentConfig, partition_ids: Sequence[int], server_round: int = 1,
                     global_state: dict[str, torch.Tensor] | None = None) -> list[Victim]:
    """The victims' cases (and truth) the server would attack in `server_round`, without Flower.

    The global model is the server's initial one unless `global_state` is given; for a later
    round of a real federation, run it with `threat.save_cases: true` instead.
    """
    data = federated_data(config)
    if global_state is None:
        if server_round != 1:
            raise ValueError(f"round {server_round}: only round 1's global model is known without running "
                             "the federation; run `fl-sim run` with threat.save_cases: true for later rounds")
        global_state = initial_global_state(config, data)
    names = parameter_names(config, data)
    victims = []
    for pid in partition_ids:
        if not 0 <= pid < len(data.partitions) or len(data.partitions[pid]) == 0:
            raise ValueError(f"victim {pid} holds no images (clients 0..{len(data.partitions) - 1})")
        reply = local_update(config, pid, server_round, global_state)
        case = make_case(config, data, server_round, reply, global_state, names)
        index = client_sample(config, data, pid, server_round)
        victims.append(Victim(server_round, pid, case, *stack(data, index), truth_index=index))
    return victims


__all__ = ["initial_global_state", "make_case", "simulate_victims", "parameter_names",
           "identity_gallery"]
