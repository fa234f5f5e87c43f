"""What every attack returns, how it reports progress and how it is stopped."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from attacks.case import AttackCase


@dataclass
class AttackResult:
    """One attack run. Typed fields only: code reads these, never string-keyed extras."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1], the case's image shape
    labels: torch.Tensor  # (N,) the labels the attack used (recovered or given)
    loss_history: list[float]  # one objective value per iteration (of the kept restart)
    iterations: int  # iterations actually run, all restarts together
    seconds: float  # wall time of the attack
    final_loss: float  # the attack's objective evaluated on `images` exactly as returned
    interrupted: bool = False  # stopped by the stop flag before the budget was spent
    it_per_s: float = 0.0  # iterations (all restarts) per wall second
    # Alternative outputs of the same run, by a short name, for studies (DFLeak: the image each
    # other `select` policy would have returned). Same shape and range as `images`.
    variants: dict[str, torch.Tensor] = field(default_factory=dict)
    # Attack-specific numbers for the reader (logs, reports); no code branches on these keys.
    diagnostics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Progress(Protocol):
    def on_iteration(self, it: int, total: int, loss: float) -> None: ...


@runtime_checkable
class StopFlag(Protocol):
    """Anything with is_set(), e.g. threading.Event: checked once per iteration."""

    def is_set(self) -> bool: ...


class CallbackProgress:
    """Adapts a plain function `f(it, total, loss)` to the Progress protocol."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_iteration(self, it: int, total: int, loss: float) -> None:
        self.fn(it, total, loss)


class Attack:
    """Base of every attack: a typed config of hyper-parameters and `run`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def run(self, case: "AttackCase", progress: Progress | None = None, stop: StopFlag | None = None,
            device: str | torch.device = "cpu") -> AttackResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def report(progress: Progress | None, it: int, total: int, loss: float) -> None:
    if progress is None:
        return
    if callable(progress) and not hasattr(progress, "on_iteration"):
        progress(it, total, loss)
    else:
        progress.on_iteration(it, total, loss)


def stopped(stop: StopFlag | None) -> bool:
    return stop is not None and stop.is_set()
