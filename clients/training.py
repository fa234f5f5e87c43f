"""Local training of one client: its round's images, defenses on its data, the FedSGD
gradient or FedAvg local SGD (the math is `fl_sim.training`'s), defenses on its update, the
reply it sends."""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch
from torch import nn

from clients.messages import TrainReply
from fl_sim.defenses import Defense, DefenseContext, apply_on_data, apply_on_update, build_defenses
from fl_sim.config import ExperimentConfig
from fl_sim.federated_data import client_sample, client_seed, federated_data, fedavg_steps, stack
from fl_sim.models import build_model
from fl_sim.training import fedavg_train, fedsgd_gradient


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


@functools.lru_cache(maxsize=4)
def _model(name: str, num_classes: int, thread: int) -> nn.Module:
    """One model per (architecture, thread): threads of one process (bench shards) must not
    load weights into, and train, the same module at once."""
    return build_model(name, num_classes)


_GLOBAL_RNG = threading.Lock()


def _draws_from_global_rng(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


@functools.lru_cache(maxsize=4)
def _layout(model_name: str, num_classes: int, algorithm: str) -> tuple[tuple[str, ...], frozenset[str]]:
    model = build_model(model_name, num_classes)
    params = frozenset(n for n, _ in model.named_parameters()) if algorithm == "fedsgd" else frozenset()
    return tuple(model.state_dict()), params


def state_layout(config: ExperimentConfig) -> tuple[list[str], frozenset[str]]:
    """The global state's array names in order, and which of them a reply carries as
    gradients (FedSGD's parameters); the rest are states."""
    names, gradients = _layout(config.model.name, federated_data(config).num_classes, config.federation.algorithm)
    return list(names), gradients


def local_update(config: ExperimentConfig, partition_id: int, server_round: int,
                 global_state: dict[str, torch.Tensor]) -> TrainReply:
    """The client's whole step for one round, from its data to the reply it sends: the one
    function the ClientApp runs, and the one benchmarks call to build the same updates."""
    fed = config.federation
    data = federated_data(config)
    images, labels = stack(data, client_sample(config, data, partition_id, server_round))
    if len(images) == 0:
        raise ValueError(f"client {partition_id} holds no images")
    defenses = build_defenses(config.defenses)
    seed = client_seed(config, partition_id, server_round)
    ctx = DefenseContext(fed.algorithm, server_round, partition_id, config.seed, fed.local_lr,
                         torch.Generator().manual_seed(seed), num_classes=data.num_classes)
    if any(type(d).on_data is not Defense.on_data for d in defenses):
        ctx.pool_images, ctx.pool_labels = stack(data, data.partitions[partition_id])
    images, labels = apply_on_data(defenses, images, labels, ctx)
    # soft labels (mixing defenses) are not sent: the threat model's labels are hard ones
    sent_labels = labels.tolist() if config.threat.labels_known and labels.dim() == 1 else None
    inputs = data.dataset.normalise(images)

    # Dropout (MobileNetV2's classifier) draws from torch's global generator: seed it per
    # (seed, round, client), so a client's update does not depend on which clients the same
    # process (a Ray actor, the in-process grid) trained before it. Clients in threads of one
    # process (the in-process grid's workers) take turns with such a model.
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):  # building (first call) draws initial weights
        model = _model(config.model.name, data.num_classes, threading.get_ident())
    turns = _GLOBAL_RNG if _draws_from_global_rng(model) else contextlib.nullcontext()
    with single_thread(), turns, torch.random.fork_rng(devices=[]):
        model.load_state_dict(global_state)
        torch.manual_seed(seed)
        ctx.model, ctx.inputs = model, inputs
        if fed.algorithm == "fedsgd":
            grads, loss = fedsgd_gradient(model, inputs, labels, fed.bn_mode)
            grads = apply_on_update(defenses, grads, ctx)
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
            return TrainReply({**grads, **buffers}, len(images), loss, partition_id, 1, sent_labels)

        steps = fedavg_steps(config, len(images))
        loss = fedavg_train(model, inputs, labels, fed.local_lr, steps, fed.batch_size, fed.bn_mode)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if defenses:
            params = [n for n, _ in model.named_parameters()]
            diff = {n: state[n] - global_state[n] for n in params}
            diff = apply_on_update(defenses, diff, ctx)
            state.update({n: global_state[n] + diff[n] for n in params})
        return TrainReply(state, len(images), loss, partition_id, steps, sent_labels)


__all__ = ["local_update", "single_thread", "state_layout"]
