"""The DCGAN face generator (z in R^100 -> 64x64 RGB), the offline face prior.

Its weights are the `dcgan-faces` asset; this module holds the architecture they fit.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from fl_sim import assets

LATENT_DIM = 100


class DCGANGenerator(nn.Module):
    """The standard DCGAN generator: four stride-2 transposed convolutions to 64x64."""

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 64, channels: int = 3) -> None:
        super().__init__()
        w = width
        self.latent_dim = latent_dim
        self.main = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, w * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(w * 8), nn.ReLU(True),
            nn.ConvTranspose2d(w * 8, w * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 4), nn.ReLU(True),
            nn.ConvTranspose2d(w * 4, w * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 2), nn.ReLU(True),
            nn.ConvTranspose2d(w * 2, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.ConvTranspose2d(w, channels, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, latent) -> images (N, 3, 64, 64) in [-1, 1]."""
        return self.main(z.view(z.shape[0], -1, 1, 1))


@lru_cache(maxsize=1)
def _cached_state() -> dict[str, torch.Tensor]:
    # The checkpoint is a plain torch pickle holding only `netG_state_dict`.
    ckpt = torch.load(assets.get("dcgan-faces"), map_location="cpu", weights_only=True)
    return ckpt["netG_state_dict"]


def load_face_generator(device: str | torch.device = "cpu") -> DCGANGenerator:
    """The pretrained generator in eval mode (BatchNorm on its running statistics)."""
    gen = DCGANGenerator()
    gen.load_state_dict(_cached_state())
    return gen.eval().requires_grad_(False).to(device)


@torch.no_grad()
def sample_faces(n: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """n faces in [0, 1], (n, 3, 64, 64), the same for the same seed."""
    gen = load_face_generator(device)
    z = torch.randn(n, LATENT_DIM, generator=torch.Generator().manual_seed(seed)).to(device)
    return (gen(z) + 1) / 2
