"""How tightly does an update pin its face? (`fl-sim bench landscape`)

An optimisation attack can return no more of a face than its objective singles out. This
benchmark asks the objective directly, with the truth in hand (so only an auditor can run it):
it starts the attack's own optimisation *at* the victim's face, sharp, blurred and noised,
reports where it goes, and walks the straight path from each start to the face. Two
questions apart: does the objective single out the face (it falls all the way along the
path), and does the attack's descent find it (or does it end, further from the face, at an
objective that the path reaches much closer to it)?
The critic's figures (`fl-sim bench critic`) say what each level means for re-identification.

For each victim and start: the start's PSNR and objective (the attack's matching loss plus
its priors, recomputed in float64), then the same after `--iterations` steps of the attack
(InvertG's recipe by default: 1 - cosine + TV, signed Adam, step decay, from that start at
`--lr`), the critic's identity similarity and rank of the result among the data set's
identities, and on the path from the start to the face: whether the objective falls at every
point measured, and the PSNR of the path's image that scores what the attack ended at.

    fl-sim bench landscape                                       # dev victims of the priors bench
    fl-sim bench landscape --clients 0,1 --iterations 2000 --lr 0.003 --grid landscape.png
    fl-sim bench landscape --starts "blur 1 px,blur 2 px" --param tv=0.1 --out rows.csv
    fl-sim bench landscape configs/bench/dfleak.yaml model.weights=RUN/global_model.pt
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.cli_common import add_config_arguments, load_or_report, write_rows
from benchmarks.critic_calibration import blur

DEFAULT_CONFIG = "configs/bench/priors.yaml"


def _noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    # one noise image for all channels, so a grey face stays grey
    return x + std * torch.randn((x.shape[0], 1, *x.shape[2:]), generator=g)


# start name -> (degrade(truth, level, generator), level); "truth" is the undegraded face
STARTS: dict[str, tuple[Callable[[torch.Tensor, float, torch.Generator], torch.Tensor], float]] = {
    "truth": (lambda x, level, g: x, 0.0),
    "blur 1 px": (blur, 1.0),
    "blur 2 px": (blur, 2.0),
    "noise 0.05": (_noise, 0.05),
}


# The optimisation baselines: they start where they are told (`init: tensor`). DFLeak and GGL
# choose their own start (the initialisation search, the generator's latent), so they cannot
# be started at the truth.
PROBED = ("invertg", "idlg-adam", "gradinv")


@dataclass(frozen=True)
class LandscapeRow:
    client: int
    start: str
    start_psnr: float
    start_objective: float
    end_psnr: float
    end_objective: float
    start_id_rank: int  # the critic's rank of the true person (1 = named first); worst image of the case
    end_id_rank: int
    end_id_similarity: float
    # The straight path from the start to the truth: does the objective fall all the way, and
    # how close to the truth (PSNR) is the path's image that scores what the attack ended at?
    # High while end_psnr is low: the objective does single out the face, the descent misses it.
    line_descends: bool
    line_psnr_at_end: float


LINE = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)  # points on the path from the start (0) to the truth (1)


def _path_psnr_at(objective: float, ts: tuple[float, ...], values: list[float], psnr_at) -> float:
    """PSNR of the first image on the path whose objective is down to `objective` (linear in t
    between the measured points); the start's if the start already scores that."""
    for (t0, v0), (t1, v1) in zip(zip(ts, values), zip(ts[1:], values[1:])):
        if v1 <= objective < v0:
            return psnr_at(t0 + (t1 - t0) * (v0 - objective) / (v0 - v1))
        if v0 <= objective:
            return psnr_at(t0)
    return psnr_at(ts[-1])


