"""The attack case: everything the honest-but-curious server knows about one client update.

A case is plain data (no Flower): the architecture name, the global weights the server sent,
the update it got back, the training hyper-parameters the threat model says it knows, and
the shape and normalisation of the client's images. The ground truth is never in a case.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

UpdateKind = Literal["gradient", "weight-diff"]
BNMode = Literal["train", "eval"]
_FORMAT = "fl-sim-attack-case/1"


@dataclass
class AttackCase:
    model_name: str  # key of fl_sim.models.MODELS
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) of one image
    weights: dict[str, torch.Tensor]  # global state_dict the server sent (params and buffers)
    update: dict[str, torch.Tensor]  # by parameter name: FedSGD gradient or FedAvg w_k - w_t
    update_kind: UpdateKind
    num_images: int  # images that produced the update (FedSGD batch, FedAvg local data)
    local_lr: float = 0.0  # FedAvg
    local_steps: int = 1  # FedAvg: number of local SGD steps
    local_batch_size: int = 0  # FedAvg minibatch size (0 = full batch)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # model input = (x - mean) / std, x in [0, 1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    labels: torch.Tensor | None = None  # only when the threat model says clients send them
    grey: bool = False  # client images are greyscale replicated to 3 channels
    meta: dict[str, str | int | float] = field(default_factory=dict)  # round, client id, ...
    # How the client's BatchNorm ran: "train" (batch statistics, the default and what a
    # client training normally does) or "eval" (running statistics, a frozen-BN client).
    bn_mode: BNMode = "train"
    # The defenses the clients apply, as configured ({name, params}, in order): public
    # knowledge under the threat model, for adaptive attacks. Empty: none.
    defenses: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if self.update_kind not in ("gradient", "weight-diff"):
            raise ValueError(f"update_kind must be 'gradient' or 'weight-diff', got {self.update_kind!r}")
        if self.bn_mode not in ("train", "eval"):
            raise ValueError(f"bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.update_kind == "weight-diff" and self.local_lr <= 0:
            raise ValueError("a weight-diff case needs the client's local_lr > 0")
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
            if len(self.labels) != self.num_images:
                raise ValueError(f"labels has {len(self.labels)} entries, num_images is {self.num_images}")
        if len(self.mean) != self.image_shape[0] or len(self.std) != self.image_shape[0]:
            raise ValueError(f"mean/std need {self.image_shape[0]} entries (one per channel)")

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # deep-copies tensors, keeps them as tensors
        d["image_shape"] = list(self.image_shape)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["weights"] = {k: v.detach().cpu() for k, v in self.weights.items()}
        d["update"] = {k: v.detach().cpu() for k, v in self.update.items()}
        d["labels"] = None if self.labels is None else self.labels.detach().cpu()
        d["meta"] = dict(self.meta)
        d["defenses"] = [dict(x) for x in self.defenses]
        d["format"] = _FORMAT
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "dict") -> "AttackCase":
        """The inverse of `to_dict` (`where` names the source in the error)."""
        d = dict(d)
        fmt = d.pop("format", None)
        if fmt != _FORMAT:
            raise ValueError(f"{where}: not an attack case file (format {fmt!r}, expected {_FORMAT!r})")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "AttackCase":
        return cls.from_dict(torch.load(Path(path), map_location="cpu", weights_only=True), where=str(path))

    # -- the victim model --------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The global model with the sent weights, in the mode the client trained in."""
        from fl_sim.models import build_model

        model = build_model(self.model_name, self.num_classes)
        model.load_state_dict(self.weights)
        return model.train(self.bn_mode == "train")

    def parameter_names(self, model: nn.Module | None = None) -> list[str]:
        """Names of the updated parameters, in model.named_parameters() order."""
        model = model if model is not None else self.build_model()
        names = [n for n, _ in model.named_parameters() if n in self.update]
        unknown = set(self.update) - set(names)
        if unknown:
            raise ValueError(f"update has entries that are not parameters of {self.model_name}: {sorted(unknown)[:5]}")
        return names

    def describe(self) -> str:
        """A one-paragraph threat-model overview, printed before an attack."""
        kind = ("FedSGD gradient" if self.update_kind == "gradient" else
                f"FedAvg weight difference ({self.local_steps} local steps, lr {self.local_lr}, "
                f"batch {self.local_batch_size or 'full'})")
        labels = "sent by the client" if self.labels is not None else "recovered by the attacker"
        return (f"{self.model_name} ({self.num_classes} classes), {self.num_images} image(s) of shape "
                f"{self.image_shape}{' grey' if self.grey else ''}, {kind}, BatchNorm in {self.bn_mode} mode, "
                f"labels {labels}")
