"""`eigenface`: projection onto the principal subspace of the attacker's public faces.

x_hat = mu + U U^T (x - mu), with U the top `components` principal directions of the public
set at the input's size (grey level for grey inputs), from a plain SVD. Deterministic: the
seed is accepted and ignored. (Once the black-box attack's learned eigenfaces exist they can
be plugged in as the basis; until then this is PCA of D_c.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.restorers import BaseRestorer, as_rgb, check_batch, is_grey, like_input, luma, register_restorer, \
    resize_to


@dataclass
class EigenfaceConfig:
    components: int = 64  # at most (public images - 1)
    public_data: str = "synthetic"  # used when no public set is given
    public_size: int = 100
    public_seed: int = 2024

    def __post_init__(self) -> None:
        if self.components < 1:
            raise ValueError("eigenface needs components >= 1")


@register_restorer("eigenface")
class EigenfaceRestorer(BaseRestorer):
    Config = EigenfaceConfig

    def __init__(self, config=None, public=None, device="cpu") -> None:
        super().__init__(config, public, device)
        self._bases: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def basis(self, h: int, w: int, grey: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (D,), components (K, D)) for images of size h x w (grey or RGB)."""
        key = (h, w, grey)
        if key not in self._bases:
            faces = self.public
            if faces is None:
                from attacks.init_search import load_public_faces

                cfg = self.config
                faces = load_public_faces(cfg.public_data, max(h, w), cfg.public_size, cfg.public_seed)
            faces = resize_to(as_rgb(faces.float().clamp(0, 1)), (h, w))
            faces = luma(faces) if grey else faces
            flat = faces.flatten(1).double()
            mean = flat.mean(0)
            k = min(self.config.components, flat.shape[0] - 1, flat.shape[1])
            if k < 1:
                raise ValueError("eigenface needs at least two public faces")
            _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
            self._bases[key] = (mean.float(), vh[:k].float())
        return self._bases[key]

    def restore(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        check_batch(images)
        grey = is_grey(images)
        x = images.detach().float().clamp(0, 1)
        src = luma(x) if grey else as_rgb(x)
        mean, comps = self.basis(x.shape[-2], x.shape[-1], grey)
        flat = src.flatten(1) - mean
        proj = (flat @ comps.T) @ comps + mean
        return like_input(proj.view_as(src), images, grey)
