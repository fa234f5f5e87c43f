"""`fl-sim eigenfaces train`: the eigenface basis of the black-box attack, trained on the
attacker's public faces, into a folder:

    basis.pt        the basis (attacks.eigenfaces.EigenfaceBasis), its sha256 in report.html
    eigenfaces.png  the mean face and the leading eigenfaces
    report.html     settings, the command that reproduces it, held-out reconstruction error
    train.ckpt      the training state while it runs: the same command resumes from it
"""
from __future__ import annotations

import argparse
import html
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from attacks.eigenfaces import PRESETS, EigenfaceBasis, EigenfaceTrainConfig, public_faces, train_eigenfaces
from fl_sim.face_detection import align_images
from fl_sim.registry import build_settings

HELD_OUT = 200  # public faces kept out of training to measure reconstruction error


def load_public_faces(dataset: str, n: int, size: int, root: str | None = None) -> torch.Tensor:
    if dataset == "synthetic":
        return public_faces(n, size)
    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(name=dataset, image_size=size, root=root, max_images=n))
    return ds.images[:n]


def eigenface_grid(basis: EigenfaceBasis, path: Path, count: int = 15) -> None:
    """The mean face and the first `count` eigenfaces, each stretched to the full grey range."""
    from torchvision.utils import save_image

    eig = basis.components[:count].view(-1, 3, basis.size, basis.size)
    lo = eig.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = eig.flatten(1).amax(1).view(-1, 1, 1, 1)
    tiles = torch.cat([basis.mean[None].clamp(0, 1), (eig - lo) / (hi - lo).clamp_min(1e-8)])
    save_image(tiles, path, nrow=8, padding=2, pad_value=1.0)


def train_command(args: argparse.Namespace, console) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from server.offline import parse_params

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = {**PRESETS[args.preset], **parse_params(args.params)}
    config = build_settings(EigenfaceTrainConfig, params, "eigenfaces train --param")
    t0 = time.perf_counter()
    console.print(f"public faces: {args.faces} from {args.dataset!r} at {config.size} px "
                  f"(+{HELD_OUT} held out for the error figure)")
    faces = load_public_faces(args.dataset, args.faces + HELD_OUT, config.size, args.root)
    loaded = len(faces)  # a folder may hold fewer than asked for
    faces, kept = align_images(faces, args.alignment, config.size, drop_missing=True)
    if len(kept) < loaded:
        console.print(f"aligned by {args.alignment}: {len(kept)} of {loaded} faces kept (no face found in the others)")
    if len(faces) <= HELD_OUT:
        raise SystemExit(f"error: only {len(faces)} faces to train on; at least {HELD_OUT + 1} are needed")
    train, held_out = faces[:-HELD_OUT], faces[-HELD_OUT:]
    with Progress(TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps, "
                                                                       "loss {task.fields[loss]:.5f}"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=max(1, config.iterations), loss=float("nan"))
        basis = train_eigenfaces(train, config, checkpoint=out / "train.ckpt",
                                 progress=lambda step, total, loss: bar.update(task, completed=step, loss=loss))
    sha = basis.save(out / "basis.pt")
    (out / "train.ckpt").unlink(missing_ok=True)
    eigenface_grid(basis, out / "eigenfaces.png")
    error = float((basis.reconstruct(held_out) - held_out).pow(2).mean())
    mean_error = float((basis.mean - held_out).pow(2).mean())
    command = "fl-sim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "fl-sim eigenfaces train"
    summary = {"basis": "basis.pt", "sha256": sha, "components": basis.k, "size": basis.size,
               "train_faces": len(train), "held_out_mse": error, "mean_face_mse": mean_error,
               "seconds": time.perf_counter() - t0, "config": asdict(config), "command": command}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.html").write_text(_report(summary))
    console.print(f"basis: {basis.k} eigenfaces at {basis.size} px, held-out reconstruction MSE {error:.5f} "
                  f"(mean face alone {mean_error:.5f}), sha256 {sha[:16]}..., {summary['seconds']:.0f} s; "
                  f"[bold]{out}[/]")
    return 0


def _report(summary: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary["config"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>eigenfaces</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:2px 10px}}</style></head><body>
<h1>Eigenface basis</h1>
<p>{summary['components']} eigenfaces at {summary['size']} px from {summary['train_faces']} public faces.
Held-out reconstruction MSE {summary['held_out_mse']:.5f} (the mean face alone: {summary['mean_face_mse']:.5f}).
sha256 of basis.pt: <code>{summary['sha256']}</code>. Reproduce: <code>{html.escape(summary['command'])}</code></p>
<h2>The mean face and the leading eigenfaces</h2><img src="eigenfaces.png" alt="eigenfaces">
<h2>Settings</h2><table>{rows}</table></body></html>
"""


__all__ = ["train_command", "load_public_faces", "eigenface_grid"]
