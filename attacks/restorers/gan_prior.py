"""`gan-prior`: project an image onto the DCGAN face generator's output.

The offline stand-in for the paper's face-restoration networks (DifFace, CodeFormer): the
restored image is G(z*) with z* = argmin_z  pixel * MSE(G(z), x) + perceptual * LPIPS(G(z), x)
+ latent * mean(z^2), found by Adam from the best few of a seeded pool of random latents.

The generator works at 64 px: the input is resized to 64 px for the fit and the projection
resized back. `keep_detail` adds the input's own high frequencies back above 64 px; it is off
by default because the high frequencies of a raw reconstruction are mostly optimisation
noise (DFLeak at 112 px, ORL, client 0: LPIPS 0.92 with it, 0.55 without; InvertG 0.60). Grey inputs are fitted on the grey level of
G(z) and come back grey.

`tune_steps` > 0 adds pivotal tuning (Roich et al., PTI, 2022): with the fitted latent held
fixed as the pivot, a copy of the generator's weights is fitted to the image by the same loss
for that many Adam steps. A latent alone reaches only the faces the generator can draw, a
look-alike; the tuned weights move the output towards the person in the image while the
network's structure keeps it a face (the GAN-prior form of GIAS's weight fitting, which fits
to the gradient instead of the image). It restores a face under Gaussian noise (23 -> 27 dB
where the latent alone gives 21), but inside DFLeak it fits gradient inversion's blotches as
well (ORL development victims: -1.9 dB and less of the person than the artefact-net;
docs/measurements.md), so it is off by default.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from attacks.restorers import BaseRestorer, add_detail, as_rgb, check_batch, is_grey, like_input, luma, \
    register_restorer, resize_to


@dataclass
class GanPriorConfig:
    steps: int = 100  # Adam steps of the latent fit
    restarts: int = 2  # latents optimised per image (the best fit is kept)
    candidates: int = 64  # random latents scored to pick the restarts' starts
    lr: float = 0.05
    pixel: float = 1.0  # weight of the MSE in [0, 1] pixel units
    perceptual: float = 0.01  # weight of LPIPS (AlexNet); larger fits the noise texture of raw reconstructions
    latent: float = 1e-3  # weight of mean(z^2): keeps z where the generator was trained
    keep_detail: bool = False  # above 64 px add the input's high frequencies back (see above)
    tune_steps: int = 0  # pivotal tuning: Adam steps on a copy of the generator's weights (0: off)
    tune_lr: float = 3e-4  # PTI's learning rate

    def __post_init__(self) -> None:
        if self.steps < 0 or self.restarts < 1 or self.candidates < self.restarts or self.tune_steps < 0:
            raise ValueError("gan-prior needs steps >= 0, restarts >= 1, candidates >= restarts, tune_steps >= 0")
        if min(self.lr, self.pixel, self.perceptual, self.latent) < 0 or self.lr == 0 or self.tune_lr <= 0:
            raise ValueError("gan-prior weights must be >= 0, lr > 0 and tune_lr > 0")


@register_restorer("gan-prior")
class GanPriorRestorer(BaseRestorer):
    Config = GanPriorConfig
    SIZE = 64

    def __init__(self, config=None, public=None, device="cpu") -> None:
        super().__init__(config, public, device)
        from fl_sim.generator import load_face_generator

        self.generator = load_face_generator(self.device)
        self.latent_dim = self.generator.latent_dim
        self._lpips = None
        if self.config.perceptual > 0:
            from fl_sim.metrics import _lpips_model

            self._lpips = _lpips_model().to(self.device)

    # -- the fit ---------------------------------------------------------------------------
    def _render(self, z: torch.Tensor, grey: bool, generator: nn.Module | None = None) -> torch.Tensor:
        out = ((self.generator if generator is None else generator)(z) + 1) / 2
        return luma(out).expand(-1, 3, -1, -1) if grey else out

    def _losses(self, fake: torch.Tensor, target: torch.Tensor, z: torch.Tensor, perceptual: bool) -> torch.Tensor:
        cfg = self.config
        loss = cfg.pixel * (fake - target).pow(2).flatten(1).mean(1)
        if perceptual and self._lpips is not None:
            loss = loss + cfg.perceptual * self._lpips(fake * 2 - 1, target * 2 - 1).flatten()
        if cfg.latent > 0:
            loss = loss + cfg.latent * z.pow(2).mean(1)
        return loss

    def _project(self, target: torch.Tensor, seeds: list[int], grey: bool) -> torch.Tensor:
        """target (M, 3, 64, 64) in [0, 1], one seed per row -> G(z*) (M, 3, 64, 64)."""
        cfg = self.config
        m = target.shape[0]
        starts = []
        with torch.no_grad():
            for i in range(m):
                g = torch.Generator().manual_seed(int(seeds[i]))
                pool = torch.randn(cfg.candidates, self.latent_dim, generator=g).to(self.device)
                scores = torch.cat([self._losses(self._render(chunk, grey), target[i:i + 1].expand(len(chunk), -1, -1, -1),
                                                 chunk, perceptual=False) for chunk in pool.split(64)])
                starts.append(pool[torch.argsort(scores, stable=True)[: cfg.restarts]])
        z = torch.cat(starts).clone().requires_grad_(True)  # (M * R, d), row i*R + r
        tgt = target.repeat_interleave(cfg.restarts, dim=0)
        opt = torch.optim.Adam([z], lr=cfg.lr)
        for _ in range(cfg.steps):
            loss = self._losses(self._render(z, grey), tgt, z, perceptual=True).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            fake = self._render(z, grey)
            final = self._losses(fake, tgt, z, perceptual=True).view(m, cfg.restarts)
            best = final.argmin(1)
            fake = fake.view(m, cfg.restarts, *fake.shape[1:])[torch.arange(m), best]
            pivots = z.detach().view(m, cfg.restarts, -1)[torch.arange(m), best]
        if cfg.tune_steps == 0:
            return fake
        return torch.cat([self._tune(pivots[i:i + 1], target[i:i + 1], grey) for i in range(m)])

    def _tune(self, pivot: torch.Tensor, target: torch.Tensor, grey: bool) -> torch.Tensor:
        """Pivotal tuning of one image: its own copy of the generator, fitted with the latent
        fixed. One row at a time because every row has its own weights."""
        cfg = self.config
        generator = copy.deepcopy(self.generator).requires_grad_(True)  # eval mode: BatchNorm stays fixed
        opt = torch.optim.Adam(generator.parameters(), lr=cfg.tune_lr)
        for _ in range(cfg.tune_steps):
            loss = self._losses(self._render(pivot, grey, generator), target, pivot, perceptual=True).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return self._render(pivot, grey, generator)

    # -- the protocol ----------------------------------------------------------------------
    def restore(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        return self.restore_many(images, [seed])[0]

    def restore_many(self, images: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        """All seeds in one batched fit (each row's fit is independent of the others)."""
        return self.restore_groups([(images, seeds)])[0]

    def restore_groups(self, groups: list[tuple[torch.Tensor, list[int]]]) -> list[list[torch.Tensor]]:
        """Every group's seeds in one batched fit: a row's latent pool comes from its own seed
        (its group's seed and its index in the group), so a group fitted beside others gets
        what it gets alone, up to the batch's floating-point reassociation."""
        prepared = []  # per group: (images, seeds, grey, src, fit targets, their row seeds)
        for images, seeds in groups:
            check_batch(images)
            grey = is_grey(images)
            x = images.detach().to(self.device, torch.float32).clamp(0, 1)
            src = luma(x).expand(-1, 3, -1, -1) if grey else as_rgb(x)
            target = resize_to(src, (self.SIZE, self.SIZE)).clamp(0, 1).repeat(len(seeds), 1, 1, 1)
            rows = [s * 1_000_003 + i for s in seeds for i in range(images.shape[0])]
            prepared.append((images, seeds, grey, src, target, rows))
        # Grey and colour groups render differently: fit each kind as its own batch.
        fits: dict[int, torch.Tensor] = {}
        for grey in (False, True):
            which = [k for k, p in enumerate(prepared) if p[2] == grey]
            if not which:
                continue
            with torch.enable_grad():
                fake = self._project(torch.cat([prepared[k][4] for k in which]),
                                     [r for k in which for r in prepared[k][5]], grey).detach()
            fits.update(zip(which, fake.split([len(prepared[k][4]) for k in which])))
        out: list[list[torch.Tensor]] = []
        for k, (images, seeds, grey, src, _, _) in enumerate(prepared):
            n = images.shape[0]
            group = []
            for j in range(len(seeds)):
                one = fits[k][j * n:(j + 1) * n]
                if self.config.keep_detail and images.shape[-1] > self.SIZE:
                    one = add_detail(one, src)
                group.append(like_input(one, images, grey).to(images.device))
            out.append(group)
        return out
