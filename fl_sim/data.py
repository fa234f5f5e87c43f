"""Face data sets (a registry), resizing, normalisation, partitioning over clients.

Every data set yields a `FaceDataset`: images in [0, 1] as float tensors (N, 3, H, W), the
task label, the person's identity, and the normalisation the model input gets, recorded
so an attacker can undo it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fl_sim import assets
from fl_sim.registry import Registry


@dataclass
class FaceDataset:
    name: str
    images: torch.Tensor  # (N, 3, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64 task label
    identities: torch.Tensor  # (N,) int64 person id, -1 when unknown
    num_classes: int
    grey: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    licence: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | list[int]) -> "FaceDataset":
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return FaceDataset(self.name, self.images[idx], self.labels[idx], self.identities[idx],
                           self.num_classes, self.grey, self.mean, self.std, self.licence)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def fingerprints(self) -> set[str]:
        """Content hashes of the images, to prove two sets share no image."""
        quantised = (self.images * 255).round().to(torch.uint8).numpy()
        return {hashlib.sha1(img.tobytes()).hexdigest() for img in quantised}


@dataclass(frozen=True)
class DataSpec:
    """What a loader needs; mirrors the `data` section of the config."""

    name: str = "orl"
    image_size: int = 64
    root: str | None = None  # lfw / celeba / image-folder: where the files are
    download: bool = False  # lfw / celeba: let torchvision download when the machine can
    max_images: int | None = None
    seed: int = 0
    options: dict[str, float | int | str] = field(default_factory=dict)


Loader = Callable[[DataSpec], FaceDataset]
DATASETS: Registry[Loader] = Registry("data set")
register_dataset = DATASETS.register


class DataError(ValueError):
    """A data set cannot be had where it was looked for; the message says what to do."""


def load_dataset(spec: DataSpec) -> FaceDataset:
    loader = DATASETS.get(spec.name)
    try:
        ds = loader(spec)
    except (RuntimeError, FileNotFoundError) as exc:  # torchvision: "Dataset not found or corrupted"
        if spec.name in ("orl", "synthetic"):
            raise
        raise DataError(
            f"data set {spec.name!r} not found under {spec.root or _data_root(spec, spec.name)}: "
            f"{str(exc).splitlines()[0]}. Set data.root to where it is, or data.download=true on a "
            "machine that may download it"
        ) from None
    if spec.max_images is not None and len(ds) > spec.max_images:
        keep = np.random.default_rng(spec.seed).permutation(len(ds))[: spec.max_images]
        ds = ds.subset(np.sort(keep))
    return ds


def to_square(img: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop to a square, resize to size x size, return (3, size, size) in [0, 1]."""
    w, h = img.size
    s = min(w, h)
    img = img.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma replicated to 3 channels, so grey data and a grey prior match."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


@register_dataset("orl")
def _orl(spec: DataSpec) -> FaceDataset:
    root = assets.get("orl-faces")
    images, ids = [], []
    for person in range(1, 41):
        for shot in range(1, 11):
            img = Image.open(root / f"s{person}" / f"{shot}.pgm")
            # ORL is 92x112 with the face centred; a centre square keeps the face.
            images.append(to_square(img, spec.image_size))
            ids.append(person - 1)
    ident = torch.tensor(ids)
    return FaceDataset("orl", torch.stack(images), ident.clone(), ident, 40, grey=True,
                       licence=assets.ASSETS["orl-faces"].licence)


@register_dataset("synthetic")
def _synthetic(spec: DataSpec) -> FaceDataset:
    """DCGAN faces. An identity is a latent; its images are small perturbations of it."""
    from fl_sim.generator import LATENT_DIM, load_face_generator

    n_id = int(spec.options.get("identities", 100))
    per_id = int(spec.options.get("per_identity", 1))
    spread = float(spec.options.get("spread", 0.3))
    g = torch.Generator().manual_seed(spec.seed)
    base = torch.randn(n_id, 1, LATENT_DIM, generator=g)
    z = (base + spread * torch.randn(n_id, per_id, LATENT_DIM, generator=g) * (per_id > 1)).view(-1, LATENT_DIM)
    gen = load_face_generator()
    with torch.no_grad():
        imgs = torch.cat([(gen(chunk) + 1) / 2 for chunk in z.split(256)])
    ident = torch.arange(n_id).repeat_interleave(per_id)
    return FaceDataset("synthetic", resize(imgs, spec.image_size), ident.clone(), ident, n_id,
                       licence=assets.ASSETS["dcgan-faces"].licence)


