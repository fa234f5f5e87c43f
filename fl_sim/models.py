"""Model registry: torchvision architectures sized for the task, never downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

from fl_sim.registry import Registry

ModelFactory = Callable[[int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")
register_model = MODELS.register


@register_model("resnet18")
def _resnet18(num_classes: int) -> nn.Module:
    # weights=None: the architecture only; pretrained weights come from a local file if wanted.
    return tvm.resnet18(weights=None, num_classes=num_classes)


@register_model("mobilenet_v2")
def _mobilenet_v2(num_classes: int) -> nn.Module:
    return tvm.mobilenet_v2(weights=None, num_classes=num_classes)


@register_model("lenet")
def _lenet(num_classes: int) -> nn.Module:
    """The small sigmoid CNN of the DLG papers: fast, twice differentiable, easy to invert."""
    return LeNet(num_classes)


class LeNet(nn.Module):
    def __init__(self, num_classes: int, channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
            nn.AdaptiveAvgPool2d(8),
        )
        self.fc = nn.Linear(12 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def build_model(name: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """Build a registered architecture; any input size >= 32 px works (adaptive pooling)."""
    model = MODELS.get(name)(num_classes)
    if weights is not None:
        state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier layer whose gradient reveals labels and penultimate features."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no linear classifier layer")
    return linears[-1]
