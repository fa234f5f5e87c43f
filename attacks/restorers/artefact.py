"""`artefact-net`: a restoration network that removes what gradient inversion leaves behind.

The GAN and diffusion priors replace a reconstruction with the nearest face *they* can draw,
which on ORL is a look-alike, not the victim. This restorer only undoes the attack's own
artefacts: a small convolutional network (a three-level UNet predicting a residual) that the
attacker trains offline, on its own public faces, to map the images *its own attack* returns
for those faces back to the faces (`fl-sim restorer train-artefact`,
`server/artefact_training.py`: it needs the server's case pipeline). Being local and residual, it keeps what the gradient has recovered (the
pose, the glasses, the shape of the face) and removes the grain and the colour noise.

Weights. The network is trained for one model and resolution (the ones its training config
attacks); being fully convolutional it runs at any size, and a one-channel network restores a
colour image channel by channel. `model: null` loads the weights that ship with the project
(`attacks/restorers/weights/artefact-net.pt`, 2 MB, sha256 in `SHIPPED_SHA256`), trained by

    fl-sim restorer train-artefact configs/bench/dfleak.yaml

(ResNet18 at its seeded start, ORL's grey 64 px normalisation, BatchNorm frozen; 64 DCGAN
faces of seed 4242 attacked for 600 iterations; 18 min of attacks and 6 min of training on 2
cores; the same command reproduces them up to floating-point differences between CPUs).
A Flower app bundle carries text files only: under `flwr run` the bundle's copy of this
package has no weights, and the shipped file is read from the installed project instead.
For another model or resolution, train your own (it writes `<FL_SIM_HOME>/restorers/
artefact-net/restorer.pt`) and set `restorer_params.model` to it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attacks.restorers import BaseRestorer, check_batch, is_grey, like_input, luma, register_restorer

DEFAULT_NAME = "artefact-net"
WEIGHTS = "restorer.pt"
SHIPPED = Path(__file__).resolve().parent / "weights" / "artefact-net.pt"
SHIPPED_SHA256 = "58a9f24d8aa876115f0e1887e031c40786906f585c5b5be37851befb063f10e2"


def installed_copy(relative: str) -> Path | None:
    """`relative` (a path inside the project) in the installed fl-sim distribution: its
    source folder for an editable install, site-packages otherwise; None when fl-sim is not
    installed. Flower's app bundle carries text files only, so a ServerApp running from the
    bundle finds the shipped weights here."""
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        dist = metadata.distribution("fl-sim")
    except metadata.PackageNotFoundError:
        return None
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file:"):
        return Path(unquote(urlparse(direct["url"]).path)) / relative
    return Path(str(dist.locate_file(relative)))


def shipped_weights() -> Path:
    """The shipped network's file: beside this module, or (under `flwr run`, whose bundle
    has no binary files) in the installed project."""
    if SHIPPED.exists():
        return SHIPPED
    other = installed_copy("attacks/restorers/weights/artefact-net.pt")
    return other if other is not None and other.exists() else SHIPPED


def default_model_dir() -> Path:
    from fl_sim.assets import home

    return home() / "restorers" / DEFAULT_NAME


class ArtefactModelMissing(FileNotFoundError):
    """No trained restoration network where the config says; the message says how to get one."""


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GELU(), nn.Conv2d(cout, cout, 3, 1, 1), nn.GELU())


class RestorationNet(nn.Module):
    """A three-level UNet (width w, 2w, 4w) that adds a predicted residual to its input.

    Written here rather than taken from diffusers: its UNet2DModel needs a timestep and a
    noise schedule, which a one-shot restoration network has no use for.
    """

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.channels, self.width = channels, width
        w = width
        self.enc1 = _block(channels, w)
        self.enc2 = _block(w, 2 * w, stride=2)
        self.enc3 = _block(2 * w, 4 * w, stride=2)
        self.up3 = nn.Conv2d(4 * w, 2 * w, 3, 1, 1)
        self.dec2 = _block(4 * w, 2 * w)
        self.up2 = nn.Conv2d(2 * w, w, 3, 1, 1)
        self.dec1 = _block(2 * w, w)
        self.out = nn.Conv2d(w, channels, 3, 1, 1)
        nn.init.zeros_(self.out.weight)  # starts as the identity: the input is a fair first guess
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4  # two stride-2 levels need sides divisible by 4
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        e1 = self.enc1(xp)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up3(F.interpolate(e3, scale_factor=2.0, mode="nearest")), e2], 1))
        d1 = self.dec1(torch.cat([self.up2(F.interpolate(d2, scale_factor=2.0, mode="nearest")), e1], 1))
        return (xp + self.out(d1))[..., :h, :w]


def save_network(net: RestorationNet, path: Path, meta: dict) -> str:
    """Write the weights and what they were trained on; returns the file's sha256."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"channels": net.channels, "width": net.width, "state_dict": net.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_network(model: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[RestorationNet, dict]:
    """The network in `model` (a restorer.pt or its directory), or the shipped one."""
    shipped = shipped_weights()
    path = Path(model).expanduser() if model else shipped
    if path.is_dir():
        path = path / WEIGHTS
    if not path.exists():
        raise ArtefactModelMissing(
            f"no artefact restoration network at {path}; train one offline with `fl-sim restorer train-artefact "
            "CONFIG` (the config the attack runs under: its model and resolution; about half an hour on 2 "
            "cores) and set restorer_params.model to the restorer.pt it writes")
    if path == shipped:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHIPPED_SHA256:
            raise ArtefactModelMissing(f"{path} has sha256 {digest}, not the shipped {SHIPPED_SHA256}; restore it "
                                       "from the repository or retrain it (see attacks/restorers/artefact.py)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    net = RestorationNet(int(state["channels"]), int(state["width"]))
    net.load_state_dict(state["state_dict"])
    return net.eval().requires_grad_(False).to(device), dict(state.get("meta", {}))


@dataclass
class ArtefactConfig:
    model: str | None = None  # a trained restorer.pt (or its directory); None: the shipped network
    strength: float = 1.0  # 1: the network's output; below 1, blended with the input

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError("artefact-net strength must be in [0, 1]")


@register_restorer("artefact-net")
class ArtefactRestorer(BaseRestorer):
    """Deterministic: every seed gives the same restoration."""

    Config = ArtefactConfig

    def __init__(self, config=None, public=None, device="cpu", net: RestorationNet | None = None) -> None:
        super().__init__(config, public, device)
        if net is None:
            net, self.meta = load_network(self.config.model, self.device)
        else:
            self.meta = {}
        self.net = net.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def restore(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        check_batch(images)
        grey = is_grey(images)
        x = images.to(self.device, torch.float32)
        n = x.shape[0]
        if self.net.channels == 1 and grey:
            x = luma(x)
        elif self.net.channels == 1:  # colour through a grey network: channel by channel
            x = x.reshape(-1, 1, *x.shape[-2:])
        elif x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out = self.net(x)
        if out.shape[0] != n:
            out, x = out.reshape(n, -1, *out.shape[-2:]), x.reshape(n, -1, *x.shape[-2:])
        s = self.config.strength
        if s < 1.0:
            out = s * out + (1 - s) * x
        return like_input(out.to(images.device), images, grey)

    def restore_many(self, images: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        out = self.restore(images, 0)  # deterministic: one pass serves every seed
        return [out.clone() for _ in seeds]

    def restore_groups(self, groups: list[tuple[torch.Tensor, list[int]]]) -> list[list[torch.Tensor]]:
        if not groups:
            return []
        sizes = [g[0].shape[0] for g in groups]
        shapes = {tuple(g[0].shape[1:]) for g in groups}
        if len(shapes) != 1:
            return [self.restore_many(images, seeds) for images, seeds in groups]
        out = self.restore(torch.cat([g[0] for g in groups]), 0).split(sizes)
        return [[o.clone() for _ in seeds] for o, (_, seeds) in zip(out, groups)]
