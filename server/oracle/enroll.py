"""Enrollment: images -> a template in the store. Used by POST /v1/identities and by
`fl-sim oracle enroll` (which works on the store directly, no server needed)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from server.oracle.backend import Backend
from server.oracle.images import ALIGNERS
from server.oracle.schemas import IDENTITY_PATTERN
from server.oracle.store import IdentityRecord, Store

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".webp"}


def check_identity(identity: str) -> str:
    if not re.fullmatch(IDENTITY_PATTERN.strip("^$"), identity):
        raise ValueError(f"identity id {identity!r} must match [A-Za-z0-9_.-]{{1,64}}")
    return identity


def enroll(store: Store, backend: Backend, identity: str, crops: np.ndarray) -> IdentityRecord:
    """Enroll `crops` ((N, S, S, 3) uint8) as `identity`; IdentityExists if it is there."""
    check_identity(identity)
    return store.add_identity(identity, backend.template(crops), len(crops), backend.name)


def load_files(paths: list[Path], size: int, aligner: str = "resize") -> np.ndarray:
    align = ALIGNERS.get(aligner)
    crops = []
    for path in paths:
        with Image.open(path) as img:
            crops.append(align(np.asarray(img.convert("RGB"), dtype=np.uint8), size))
    if not crops:
        raise ValueError("no images given")
    return np.stack(crops)


def folder_identities(root: Path) -> Iterator[tuple[str, list[Path]]]:
    """A folder with one sub-folder of images per identity: (sub-folder name, its images)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            yield sub.name, files


def dataset_identities(name: str, size: int, per_identity: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """A registered data set's identities as (f"{name}-{person}", crops); ORL person 0 is s1."""
    import torch

    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(name=name, image_size=size))
    crops = (ds.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for person in sorted(set(ds.identities.tolist())):
        idx = np.flatnonzero(ds.identities.numpy() == person)[:per_identity]
        label = f"s{person + 1}" if name == "orl" else str(person)
        yield f"{name}-{label}", crops[idx]
