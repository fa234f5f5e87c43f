"""How much of a face must leak for the critic to name the person (`fl-sim bench critic`).

Rank-1 re-identification is the measure an auditor reads first, and it is all or nothing: a
reconstruction either names its victim first among all of the data set's identities or not.
This benchmark puts a scale under it. It degrades real photos of the clients' data set in
known ways (Gaussian blur, Gaussian noise, both) and scores the degraded photo exactly as
a reconstruction is scored: PSNR against the photo, the critic's identity similarity to it,
and the person's rank among all identities, each known from their other photos (the photo
itself is left out of its person's template). A reconstruction's PSNR and identity figures
can then be read against "the same face blurred by 2 pixels".

    fl-sim bench critic                                  # ORL at 64 px, FaceNet (the benchmarks' case)
    fl-sim bench critic --shots 0,3,6 --out runs/critic.csv
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.cli_common import add_config_arguments, load_or_report, write_rows

DEFAULT_CONFIG = "configs/bench/dfleak.yaml"


def blur(images: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur of `sigma` px (also the landscape bench's blurred starts)."""
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(images, 2 * round(3 * sigma) + 1, sigma)


def _noise(images: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return images + std * torch.randn(images.shape, generator=g)


def _blur_and_noise(images: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    # the mix gradient inversion leaves: smooth where the prior or the restorer acted, grain
    # elsewhere (noise std sigma / 20: a 2 px blur with noise of std 0.1)
    return _noise(blur(images, sigma, g), sigma / 20, g)


# name -> (degrade(images, level, generator), levels). Levels: blur, the Gaussian's sigma in
# pixels; noise, the std on images in [0, 1]; blur + noise, the blur's sigma (noise std sigma / 20).
DEGRADATIONS: dict[str, tuple[Callable[[torch.Tensor, float, torch.Generator], torch.Tensor], list[float]]] = {
    "blur": (blur, [1.0, 1.5, 2.0, 2.5, 3.0]),
    "noise": (_noise, [0.05, 0.1, 0.15, 0.2]),
    "blur + noise": (_blur_and_noise, [1.0, 1.5, 2.0]),
}


@dataclass(frozen=True)
class CalibrationRow:
    degradation: str
    level: float
    probes: int
    psnr: float
    id_similarity: float
    id_rank1: float  # share of the probes whose person the critic names first
    id_rank_median: float


def calibrate(config, shots: list[int], seed: int = 0, on_row: Callable[[CalibrationRow], None] | None = None,
              degradations: dict | None = None) -> list[CalibrationRow]:
    """The undegraded photos, then every degradation (default: all of DEGRADATIONS) at every
    level, on `shots` (the n-th photo of each person)."""
    from fl_sim.federated_data import federated_data
    from fl_sim.metrics import IdentityGallery, id_similarity, psnr

    ds = federated_data(config).dataset
    backend = config.metrics.id_backend or "facenet"
    gallery = IdentityGallery.of(ds.images, ds.identities, backend)
    ids = ds.identities.numpy()
    people = [p for p in np.unique(ids) if p >= 0]
    index = np.array([np.flatnonzero(ids == p)[s] for s in shots for p in people if s < (ids == p).sum()])
    truth = ds.images[index]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for name, (degrade, levels) in {"none": (lambda x, level, g: x, [0.0]), **(DEGRADATIONS if degradations is None else degradations)}.items():
        for level in levels:
            probe = degrade(truth, level, g).clamp(0, 1)
            ranks = gallery.ranks(probe, index)
            row = CalibrationRow(name, level, len(index), float(psnr(probe, truth).clamp(max=100).mean()),
                                 float(id_similarity(probe, truth, backend).mean()),
                                 float((ranks == 1).mean()), float(np.median(ranks)))
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-sim bench critic", description=__doc__.split("\n\n")[0])
    add_config_arguments(p, DEFAULT_CONFIG, "its data set and critic")
    p.add_argument("--shots", default="0,5", help="which photo of each person is the probe (comma-separated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    return p


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    args = build_parser().parse_args(argv)
    console = Console()
    try:
        shots = [int(s) for s in args.shots.split(",")]
        if min(shots) < 0:
            raise ValueError
    except ValueError:
        console.print(f"[red]error:[/] --shots must be comma-separated photo numbers >= 0, got {args.shots!r}")
        return 2
    config = load_or_report(args, console)
    if config is None:
        return 2
    t0 = time.perf_counter()
    console.print(f"critic {config.metrics.id_backend or 'facenet'} on {config.data.name} at "
                  f"{config.data.image_size} px, photos {shots} of each person as probes")
    rows = calibrate(config, shots, args.seed, on_row=lambda r: console.print(
        f"  {r.degradation} {r.level:g}: PSNR {r.psnr:.2f}, id {r.id_similarity:.3f}, rank-1 {r.id_rank1:.0%}",
        highlight=False))
    table = Table(title=f"What the critic needs to name the person ({time.perf_counter() - t0:.0f} s)")
    for c in ("degradation", "level", "probes", "PSNR", "id similarity", "rank-1", "median rank"):
        table.add_column(c, justify="left" if c == "degradation" else "right")
    for r in rows:
        table.add_row(r.degradation, f"{r.level:g}", str(r.probes), f"{r.psnr:.2f}", f"{r.id_similarity:.3f}",
                      f"{r.id_rank1:.0%}", f"{r.id_rank_median:g}")
    console.print(table)
    write_rows(pd.DataFrame([asdict(r) for r in rows]), args.out, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
