"""The client's training step as plain functions on a module: what every client computes
(clients/training.py), what `attacks.synthetic.make_case` computes for a case built from
known images, and what the attacker's simulation (attacks/engine.py `VictimModel`) models.

BatchNorm in the configured mode (train: batch statistics; eval: frozen running
statistics), mean cross-entropy, the update keyed by parameter name in `named_parameters()`
order; FedAvg step s uses images (s * b + j) mod n, plain SGD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of `model` (1d, 2d, 3d, sync), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_mode(model: nn.Module, bn_mode: str = "train") -> nn.Module:
    """model.train(), with BatchNorm frozen on its running statistics when bn_mode is "eval"."""
    model.train()
    if bn_mode == "eval":
        for m in batchnorm_layers(model):
            m.eval()
    return model


def calibrate_batchnorm(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Every BatchNorm layer's running statistics set to the mean and (unbiased) variance of
    its input over all of `inputs`, in one batch (a few hundred faces: a chunked pass would
    average the chunks' statistics, not the images'); the weights are untouched. Under no_grad
    the peak is a few layers' activations: measured 78 MB above the process for ResNet18 and
    104 MB for MobileNetV2 on the demo's 100 public faces at 64 px."""
    layers = batchnorm_layers(model)
    momenta = [m.momentum for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # only BatchNorm in train mode: dropout would draw from the global generator
    for m in layers:
        m.reset_running_stats()
        m.momentum = 1.0  # the running statistics become this batch's
        m.train()
    with torch.no_grad():
        model(inputs)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    for m, training in modes:  # each module's own mode back (a client's may be mixed: bn_mode eval)
        m.training = training
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


def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 128) -> tuple[float, float]:
    """Accuracy and mean cross-entropy in eval mode (BatchNorm on running statistics);
    NaN for an empty set."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            out = model(inputs[i:i + batch])
            y = labels[i:i + batch]
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
    return correct / len(labels), loss / len(labels)


__all__ = ["train_mode", "fedsgd_gradient", "fedavg_train", "evaluate"]
