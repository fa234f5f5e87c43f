"""Local training of one client: the FedSGD gradient or FedAvg local SGD, then defenses.

Computed exactly as the attacker models it (attacks/engine.py `VictimModel`): BatchNorm in
the configured mode (train: batch statistics; eval: frozen running statistics), mean cross-entropy, the update keyed by parameter name in
`named_parameters()` order; FedAvg step s uses images (s * b + j) mod n, plain SGD.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clients.defenses import DefenseContext, apply_on_data, apply_on_update, build_defenses
from fl_sim.config import ExperimentConfig
from fl_sim.federated_data import client_sample, federated_data, fedavg_steps, stack
from fl_sim.models import build_model


@dataclass
class ClientUpdate:
    """What a client sends back (and, for the simulation's own checks, what it used)."""

    arrays: dict[str, torch.Tensor]  # FedSGD: gradients + BN buffers; FedAvg: the new state_dict
    num_examples: int
    train_loss: float
    local_steps: int
    labels: list[int] = field(default_factory=list)  # the labels it trained on


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """`torch.set_num_threads(1)` for the client's work, restored after (clients simulated
    in the server's process must not leave the server single-threaded)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.lru_cache(maxsize=2)
def _model(name: str, num_classes: int) -> nn.Module:
    return build_model(name, num_classes)


def train_mode(model: nn.Module, bn_mode: str = "train") -> nn.Module:
    """model.train(), with BatchNorm frozen on its running statistics when bn_mode is "eval"."""
    model.train()
    if bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def fedsgd_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    bn_mode: str = "train") -> tuple[dict[str, torch.Tensor], float]:
    """One gradient of the mean cross-entropy at the current weights."""
    train_mode(model, bn_mode)
    named = list(model.named_parameters())
    loss = F.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {n: g.detach().clone() for (n, _), g in zip(named, grads)}, float(loss.detach())


def fedavg_train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, lr: float, steps: int,
                 batch_size: int, bn_mode: str = "train") -> float:
    """`steps` plain SGD steps; step s on images (s * b + j) mod n. Returns the mean loss."""
    train_mode(model, bn_mode)
    n = len(inputs)
    b = batch_size if 0 < batch_size < n else n
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    total = 0.0
    for s in range(steps):
        idx = [(s * b + j) % n for j in range(b)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[idx]), labels[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / max(steps, 1)


def local_update(config: ExperimentConfig, partition_id: int, server_round: int,
                 global_state: dict[str, torch.Tensor]) -> ClientUpdate:
    """The client's whole step for one round, from its data to the update it sends."""
    fed = config.federation
    data = federated_data(config)
    images, labels = stack(data, client_sample(config, data, partition_id, server_round))
    if len(images) == 0:
        raise ValueError(f"client {partition_id} holds no images")
    defenses = build_defenses(config.defenses)
    ctx = DefenseContext(fed.algorithm, server_round, partition_id, config.seed, fed.local_lr,
                         torch.Generator().manual_seed(hash((config.seed, server_round, partition_id)) % 2**63))
    images, labels = apply_on_data(defenses, images, labels, ctx)
    inputs = data.dataset.normalise(images)

    with single_thread():
        model = _model(config.model.name, data.num_classes)
        model.load_state_dict(global_state)
        if fed.algorithm == "fedsgd":
            grads, loss = fedsgd_gradient(model, inputs, labels, fed.bn_mode)
            grads = apply_on_update(defenses, grads, ctx)
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
            return ClientUpdate({**grads, **buffers}, len(images), loss, 1, labels.tolist())

        steps = fedavg_steps(config, len(images))
        loss = fedavg_train(model, inputs, labels, fed.local_lr, steps, fed.batch_size, fed.bn_mode)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if defenses:
            params = [n for n, _ in model.named_parameters()]
            diff = {n: state[n] - global_state[n] for n in params}
            diff = apply_on_update(defenses, diff, ctx)
            state.update({n: global_state[n] + diff[n] for n in params})
        return ClientUpdate(state, len(images), loss, steps, labels.tolist())


__all__ = ["ClientUpdate", "local_update", "fedsgd_gradient", "fedavg_train", "single_thread"]
