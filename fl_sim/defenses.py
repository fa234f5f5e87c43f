"""Client-side defenses: pure transforms of a client's data and update, applied in order.

A defense may transform the client's training images (`on_data`: mixing, perturbing) and
its update (`on_update`: clipping, noise, pruning). The update a defense sees and returns
is keyed by parameter name, in `named_parameters()` order: the FedSGD gradient or the
FedAvg weight difference w_k - w_t.

They live in the foundation, not in `clients/`, because they are one set of transforms that
the ClientApp applies and that an adaptive attack (which must not import the client) reuses
to model exactly what clients do. Each defense has a typed `Config`; a config's
`defenses: [{name, params}]` builds them through the registry with one-line errors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fl_sim.config import DefenseConfig
from fl_sim.registry import Registry, build_settings


@dataclass
class DefenseContext:
    """What a defense may know about the client's step."""

    algorithm: Literal["fedsgd", "fedavg"]
    server_round: int
    partition_id: int
    seed: int
    local_lr: float
    generator: torch.Generator  # seeded per (seed, round, client): defenses are reproducible


@dataclass
class NoSettings:
    pass


class Defense:
    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoSettings

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def on_data(self, images: torch.Tensor, labels: torch.Tensor,
                ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (N, C, H, W) and labels; returns what the client trains on."""
        return images, labels

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        """The update by parameter name; returns the update the client sends."""
        return update

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


DEFENSES: Registry[type[Defense]] = Registry("defense")
register_defense = DEFENSES.register


# ---------------------------------------------------------------------------------------
# The defenses


@dataclass
class ClipConfig:
    max_norm: float = 1.0  # bound on the L2 norm of the whole update (all parameters together)

    def __post_init__(self) -> None:
        if self.max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {self.max_norm}")


@register_defense("clip")
class ClipUpdate(Defense):
    """Scale the update so its global L2 norm is at most `max_norm` (the clipping step of
    DP-SGD / DP-FedAvg, applied once to the client's whole update)."""

    Config = ClipConfig

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in update.values()]))
        scale = min(1.0, self.config.max_norm / max(float(norm), 1e-12))
        return {k: v * scale for k, v in update.items()}


# ---------------------------------------------------------------------------------------


def build_defenses(configs: Sequence[DefenseConfig]) -> list[Defense]:
    """The configured defenses, in order. An unknown name or a bad setting is a ValueError of
    one line naming `defenses.i...` and what is allowed."""
    out = []
    for i, cfg in enumerate(configs):
        try:
            cls = DEFENSES.get(cfg.name)
        except ValueError as exc:
            raise ValueError(f"defenses.{i}.name: {exc}") from None
        out.append(cls(build_settings(cls.Config, cfg.params, f"defenses.{i}.params")))
    return out


def apply_on_data(defenses: Sequence[Defense], images: torch.Tensor, labels: torch.Tensor,
                  ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
    for d in defenses:
        images, labels = d.on_data(images, labels, ctx)
    return images, labels


def apply_on_update(defenses: Sequence[Defense], update: dict[str, torch.Tensor],
                    ctx: DefenseContext) -> dict[str, torch.Tensor]:
    for d in defenses:
        update = d.on_update(update, ctx)
    return update


__all__ = ["Defense", "DefenseContext", "DEFENSES", "register_defense", "build_defenses",
           "apply_on_data", "apply_on_update", "ClipUpdate"]
