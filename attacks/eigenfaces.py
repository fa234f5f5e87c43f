"""Eigenfaces for similarity-only face reconstruction (Razzhigaev et al.): the decoder
weights of a bias-free linear autoencoder trained on the attacker's public faces.

    basis = train_eigenfaces(public_images, EigenfaceTrainConfig(), progress=print)
    basis.save("eigenfaces.pt"); basis = EigenfaceBasis.load("eigenfaces.pt")
    faces = basis.decode(z)            # z: (N, K) coefficients -> (N, 3, S, S) in pixel units

Training minimises, over encoder W1 and decoder W2 (D x K each, pixels scaled x/255 - 0.5,
the mean face removed):

    MSE(s(X), W2 W1^T X) + g * MSE(X, W2 z),  z ~ N(0, I)

where s(X) = (1 - m) X + m R(X) is the soft-symmetry target (R: horizontal mirror; the
paper's m = 2/3, the authors' code's m = 1/4) and the second term, the generative
regularisation (weight g: 1 in the paper, 10 in the code), asks decoded noise to look like
a face. Both presets are here; `iterations` replaces the code's 100 epochs of batch 2048,
which take hours on a CPU for a 37,632-pixel input: the autoencoder starts from the
principal components of the public faces (a randomised SVD, `torch.svd_lowrank`, the
optimum of the first term when m = 0) and is then trained with AdamW under the loss above,
with progress, checkpoints and resume.

The basis keeps the decoder's columns as they are trained; the search samples
directions `E z` with z ~ N(0, sigma^2 I), so E's scale sets what a step of size lr means.
`scale` (the RMS pixel change of a unit step) is stored beside it for the reader.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EigenfaceTrainConfig:
    components: int = 1024
    symmetry: float = 0.25  # m in (1 - m) X + m R(X); the paper's 2/3, the code's 1/4
    generative_weight: float = 10.0  # g; the paper's 1, the code's 10
    iterations: int = 300  # AdamW steps after the PCA start (0: the PCA basis as it is)
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    size: int = 112
    grey: bool = False  # the code feeds the encoder grey images; colour faces keep colour here
    seed: int = 0

    def __post_init__(self) -> None:
        if self.components < 1:
            raise ValueError(f"components must be >= 1, got {self.components}")
        if not 0.0 <= self.symmetry <= 1.0:
            raise ValueError(f"symmetry must be in [0, 1], got {self.symmetry}")
        if self.generative_weight < 0 or self.iterations < 0 or self.batch < 1 or self.lr <= 0:
            raise ValueError("generative_weight and iterations must be >= 0, batch >= 1, lr > 0")


PRESETS: dict[str, dict[str, float]] = {
    "paper": {"symmetry": 2 / 3, "generative_weight": 1.0},
    "authors-code": {"symmetry": 0.25, "generative_weight": 10.0},
}


@dataclass
class EigenfaceBasis:
    mean: torch.Tensor  # (3, S, S) the mean public face, pixels in [0, 1]
    components: torch.Tensor  # (K, 3 * S * S) decoder columns, in pixel units of [0, 1]
    config: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def scale(self) -> float:
        """RMS pixel change of E z for z ~ N(0, I)."""
        return float(self.components.pow(2).sum().div(self.components.shape[1]).sqrt())

    def decode(self, z: torch.Tensor, with_mean: bool = True) -> torch.Tensor:
        """(N, K) coefficients -> (N, 3, S, S); with the mean face added unless told not to."""
        out = (z.to(self.components.dtype) @ self.components).view(len(z), 3, self.size, self.size)
        return out + self.mean if with_mean else out

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> least-squares coefficients (N, K)."""
        x = (images - self.mean).flatten(1)
        return torch.linalg.lstsq(self.components.T, x.T).solution.T

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images)).clamp(0, 1)

    def save(self, path: str | Path) -> str:
        """Write atomically; returns the file's sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"mean": self.mean.contiguous(), "components": self.components.contiguous(),
                    "config": self.config}, buf)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        return hashlib.sha256(buf.getvalue()).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "EigenfaceBasis":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["mean"].float(), data["components"].float(), dict(data.get("config", {})))


def mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def pca_basis(images: torch.Tensor, components: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (3, S, S), components (K, D) scaled by their standard deviations)."""
    n = len(images)
    mean = images.mean(0)
    x = (images - mean).flatten(1)
    k = min(components, n - 1, x.shape[1])
    torch.manual_seed(seed)
    _, s, v = torch.svd_lowrank(x, q=min(k + 16, min(x.shape)), niter=3)
    return mean, (v[:, :k] * (s[:k] / math.sqrt(max(1, n - 1)))).T.contiguous()


