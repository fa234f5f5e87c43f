"""Black-box (similarity-only) reconstruction attacks by name, with typed settings:

    eigenface   the search in an eigenface basis (Razzhigaev et al.; steps along a gradient
                estimated from the batch's scores by default, Algorithm 1's with step=best)
    blobs       the same search with symmetric grey Gaussian blobs (the paper's baseline)

    attack = build_blackbox("eigenface", budget=25000, lr=0.05)
    result = attack.run(oracle, progress=..., checkpoint="search.pt", snapshots=(10000, 25000))

Both meet the oracle only through `attacks.oracle.SimilarityOracle`, so the same attack runs
against the HTTP service or in process. The eigenface basis is trained on the attacker's
public faces on first use and cached (`default_basis`), or loaded from a file (`basis=`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from attacks.eigenfaces import EigenfaceBasis, EigenfaceTrainConfig, public_faces, train_eigenfaces
from attacks.oracle import SimilarityOracle
from attacks.score_search import BlobDirections, EigenDirections, SearchConfig, SearchResult, search
from fl_sim.face_detection import Alignment, align_images
from fl_sim.registry import Registry, build_settings

# The basis made on first use: this many public DCGAN faces, these settings. iterations=0 is
# the autoencoder's PCA start (its optimum without the symmetry and generative terms), the
# basis the search's settings were tuned with; the fully trained autoencoder is
# `fl-sim eigenfaces train` and `basis=FILE`, not yet shown to search better.
DEFAULT_PUBLIC_FACES = 4000
DEFAULT_BASIS = EigenfaceTrainConfig(components=1024, iterations=0)


def default_basis(config: EigenfaceTrainConfig = DEFAULT_BASIS, faces: int = DEFAULT_PUBLIC_FACES,
                  progress: Callable[[str], None] | None = None, alignment: Alignment = "none") -> EigenfaceBasis:
    """The eigenface basis of the default public faces, trained once and cached beside the assets.
    alignment="yunet": the faces are first aligned onto SFace's template, as a service that
    aligns its photos would (the faces YuNet finds none in, about 1.5 %, are left out)."""
    from fl_sim import assets

    extra = {} if alignment == "none" else {"alignment": alignment}  # the unaligned key is unchanged
    key = hashlib.sha256(json.dumps({**dataclasses.asdict(config), "faces": faces, "v": 1, **extra},
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = assets.home() / "eigenfaces" / f"basis-{key}.pt"
    if path.exists():
        return EigenfaceBasis.load(path)
    if progress:
        progress(f"training the eigenface basis on {faces} public DCGAN faces"
                 f"{' aligned by YuNet' if alignment == 'yunet' else ''} (once; cached in {path})")
    images, _ = align_images(public_faces(faces, config.size), alignment, config.size, drop_missing=True)
    basis = train_eigenfaces(images, config, checkpoint=path.with_suffix(".ckpt"))
    basis.save(path)
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    return basis


@dataclass(frozen=True)
class EigenfaceConfig(SearchConfig):
    # chosen on the development people (configs/bench/eigenface.yaml has the figures): steps along
    # the batch's gradient estimate, one start, probes of 0.05 RMS then 0.02 after 80 iterations,
    # each probe pair shifted by up to 2 px
    step: Literal["best", "gradient"] = "gradient"
    lr: float = 0.05
    lr_late: float = 0.02
    lr_switch: int = 80
    starts: int = 1
    start_iterations: int = 0
    basis: str | None = None  # a basis file (`fl-sim eigenfaces train`); None: the default, trained once
    alignment: Alignment = "none"  # the default basis' public faces aligned as the service aligns
    start: Literal["mean", "grey"] = "mean"  # the mean public face (the authors' code) or a flat grey image
    grey: bool = False  # grey steps and a grey start (for grey targets)
    components: int | None = None  # search the first N eigenfaces only (None: all of the basis)
    symmetric: bool = False  # mirror-symmetric steps
    probe_jitter: int = 2


@dataclass(frozen=True)
class BlobsConfig(SearchConfig):
    batch: int = 80
    lr: float = 1.0  # the blob's amplitude is the step
    lr_late: float = 1.0
    amplitude_min: float = 0.01
    amplitude_max: float = 0.02
    size: int = 112



class BlackBoxAttack:
    name: ClassVar[str]
    Config: ClassVar[type[SearchConfig]]

    def __init__(self, config: SearchConfig) -> None:
        self.config = config

    def directions_and_start(self) -> tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def run(self, oracle: SimilarityOracle, progress: Callable[[int, int, float], None] | None = None,
            checkpoint: str | Path | None = None, stop: Callable[[], bool] | None = None,
            snapshots: tuple[int, ...] = ()) -> SearchResult:
        directions, start = self.directions_and_start()
        search_config = SearchConfig(**{f.name: getattr(self.config, f.name) for f in dataclasses.fields(SearchConfig)})
        return search(oracle, directions, start, search_config, progress, checkpoint, stop, snapshots)


BLACKBOX: Registry[type[BlackBoxAttack]] = Registry("black-box attack")


@BLACKBOX.register("eigenface")
class EigenfaceAttack(BlackBoxAttack):
    Config = EigenfaceConfig

    def directions_and_start(self) -> tuple[EigenDirections, torch.Tensor]:
        cfg: EigenfaceConfig = self.config  # type: ignore[assignment]
        basis = EigenfaceBasis.load(cfg.basis) if cfg.basis else default_basis(alignment=cfg.alignment)
        start = basis.mean.clamp(0, 1) if cfg.start == "mean" else torch.full_like(basis.mean, 0.5)
        if cfg.grey:
            start = start.mean(0, keepdim=True).expand(3, -1, -1).contiguous()
        return EigenDirections(basis, cfg.sigma, cfg.grey, cfg.components, cfg.symmetric), start


@BLACKBOX.register("blobs")
class BlobsAttack(BlackBoxAttack):
    Config = BlobsConfig

    def directions_and_start(self) -> tuple[BlobDirections, torch.Tensor]:
        cfg: BlobsConfig = self.config  # type: ignore[assignment]
        directions = BlobDirections(cfg.size, (cfg.amplitude_min, cfg.amplitude_max))
        return directions, torch.full((3, cfg.size, cfg.size), 0.5)


def build_blackbox(name: str, where: str | None = None, **params: Any) -> BlackBoxAttack:
    """A black-box attack with its settings validated (one line naming a bad one)."""
    cls = BLACKBOX.get(name)
    return cls(build_settings(cls.Config, params, where or f"attack {name!r}"))


__all__ = ["BLACKBOX", "BlackBoxAttack", "EigenfaceAttack", "BlobsAttack", "EigenfaceConfig", "BlobsConfig",
           "build_blackbox", "default_basis"]
