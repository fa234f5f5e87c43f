"""The global model's BatchNorm statistics estimated by the server on its public faces
(`federation.bn_statistics: public`).

Clients that train at batch size 1 run BatchNorm on the global model's running statistics
(`bn_mode: eval`) and so never move them. Left at their start-up values (mean 0, variance 1)
the network is not normalised and barely learns (ORL, ResNet18, FedSGD, 10 clients a round,
server lr 0.1: test loss 3.66-3.69 in rounds 21-30, chance being ln 40 = 3.69); estimated
once and then frozen, SGD diverges within a few steps as the weights move away from them.
The server holds public faces of its own (the attacker's public set: `threat.public_data`),
so it re-estimates the statistics on them for the start model and after every round: the
same federation then learns (test loss 3.14-3.51 in rounds 21-30, 50 % accuracy by round
100), from nothing but what the server already has.
"""
from __future__ import annotations

import torch

from fl_sim.config import ExperimentConfig
from fl_sim.federated_data import FederatedData, public_set
from fl_sim.models import build_model
from fl_sim.training import calibrate_batchnorm


class PublicStatistics:
    """state -> the same state with every BatchNorm layer's statistics re-estimated on the
    server's public faces (normalised as the clients normalise theirs)."""

    def __init__(self, config: ExperimentConfig, data: FederatedData) -> None:
        self.inputs = data.dataset.normalise(public_set(config, data).images)
        self.model = build_model(config.model.name, data.num_classes)

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.model.load_state_dict(state)
        calibrate_batchnorm(self.model, self.inputs)
        buffers = {n: b.detach().clone().to(state[n].dtype) for n, b in self.model.named_buffers()}
        return {**state, **buffers}


def server_statistics(config: ExperimentConfig, data: FederatedData) -> PublicStatistics | None:
    """The server's re-estimation for this config, or None when the clients' statistics stand."""
    return PublicStatistics(config, data) if config.federation.bn_statistics == "public" else None


__all__ = ["PublicStatistics", "server_statistics"]
