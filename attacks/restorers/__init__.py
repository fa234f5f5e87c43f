"""Face restorers: the prior DFLeak's residual facial optimisation pulls reconstructions towards.

One protocol: `restore(images, seed) -> images`, a batch (N, C, H, W) in [0, 1] in, a batch
of the same shape and range out, the same output for the same seed. A grey batch (C = 1, or
three equal channels) comes back grey in the same layout.

Registered restorers (`build_restorer(name, public=..., **params)`):

- `gan-prior`: projection onto the DCGAN face generator's output (latent optimisation with a
  pixel and a perceptual term, a few restarts). The offline default.
- `diffusion`: DifFace-style: noise part-way along a DDPM schedule, denoise with DDIM; the
  UNet comes from a local diffusers directory, a hub id, or (offline default) the model
  `fl-sim restorer train` writes.
- `eigenface`: projection onto the principal subspace of the attacker's public faces.
- `artefact-net`: a small UNet that removes gradient inversion's own artefacts, trained by the
  attacker on its own attacks of its public faces (`fl-sim restorer train-artefact CONFIG`);
  it cleans the reconstruction instead of replacing it with a face of the prior's.
- `none`: identity.

Each restorer has a typed `Config` (dataclass); an unknown setting is a ValueError naming the
allowed ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from fl_sim.registry import Registry, build_settings, setting_defaults

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as fl_sim.data.to_grey


@runtime_checkable
class Restorer(Protocol):
    def restore(self, images: torch.Tensor, seed: int) -> torch.Tensor: ...


class BaseRestorer:
    """Common plumbing: a typed config, the attacker's public faces, a device."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any | None = None, public: torch.Tensor | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.config = config if config is not None else self.Config()
        self.public = public
        self.device = torch.device(device)

    def restore(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def restore_many(self, images: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        """One restoration per seed (a restorer may batch them; each equals restore(images, s)
        up to floating-point reassociation)."""
        return [self.restore(images, s) for s in seeds]

    def restore_groups(self, groups: list[tuple[torch.Tensor, list[int]]]) -> list[list[torch.Tensor]]:
        """`restore_many` of several (images, seeds) groups, e.g. the victims of one batched
        attack that reach a restoration event together; a restorer may fit them as one batch.
        Each group's result equals its own `restore_many` up to floating-point reassociation."""
        return [self.restore_many(images, seeds) for images, seeds in groups]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


RESTORERS: Registry[type[BaseRestorer]] = Registry(
    "restorer", builtin=("attacks.restorers.gan_prior", "attacks.restorers.diffusion", "attacks.restorers.eigenface",
             "attacks.restorers.artefact"))
register_restorer = RESTORERS.register


def restorer_names() -> list[str]:
    return RESTORERS.names()


def restorer_fields(name: str) -> dict[str, Any]:
    return setting_defaults(RESTORERS.get(name).Config)


def build_restorer(name: str, public: torch.Tensor | None = None, device: str | torch.device = "cpu",
                   **params: Any) -> BaseRestorer:
    """A restorer by name with some settings overridden; `public` is the attacker's public
    face set (N, C, H, W) in [0, 1] for restorers that learn from it."""
    cls = RESTORERS.get(name)
    return cls(build_settings(cls.Config, params, f"restorer {name!r}"), public=public, device=device)


# --------------------------------------------------------------------------------------------
# Helpers shared by the restorers
# --------------------------------------------------------------------------------------------
def is_grey(images: torch.Tensor, atol: float = 1e-6) -> bool:
    """One channel, or three equal channels."""
    if images.shape[1] == 1:
        return True
    return images.shape[1] == 3 and bool(
        torch.allclose(images[:, 0], images[:, 1], atol=atol) and torch.allclose(images[:, 1], images[:, 2], atol=atol))


def luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W): the grey level of an RGB (or already single-channel) batch."""
    if images.shape[1] == 1:
        return images
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    down = images.shape[-1] > size[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=down)


def like_input(out: torch.Tensor, images: torch.Tensor, grey: bool) -> torch.Tensor:
    """Bring a restored batch back to the input's layout: size, channels, grey, [0, 1]."""
    out = resize_to(out, tuple(images.shape[-2:]))
    if grey:
        out = luma(out)
        out = out.expand(-1, images.shape[1], -1, -1)
    elif out.shape[1] != images.shape[1]:
        out = out.mean(1, keepdim=True).expand(-1, images.shape[1], -1, -1)
    return out.clamp(0, 1).to(images.dtype).contiguous()


def add_detail(restored_low: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Restored low-resolution content plus the input's own high frequencies: when the prior
    works below the case's resolution, up(restored) + (x - up(down(x)))."""
    size = tuple(images.shape[-2:])
    low = tuple(restored_low.shape[-2:])
    if low == size:
        return restored_low
    detail = images - resize_to(resize_to(images, low), size)
    return resize_to(restored_low, size) + detail


def check_batch(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"a restorer takes images (N, 1 or 3, H, W); got shape {tuple(images.shape)}")


# --------------------------------------------------------------------------------------------
# none
# --------------------------------------------------------------------------------------------
@dataclass
class NoneConfig:
    """The identity: no prior (residual optimisation becomes a no-op)."""


@register_restorer("none")
class NoRestorer(BaseRestorer):
    Config = NoneConfig

    def restore(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        check_batch(images)
        return images.clone()


__all__ = ["Restorer", "BaseRestorer", "RESTORERS", "register_restorer", "build_restorer", "restorer_names",
           "restorer_fields", "is_grey", "luma", "as_rgb", "resize_to", "like_input", "add_detail"]