Progress = Callable[[int, int, float], None]


def train_eigenfaces(images: torch.Tensor, config: EigenfaceTrainConfig = EigenfaceTrainConfig(),
                     progress: Progress | None = None, checkpoint: str | Path | None = None,
                     checkpoint_every: int = 50) -> EigenfaceBasis:
    """Train the basis on public faces (N, 3, S, S) in [0, 1] (resized to config.size).

    With `checkpoint`, the optimiser state is saved every `checkpoint_every` steps and a run
    that finds the file resumes from it (same config required)."""
    if images.shape[-1] != config.size:
        images = F.interpolate(images, size=(config.size, config.size), mode="bilinear", align_corners=False,
                               antialias=True)
    images = images.float().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    mean, pcs = pca_basis(images, config.components, config.seed)
    k = pcs.shape[0]
    x_all = (images - mean).flatten(1)  # the code's /255 - 0.5 centring, with the mean face instead of 0.5
    # Encoder and decoder start at the PCA solution: decoder columns = unit principal directions
    # times their std, encoder rows = the matching pseudo-inverse.
    norms = pcs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    w2 = torch.nn.Parameter(pcs.clone())  # (K, D)
    w1 = torch.nn.Parameter((pcs / norms.pow(2)).clone())  # (K, D): z = X W1^T
    opt = torch.optim.AdamW([w1, w2], lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{ckpt} was written with other settings ({state['config']}); delete it or use them")
        w1.data.copy_(state["w1"]), w2.data.copy_(state["w2"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
    target_of = (lambda x: (1 - config.symmetry) * x + config.symmetry * mirror(x.view(-1, *images.shape[1:]))
                 .flatten(1))
    loss = torch.tensor(float("nan"))
    for step in range(start, config.iterations):
        idx = torch.randint(len(x_all), (min(config.batch, len(x_all)),), generator=gen)
        x = x_all[idx]
        if config.grey:  # the code's grey encoder input
            x_in = x.view(len(x), 3, -1).mean(1, keepdim=True).expand(-1, 3, -1).reshape(len(x), -1)
        else:
            x_in = x
        recon = (x_in @ w1.T) @ w2
        z = torch.randn(len(x), k, generator=gen)
        loss = F.mse_loss(recon, target_of(x)) + config.generative_weight * F.mse_loss(z @ w2, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, config.iterations, loss.item())
        if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == config.iterations):
            tmp = ckpt.with_name(f".{ckpt.name}.tmp")
            torch.save({"config": asdict(config), "w1": w1.data, "w2": w2.data, "opt": opt.state_dict(),
                        "gen": gen.get_state(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt)
    return EigenfaceBasis(mean, w2.detach().clone(), {**asdict(config), "images": len(images)})


def public_faces(n: int, size: int = 112, seed: int = 0) -> torch.Tensor:
    """The attacker's default public faces: n DCGAN faces (never a client's), at size px."""
    from fl_sim.generator import sample_faces

    with torch.no_grad():
        out = torch.cat([sample_faces(min(512, n - i), seed=seed + i) for i in range(0, n, 512)])
    return F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


__all__ = ["EigenfaceBasis", "EigenfaceTrainConfig", "PRESETS", "train_eigenfaces", "pca_basis", "public_faces",
           "mirror"]