def _from_torchvision(ds, size: int, label_of: Callable[[object], int]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for img, target in ds:
        images.append(to_square(img, size))
        labels.append(label_of(target))
    return torch.stack(images), torch.tensor(labels)


def _data_root(spec: DataSpec, name: str) -> Path:
    return Path(spec.root) if spec.root else assets.home() / "data" / name


@register_dataset("lfw")
def _lfw(spec: DataSpec) -> FaceDataset:
    """LFW people with at least `min_faces` images each; identity is the label."""
    from torchvision.datasets import LFWPeople

    ds = LFWPeople(str(_data_root(spec, "lfw")), split="10fold", download=spec.download)
    min_faces = int(spec.options.get("min_faces", 10))
    counts = np.bincount(np.asarray(ds.targets))
    keep_ids = np.flatnonzero(counts >= min_faces)
    remap = {int(old): new for new, old in enumerate(keep_ids)}
    idx = [i for i, t in enumerate(ds.targets) if int(t) in remap]
    sub = torch.utils.data.Subset(ds, idx)
    images, ident = _from_torchvision(sub, spec.image_size, lambda t: remap[int(t)])
    return FaceDataset("lfw", images, ident.clone(), ident, len(keep_ids), licence="LFW terms")


@register_dataset("celeba")
def _celeba(spec: DataSpec) -> FaceDataset:
    """CelebA with the "Male" attribute (index 20) as a gender task, identity kept."""
    from torchvision.datasets import CelebA

    ds = CelebA(str(_data_root(spec, "celeba")), split="all", target_type=["attr", "identity"],
                download=spec.download)
    n = min(len(ds), spec.max_images or len(ds))
    sub = torch.utils.data.Subset(ds, range(n))
    images, packed = _from_torchvision(sub, spec.image_size, lambda t: int(t[0][20]) * 1_000_000 + int(t[1]))
    return FaceDataset("celeba", images, packed // 1_000_000, packed % 1_000_000, 2,
                       licence="CelebA: non-commercial research only")


@register_dataset("image-folder")
def _image_folder(spec: DataSpec) -> FaceDataset:
    """A local folder with one sub-folder of images per identity."""
    from torchvision.datasets import ImageFolder

    if not spec.root:
        raise ValueError("data set 'image-folder' needs data.root: a folder with one sub-folder per identity")
    ds = ImageFolder(spec.root)
    images, ident = _from_torchvision(ds, spec.image_size, int)
    grey = bool(torch.allclose(images[:, 0], images[:, 1]) and torch.allclose(images[:, 1], images[:, 2]))
    return FaceDataset("image-folder", images, ident.clone(), ident, len(ds.classes), grey=grey)


# ---------------------------------------------------------------------------------------
# Splits and partitions


def split_train_test(ds: FaceDataset, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a share of every identity's images (stratified), so test accuracy is fair."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for ident in np.unique(ds.identities.numpy()):
        idx = rng.permutation(np.flatnonzero(ds.identities.numpy() == ident))
        k = int(round(len(idx) * test_fraction))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


Partitioner = Callable[[FaceDataset, np.ndarray, int, np.random.Generator, float], list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioning")
register_partitioner = PARTITIONERS.register


@register_partitioner("iid")
def _iid(ds: FaceDataset, pool: np.ndarray, n: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(pool), n)]


@register_partitioner("by-identity")
def _by_identity(ds: FaceDataset, pool: np.ndarray, n: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    """Each identity's images stay with one client (a person owns their phone)."""
    ids = ds.identities.numpy()[pool]
    uniq = rng.permutation(np.unique(ids))
    if len(uniq) >= n:
        groups = np.array_split(uniq, n)
        return [np.sort(pool[np.isin(ids, g)]) for g in groups]
    # Fewer identities than clients: an identity's images are shared out among several
    # clients, but no client holds two people.
    owners = np.array_split(rng.permutation(n), len(uniq))
    parts: list[np.ndarray] = [np.array([], dtype=np.int64)] * n
    for ident, clients in zip(uniq, owners):
        members = rng.permutation(pool[ids == ident])
        for c, chunk in zip(clients, np.array_split(members, len(clients))):
            parts[c] = np.sort(chunk)
    return parts


@register_partitioner("dirichlet")
def _dirichlet(ds: FaceDataset, pool: np.ndarray, n: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    """Label skew: each label's images split over clients by Dirichlet(alpha) shares."""
    labels = ds.labels.numpy()[pool]
    buckets: list[list[int]] = [[] for _ in range(n)]
    for lab in np.unique(labels):
        members = rng.permutation(pool[labels == lab])
        shares = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for c, chunk in enumerate(np.split(members, cuts)):
            buckets[c].extend(chunk.tolist())
    return [np.sort(np.array(b, dtype=np.int64)) for b in buckets]


def partition(ds: FaceDataset, pool: np.ndarray, num_clients: int, scheme: str, seed: int,
              alpha: float = 0.5) -> list[np.ndarray]:
    """Disjoint index sets covering `pool`, one per client; the same for the same seed."""
    if scheme not in PARTITIONERS:
        raise KeyError(f"unknown partitioning {scheme!r}; choose one of {sorted(PARTITIONERS)}")
    return PARTITIONERS[scheme](ds, np.asarray(pool), num_clients, np.random.default_rng(seed), alpha)


def assert_disjoint(public: FaceDataset, private: FaceDataset) -> None:
    """The attacker's public set may share no image with any client's data."""
    shared = public.fingerprints() & private.fingerprints()
    if shared:
        raise ValueError(
            f"the attacker's public set shares {len(shared)} image(s) with client data; "
            "choose another public data set or hold those images out"
        )
