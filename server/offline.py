"""Attack one saved case file outside a federation (`fl-sim attack CASE --attack NAME`).

A case file is `attacks.case.AttackCase.save` output: from a run with
`threat.save_cases: true` (runs/NAME/cases/r{round}_c{client}.pt, with its ground truth
beside it as r{round}_c{client}_truth.pt), or built by hand around a user's own model and
update. The result goes to a run directory like a federation's: metrics.csv, images/,
report.html; with no ground truth the metrics are left empty.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from rich.console import Console

from fl_sim.config import AttackConfig, parse_config
from fl_sim.results import RunDirectory


def parse_params(items: list[str] | dict | None) -> dict:
    """`key=value` strings (values parsed as YAML: numbers, lists, booleans) to a dict."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"attack setting {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_truth(path: Path, image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ground truth from a .pt (a tensor, or {"images", "labels"}) or an image file (a strip of
    images side by side, as the run directory's PNGs, 1-pixel white gaps allowed)."""
    if not path.exists():
        raise FileNotFoundError(f"truth file {path} does not exist")
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            labels = obj.get("labels")
            return obj["images"].float(), (None if labels is None else torch.as_tensor(labels).long())
        return torch.as_tensor(obj).float(), None
    img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    c, h, w = image_shape
    if img.shape[1] == h + 2 and img.shape[2] % (w + 1) == 1:  # make_grid padding of 1
        n = (img.shape[2] - 1) // (w + 1)
        tiles = [img[:, 1:1 + h, 1 + i * (w + 1):1 + i * (w + 1) + w] for i in range(n)]
    elif img.shape[1] == h and img.shape[2] % w == 0:
        tiles = [img[:, :, i * w:(i + 1) * w] for i in range(img.shape[2] // w)]
    else:
        raise ValueError(f"{path} is {img.shape[2]}x{img.shape[1]} px; expected a strip of {w}x{h} images")
    return torch.stack(tiles)[:, :c], None


def attack_case_file(case_path: Path, attack: str, params: list[str] | dict | None = None, out: Path | None = None,
                     truth: Path | None = None, device: str = "cpu") -> RunDirectory:
    from attacks.case import AttackCase
    from server.attack_runner import AttackRunner, RunnerEvents, build

    console = Console()
    case_path = Path(case_path)
    if not case_path.exists():
        raise FileNotFoundError(f"case file {case_path} does not exist")
    case = AttackCase.load(case_path)
    attack_cfg = AttackConfig(name=attack, params=parse_params(params))
    build(attack_cfg, where="--param")  # a bad name or setting fails before anything is written
    if truth is None:
        beside = case_path.with_name(case_path.stem + "_truth.pt")
        truth = beside if beside.exists() else None
    truth_images, truth_labels = load_truth(Path(truth), case.image_shape) if truth else (None, None)

    config = parse_config({"name": f"attack-{case_path.stem}", "device": device,
                           "model": {"name": case.model_name}, "attacks": [attack_cfg.model_dump()]})
    if out is None:
        out = Path("runs") / f"attack-{case_path.stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run = RunDirectory.create(out, config)
    console.print(f"run directory: [bold]{run.path}[/]")
    console.print(f"threat model: {case.describe()}", highlight=False)
    if truth_images is None:
        console.print("no ground truth given: metrics are left empty")

    last = [0.0]

    def on_iteration(task, it, total, loss):
        import time

        now = time.monotonic()
        if now - last[0] > 5 or it == total:
            last[0] = now
            console.print(f"  {attack_cfg.key}: iteration {it}/{total}  loss {loss:.4g}", highlight=False)

    runner = AttackRunner(run, [attack_cfg], config.metrics, device, 1, events=RunnerEvents(on_iteration=on_iteration))
    rnd, client = int(case.meta.get("round", 0)), int(case.meta.get("client", 0))
    records = runner.submit(case, truth_images, truth_labels, rnd, client)
    from server.session import print_summary

    print_summary(run, console)
    for rec in records:
        console.print(f"reconstruction: {run.path / rec.image}")
    try:
        from fl_sim.report import write_report
    except ImportError:
        pass
    else:
        console.print(f"report: [bold]{write_report(run)}[/]")
    run.close()
    return run


__all__ = ["attack_case_file", "parse_params", "load_truth"]
