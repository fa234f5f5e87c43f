"""The client-side defense hook: a registry of defenses a client applies before replying.

A defense may transform the client's training data (`on_data`, e.g. mixing or
perturbing images) and its update (`on_update`, e.g. clipping, noise, pruning), in the
order the config lists them. The update a defense sees and returns is keyed by parameter
name, in `named_parameters()` order: the FedSGD gradient or the FedAvg weight difference
w_k - w_t. Defenses are plain classes registered by name; a later issue fills the registry
(modules in BUILTIN_MODULES are imported when present).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, TypeVar

import torch

from fl_sim.config import DefenseConfig


@dataclass
class DefenseContext:
    """What a defense may know about the client's step."""

    algorithm: Literal["fedsgd", "fedavg"]
    server_round: int
    partition_id: int
    seed: int
    local_lr: float
    generator: torch.Generator  # seeded per (seed, round, client): defenses are reproducible


class Defense:
    name: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

    def on_data(self, images: torch.Tensor, labels: torch.Tensor,
                ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (N, C, H, W) and labels; returns what the client trains on."""
        return images, labels

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        """The update by parameter name; returns the update the client sends."""
        return update


D = TypeVar("D", bound=type[Defense])
DEFENSES: dict[str, type[Defense]] = {}
BUILTIN_MODULES = ("clients.defense_library",)


def register_defense(name: str) -> Callable[[D], D]:
    def wrap(cls: D) -> D:
        if name in DEFENSES and DEFENSES[name] is not cls:
            raise ValueError(f"defense {name!r} is registered twice")
        cls.name = name
        DEFENSES[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def build_defenses(configs: list[DefenseConfig]) -> list[Defense]:
    """The configured defenses, in order; an unknown name is a ValueError naming the choices."""
    if not configs:
        return []
    _load_builtin()
    out = []
    for cfg in configs:
        if cfg.name not in DEFENSES:
            allowed = ", ".join(sorted(DEFENSES)) or "none registered yet"
            raise ValueError(f"unknown defense {cfg.name!r}; allowed: {allowed}")
        out.append(DEFENSES[cfg.name](**cfg.params))
    return out


def apply_on_data(defenses: list[Defense], images: torch.Tensor, labels: torch.Tensor,
                  ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
    for d in defenses:
        images, labels = d.on_data(images, labels, ctx)
    return images, labels


def apply_on_update(defenses: list[Defense], update: dict[str, torch.Tensor],
                    ctx: DefenseContext) -> dict[str, torch.Tensor]:
    for d in defenses:
        update = d.on_update(update, ctx)
    return update


__all__ = ["Defense", "DefenseContext", "DEFENSES", "register_defense", "build_defenses",
           "apply_on_data", "apply_on_update"]
