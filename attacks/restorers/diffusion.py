"""`diffusion`: DifFace-style restoration with a DDPM face model (diffusers).

The image is diffused part-way along the model's schedule (x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps, t = strength * T; DifFace starts at step 100 of 250, strength 0.4)
and denoised back to t = 0 with DDIM (eta 0: deterministic given the seeded noise). The
model is a diffusers UNet2DModel (+ its scheduler config) from

- a local directory (a saved DDPMPipeline: `unet/` and `scheduler/`, or a bare UNet
  directory with its config.json), or
- a hub id (for example a CelebA-HQ DDPM) when the user's machine can reach the hub, or
- by default the model `fl-sim restorer train` writes under the asset cache
  (`<FL_SIM_HOME>/restorers/ddpm-faces`), trained offline on public faces.

The model works at its own resolution: the input is resized to it and the result resized
back; `keep_detail` keeps the input's high frequencies when the model is smaller than the
input (off by default: in a raw reconstruction they are mostly noise). Grey inputs come
back grey.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attacks.restorers import BaseRestorer, add_detail, as_rgb, check_batch, is_grey, like_input, luma, \
    register_restorer, resize_to

DEFAULT_NAME = "ddpm-faces"


def default_model_dir() -> Path:
    """Where `fl-sim restorer train` writes its model by default (under the asset cache)."""
    from fl_sim.assets import home

    return home() / "restorers" / DEFAULT_NAME


class DiffusionModelMissing(FileNotFoundError):
    """No diffusion model where the config says; the message says how to get one."""


@dataclass
class DiffusionConfig:
    model: str | None = None  # local diffusers directory or hub id; None: the trained default
    strength: float = 0.4  # start of the reverse process as a share of the schedule
    inference_steps: int = 25  # DDIM steps over the whole schedule (strength * this are run)
    eta: float = 0.0  # DDIM eta (0: deterministic given the noise)
    keep_detail: bool = False  # keep the input's high frequencies above the model's resolution (mostly noise)

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError("diffusion strength must be in (0, 1]")
        if self.inference_steps < 1:
            raise ValueError("diffusion inference_steps must be >= 1")
        if self.eta < 0:
            raise ValueError("diffusion eta must be >= 0")


def _from_pretrained(cls, where: str, subfolder: str | None):
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return cls.from_pretrained(where, **kwargs)


def load_diffusion_model(model: str | Path | None = None, device: str | torch.device = "cpu"):
    """(unet, scheduler config) from a local directory, a hub id, or the trained default."""
    from diffusers import DDIMScheduler, UNet2DModel

    if model is None:
        where = default_model_dir()
        if not (where / "unet").exists():
            raise DiffusionModelMissing(
                f"no diffusion face model at {where}; train one offline with `fl-sim restorer train` "
                "(a few minutes on a CPU), or set restorer_params.model to a local diffusers directory or a "
                "hub id such as google/ddpm-celebahq-256 when this machine can reach the hub")
        model = where
    where = str(model)
    local = Path(where).expanduser()
    if local.exists():
        where = str(local)
        sub = "unet" if (local / "unet").is_dir() else None
        ssub = "scheduler" if (local / "scheduler").is_dir() else None
    else:
        sub, ssub = "unet", "scheduler"
    try:
        try:
            unet = _from_pretrained(UNet2DModel, where, sub)
        except (OSError, EnvironmentError):
            if sub is None:
                raise
            unet = _from_pretrained(UNet2DModel, where, None)
            ssub = None
    except (OSError, EnvironmentError) as exc:
        raise DiffusionModelMissing(
            f"could not load a diffusers UNet2DModel from {model!s} ({str(exc).splitlines()[0]}); give a local "
            "directory saved by diffusers, or train one with `fl-sim restorer train`") from None
    try:
        scheduler_config = dict(_from_pretrained(DDIMScheduler, where, ssub).config)
    except (OSError, EnvironmentError, ValueError):
        scheduler_config = dict(DDIMScheduler().config)
    return unet.eval().requires_grad_(False).to(device), scheduler_config


@register_restorer("diffusion")
class DiffusionRestorer(BaseRestorer):
    Config = DiffusionConfig

    def __init__(self, config=None, public=None, device="cpu", unet=None, scheduler_config=None) -> None:
        super().__init__(config, public, device)
        if unet is None:
            unet, scheduler_config = load_diffusion_model(self.config.model, self.device)
        self.unet = unet.eval().requires_grad_(False).to(self.device)
        self.scheduler_config = scheduler_config or {}
        size = self.unet.config.sample_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.channels = int(self.unet.config.in_channels)

    def _scheduler(self):
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(self.config.inference_steps)
        return sched

    @torch.no_grad()
    def restore(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        check_batch(images)
        cfg = self.config
        grey = is_grey(images)
        x = images.detach().float().clamp(0, 1)
        src = luma(x).expand(-1, 3, -1, -1) if grey else as_rgb(x)
        inp = luma(src) if self.channels == 1 else src
        x0 = resize_to(inp, self.size).clamp(0, 1).to(self.device) * 2 - 1
        sched = self._scheduler()
        steps = sched.timesteps
        run = max(1, min(len(steps), int(round(cfg.inference_steps * cfg.strength))))
        steps = steps[len(steps) - run:]
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        sample = sched.add_noise(x0, noise, steps[:1].repeat(x0.shape[0]))
        step_gen = torch.Generator().manual_seed(int(seed) + 1) if cfg.eta > 0 else None
        for t in steps:
            eps = self.unet(sample, t).sample
            sample = sched.step(eps, t, sample, eta=cfg.eta, generator=step_gen).prev_sample
        out = ((sample.clamp(-1, 1) + 1) / 2).cpu()
        if out.shape[1] == 1:  # a grey model gives grey out, whatever came in
            out, src, grey = out.expand(-1, 3, -1, -1), luma(src).expand(-1, 3, -1, -1), True
        if cfg.keep_detail and images.shape[-1] > self.size[-1]:
            out = add_detail(out, src)
        return like_input(out, images, grey)