def probe(config, clients: list[int], iterations: int, lr: float, attack: str = "invertg",
          starts: dict | None = None, seed: int = 0, params: dict | None = None,
          on_case: Callable[[LandscapeRow, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
          ) -> list[LandscapeRow]:
    """Run the attack from each start on each victim; one row per (victim, start).
    `params` override the attack's other settings (e.g. {"tv": 0.1}); `on_case(row, truth,
    start, end)` sees each result as it comes, with its images."""
    import dataclasses

    from attacks.engine import reference_objective
    from attacks.registry import ATTACKS
    from fl_sim.federated_data import federated_data
    from fl_sim.metrics import IdentityGallery, id_similarity, psnr
    from fl_sim.registry import build_settings
    from server.cases import simulate_victims

    cls = ATTACKS.get(attack)
    # validated as a user's settings (a SettingsError before any victim is built); the start is
    # a tensor, not a config value, so it goes in after
    base = build_settings(cls.Config, {**(params or {}), "iterations": iterations, "lr": lr}, "--param")
    ds = federated_data(config).dataset
    backend = config.metrics.id_backend or "facenet"
    gallery = IdentityGallery.of(ds.images, ds.identities, backend)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for victim in simulate_victims(config, clients):
        truth = victim.truth_images
        index = np.asarray(victim.truth_index)
        for name, (degrade, level) in (STARTS if starts is None else starts).items():
            start = degrade(truth, level, g).clamp(0, 1)
            cfg = dataclasses.replace(base, init="tensor", init_image=start)
            result = cls(cfg).run(victim.case)
            end = result.images.float()
            ranks = gallery.ranks(torch.cat([start, end]), np.concatenate([index, index]))

            def on_path(t: float) -> torch.Tensor:
                return start + t * (truth - start)

            def psnr_at(t: float) -> float:
                return float(psnr(on_path(t), truth).clamp(max=100).mean())

            line = [reference_objective(victim.case, on_path(t), result.labels, cfg) for t in LINE]
            end_objective = reference_objective(victim.case, end, result.labels, cfg)
            row = LandscapeRow(
                victim.client, name, psnr_at(0.0), line[0], float(psnr(end, truth).clamp(max=100).mean()),
                end_objective, int(ranks[: len(index)].max()), int(ranks[len(index):].max()),
                float(id_similarity(end, truth, backend).mean()),
                all(b < a for a, b in zip(line, line[1:])), _path_psnr_at(end_objective, LINE, line, psnr_at))
            rows.append(row)
            if on_case:
                on_case(row, truth, start, end)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-sim bench landscape", description=__doc__.split("\n\n")[0])
    add_config_arguments(p, DEFAULT_CONFIG, "data, model, federation, victims")
    p.add_argument("--clients", help="victims (comma-separated; default: the config's development victims)")
    p.add_argument("--attack", default="invertg", choices=PROBED,
                   help="the optimisation whose objective is probed (default invertg)")
    p.add_argument("--starts", help=f"comma-separated starts (default all: {', '.join(STARTS)})")
    p.add_argument("--grid", help="also save the pictures here (PNG): per victim the truth, then each start and where it ended")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01,
                   help="step size from the start (default 0.01: a tenth of InvertG's, the start is close)")
    p.add_argument("--param", dest="params", action="append", default=[],
                   help="key=value: another setting of the attack (e.g. tv=0.1), as for fl-sim attack")
    return p


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    args = build_parser().parse_args(argv)
    console = Console()
    config = load_or_report(args, console)
    if config is None:
        return 2
    victims = config.threat.victims
    try:
        clients = [int(c) for c in args.clients.split(",")] if args.clients else list(victims.dev_ids or victims.ids)
    except ValueError:
        console.print(f"[red]error:[/] --clients must be comma-separated client numbers, got {args.clients!r}")
        return 2
    names = [n.strip() for n in args.starts.split(",")] if args.starts else list(STARTS)
    unknown = [n for n in names if n not in STARTS]
    if unknown:
        console.print(f"[red]error:[/] unknown start {unknown[0]!r}; choose from {', '.join(STARTS)}", highlight=False)
        return 2
    if args.iterations < 1 or args.lr <= 0:
        console.print("[red]error:[/] --iterations must be >= 1 and --lr > 0")
        return 2
    from fl_sim.registry import SettingsError
    from server.offline import parse_params

    try:
        params = parse_params(args.params)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    t0 = time.perf_counter()
    console.print(f"{args.attack} from the truth and its degradations: clients {clients}, "
                  f"{args.iterations} iterations at lr {args.lr:g}" + "".join(f", {k}={v}" for k, v in params.items()))
    tiles: dict[int, list[torch.Tensor]] = {}  # victim -> truth, then (start, end) per start

    def report(r: LandscapeRow, truth: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> None:
        console.print(f"  client {r.client}, {r.start}: PSNR {r.start_psnr:.2f} -> {r.end_psnr:.2f}, objective "
                      f"{r.start_objective:.4f} -> {r.end_objective:.4f}, rank {r.start_id_rank} -> {r.end_id_rank}; "
                      f"the straight path to the face reaches that objective at {r.line_psnr_at_end:.2f} dB",
                      highlight=False, soft_wrap=True)
        tiles.setdefault(r.client, [truth[0]]).extend([start[0], end[0]])  # a multi-image case shows its first

    try:
        rows = probe(config, clients, args.iterations, args.lr, args.attack,
                     starts={n: STARTS[n] for n in names}, params=params, on_case=report)
    except SettingsError as exc:  # a bad --param: probe checks it before any victim is built
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    frame = pd.DataFrame([asdict(r) for r in rows])
    summary = frame.groupby("start", sort=False).agg(
        victims=("client", "size"), start_psnr=("start_psnr", "mean"), end_psnr=("end_psnr", "mean"),
        start_objective=("start_objective", "mean"), end_objective=("end_objective", "mean"),
        start_rank1=("start_id_rank", lambda r: int((r == 1).sum())),
        end_rank1=("end_id_rank", lambda r: int((r == 1).sum())),
        descends=("line_descends", "sum"), line_psnr=("line_psnr_at_end", "mean"))
    table = Table(title=f"Where the attack goes from the truth ({time.perf_counter() - t0:.0f} s)")
    # "path": the straight path from the start to the face; "dB at end obj.": where on it the
    # objective is down to the attack's end
    for c in ("start", "victims", "PSNR", "PSNR after", "obj.", "obj. after", "rank-1", "rank-1 after",
              "path falls", "path dB at end obj."):
        table.add_column(c, justify="left" if c == "start" else "right")
    for r in summary.itertuples():
        table.add_row(r.Index, str(r.victims), f"{r.start_psnr:.2f}", f"{r.end_psnr:.2f}", f"{r.start_objective:.4f}",
                      f"{r.end_objective:.4f}", f"{r.start_rank1}/{r.victims}", f"{r.end_rank1}/{r.victims}",
                      f"{r.descends}/{r.victims}", f"{r.line_psnr:.2f}")
    console.print(table)
    write_rows(frame, args.out, console)
    if args.grid:
        save_grid(tiles, args.grid)
        console.print(f"pictures saved to {args.grid} (per victim: the truth, then each start and where it ended)")
    return 0


def save_grid(tiles: dict[int, list[torch.Tensor]], path: str) -> None:
    """One picture row per victim, as gathered by the CLI."""
    from pathlib import Path

    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rows = list(tiles.values())
    save_image(torch.stack([t.expand(3, -1, -1) for row in rows for t in row]), path,
               nrow=len(rows[0]), padding=2, pad_value=1.0)
