"""`fl-sim restorer train-artefact CONFIG`: train the `artefact-net` restorer offline.

What the attacker does, with nothing but what it has: its own public faces (the DCGAN faces,
a seed disjoint from D_c and from every client) and the global model it is about to attack.

1. **Artefacts.** It plays a client holding each public face (FedSGD, batch 1, the config's
   BatchNorm mode, a random label) and attacks the update with InvertG, `--chunk` faces at a
   time as one batched attack. The iterates at a few points of the run (`--snapshots`) are the degraded
   inputs; the face is the target. This is the part that takes minutes.
2. **Training.** The UNet learns to map an iterate back to its face (L1). Each batch mixes
   the real pairs with *transplanted* ones: a face plus another face's artefact
   (x_t - x), flipped, which multiplies the pairs without another attack.
3. **Held-out check.** A tenth of the faces never train the network; the summary reports the
   PSNR of their iterates before and after restoration.

Resumable at both stages: the artefact bank is saved once made (`bank.pt`), the training
writes `checkpoint.pt` every `--checkpoint-every` steps and on Ctrl-C (`--resume`). A resume
with settings other than the ones the bank or the checkpoint were made with stops, naming them
(`--steps` may grow: the training continues).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from attacks.restorers.artefact import WEIGHTS, RestorationNet, default_model_dir, save_network

BANK = "bank.pt"
CHECKPOINT = "checkpoint.pt"
# What each stage's result depends on: a resumed run must have the same values, or it would
# silently train on another run's artefacts (or load a checkpoint of another network).
BANK_OPTIONS = ("config", "overrides", "faces", "face_seed", "iterations", "snapshots", "seed")
TRAINING_OPTIONS = ("width", "batch", "lr", "transplant", "held_out", "seed")  # --steps may grow


@dataclass
class ArtefactSettings:
    config: str
    overrides: list[str] = field(default_factory=list)
    out: str = ""
    faces: int = 64
    face_seed: int = 4242  # the DCGAN latents' seed: disjoint from D_c (2024) and the demo's clients
    iterations: int = 600
    chunk: int = 16  # faces attacked as one batch (64 at once at 64 px: about 10 GB)
    snapshots: str = "75,150,300,600"
    width: int = 32
    steps: int = 1500
    batch: int = 16
    lr: float = 1e-3
    transplant: float = 0.5  # share of each batch made of another face's artefact
    held_out: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    device: str = "cpu"

    def snapshot_list(self) -> list[int]:
        try:
            its = sorted({int(s) for s in self.snapshots.split(",")})
        except ValueError:
            raise ValueError(f"--snapshots must be comma-separated integers, got {self.snapshots!r}") from None
        if not its or its[0] < 1 or its[-1] > self.iterations:
            raise ValueError(f"--snapshots must lie in 1..--iterations ({self.iterations}), got {self.snapshots!r}")
        return its


# --------------------------------------------------------------------------------------------
# 1. the artefact bank
# --------------------------------------------------------------------------------------------
def _snapshotting_invertg(snapshots: list[int], store: dict[int, dict[int, torch.Tensor]], iterations: int):
    """InvertG that keeps each victim's iterate at the given iterations (keyed by case id)."""
    from attacks.baselines import InvertG
    from attacks.registry import build_attack

    attack = build_attack("invertg", iterations=iterations)
    wanted = set(snapshots)

    class Snapshotting(type(attack)):  # type: ignore[misc]
        def on_iterations(self, ctxs, it, xs, losses):  # noqa: ANN001
            # `it` counts from 0; the image after `it + 1` steps is the one handed in here.
            if it + 1 in wanted:
                for ctx, x in zip(ctxs, xs):
                    store.setdefault(id(ctx.case), {})[it + 1] = x.detach().clamp(0, 1).cpu().clone()
            return [None] * len(ctxs)

    assert isinstance(attack, InvertG)
    return Snapshotting(attack.config)


def attacker_faces(settings: ArtefactSettings, shape: tuple[int, int, int], grey: bool) -> torch.Tensor:
    """The attacker's training faces in the case's image shape, (N, C, H, W) in [0, 1]."""
    from attacks.init_search import load_public_faces, public_for_case

    faces = load_public_faces("synthetic", max(shape[1:]), settings.faces, settings.face_seed)
    return public_for_case(faces, shape, grey)


def make_bank(settings: ArtefactSettings, progress: bool = True) -> dict:
    """Attack the attacker's own faces under the config's model; (faces, iterates) per snapshot."""
    from rich.console import Console

    from attacks.multi import invert_together
    from attacks.synthetic import make_case
    from fl_sim.config import load_config
    from server.cases import simulate_victims

    console = Console(stderr=True)
    config = load_config(settings.config, settings.overrides)
    template = simulate_victims(config, [0])[0].case  # the global model, normalisation and shape
    faces = attacker_faces(settings, template.image_shape, template.grey)
    g = torch.Generator().manual_seed(settings.seed)
    labels = torch.randint(0, template.num_classes, (len(faces),), generator=g)
    cases = [make_case(template.model_name, template.num_classes, faces[i:i + 1], labels[i:i + 1],
                       mean=template.mean, std=template.std, grey=template.grey, weights=template.weights,
                       bn_mode=template.bn_mode, seed=settings.seed) for i in range(len(faces))]
    snapshots = settings.snapshot_list()
    store: dict[int, dict[int, torch.Tensor]] = {}
    attack = _snapshotting_invertg(snapshots, store, settings.iterations)
    console.print(f"artefacts: InvertG on {len(cases)} public faces, {settings.chunk} at a time, "
                  f"{settings.iterations} iterations "
                  f"({config.model.name}, {template.image_shape[1]} px, snapshots at {snapshots})")
    t0 = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from attacks.base import CallbackProgress

    columns = [TextColumn("[bold]artefacts"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("artefacts", total=settings.iterations * len(cases), loss="-")
        for start in range(0, len(cases), settings.chunk):
            part = cases[start:start + settings.chunk]
            report = CallbackProgress(lambda it, total, loss, done=start * settings.iterations, k=len(part):
                                      bar.update(task, completed=done + it * k, loss=f"{loss:.3f}"))
            invert_together(attack, part, progress=report, device=settings.device)
            if not progress:  # a log without the bar still shows how far the bank has come
                console.print(f"artefacts: {start + len(part)}/{len(cases)} faces attacked "
                              f"({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    iterates = torch.stack([torch.cat([store[id(c)][s] for s in snapshots]) for c in cases])  # (N, S, C', H, W)
    c = iterates.shape[2]
    faces = faces[:, :c] if c < faces.shape[1] else faces
    console.print(f"artefacts: done in {seconds:.0f} s ({len(cases) * settings.iterations / seconds:.1f} "
                  "victim-iterations/s)")
    return {"faces": faces, "iterates": iterates, "snapshots": snapshots, "labels": labels,
            "seconds": seconds, "settings": {k: getattr(settings, k) for k in BANK_OPTIONS}, "model": config.model.name, "weights": config.model.weights,
            "image_shape": list(template.image_shape), "bn_mode": template.bn_mode}


# --------------------------------------------------------------------------------------------
# 2. training
# --------------------------------------------------------------------------------------------
def check_resumed(recorded: dict, settings: ArtefactSettings, options: tuple[str, ...], what: str) -> None:
    """Stop with the options whose values differ from the ones `what` was made with."""
    differ = [o for o in options if o in recorded and recorded[o] != getattr(settings, o)]
    if differ:
        listed = ", ".join(f"--{o.replace('_', '-')} {recorded[o]!r} (now {getattr(settings, o)!r})" for o in differ)
        raise ValueError(f"{what} was made with {listed}; resume with the same values or choose another --out")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def _batch(faces: torch.Tensor, iterates: torch.Tensor, n: int, transplant: float, g: torch.Generator):
    """n (input, target) pairs: real pairs, and a face plus another face's flipped artefact."""
    nf, ns = iterates.shape[:2]
    i = torch.randint(0, nf, (n,), generator=g)
    s = torch.randint(0, ns, (n,), generator=g)
    target = faces[i]
    artefact = iterates[i, s] - faces[i]
    moved = torch.rand(n, generator=g) < transplant
    if moved.any():
        j = torch.randint(0, nf, (n,), generator=g)
        other = iterates[j, s] - faces[j]
        other = torch.where((torch.rand(n, generator=g) < 0.5).view(-1, 1, 1, 1), other.flip(-1), other)
        artefact = torch.where(moved.view(-1, 1, 1, 1), other, artefact)
    flip = (torch.rand(n, generator=g) < 0.5).view(-1, 1, 1, 1)
    target = torch.where(flip, target.flip(-1), target)
    artefact = torch.where(flip, artefact.flip(-1), artefact)
    return (target + artefact).clamp(0, 1), target


def held_out_psnr(net: RestorationNet, faces: torch.Tensor, iterates: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR of the held-out iterates (all snapshots) before and after restoration."""
    with torch.no_grad():
        x = iterates.flatten(0, 1)
        y = faces.repeat_interleave(iterates.shape[1], 0)
        return float(psnr(x, y).mean()), float(psnr(net(x).clamp(0, 1), y).mean())


def train(settings: ArtefactSettings, resume: bool = False, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    out = Path(settings.out or default_model_dir()).expanduser()
    if (out / CHECKPOINT).exists() and not resume:
        raise FileExistsError(f"{out} already holds a checkpoint; continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    bank_path = out / BANK
    if bank_path.exists():
        bank = torch.load(bank_path, weights_only=False)
        # banks made before the settings were recorded carry at least their snapshots and size
        recorded = bank.get("settings", {"snapshots": ",".join(map(str, bank["snapshots"])), "faces": len(bank["faces"])})
        check_resumed(recorded, settings, BANK_OPTIONS, f"{bank_path}")
        console.print(f"artefacts: reusing {bank_path.name} ({len(bank['faces'])} faces)")
    else:
        bank = make_bank(settings, progress)
        torch.save(bank, bank_path.with_suffix(".tmp"))
        os.replace(bank_path.with_suffix(".tmp"), bank_path)
    faces, iterates = bank["faces"].float(), bank["iterates"].float()
    n_hold = max(1, int(round(settings.held_out * len(faces))))
    train_faces, train_its = faces[n_hold:], iterates[n_hold:]
    hold_faces, hold_its = faces[:n_hold], iterates[:n_hold]

    torch.manual_seed(settings.seed)
    net = RestorationNet(faces.shape[1], settings.width).to(settings.device)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)

    def cosine(at: int) -> float:
        # From the step count and this run's --steps alone (LambdaLR keeps no length in its
        # state): a resume with more steps follows the longer cosine to its end, where
        # CosineAnnealingLR would keep the old length from its state and climb again past it.
        return 0.5 * (1 + math.cos(math.pi * min(at, settings.steps) / settings.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    g = torch.Generator().manual_seed(settings.seed + 1)
    step = 0
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        check_resumed(state.get("settings", {}), settings, TRAINING_OPTIONS, f"{ckpt}")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict({"lr_lambdas": [None], **state["scheduler"]})  # a CosineAnnealingLR state has none
        g.set_state(state["generator"])
        step = int(state["step"])

    def checkpoint() -> None:
        state = {"net": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "generator": g.get_state(), "step": step, "settings": asdict(settings)}
        torch.save(state, ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)

    columns = [TextColumn("[bold]artefact-net"), BarColumn(), MofNCompleteColumn(),
               TextColumn("L1 {task.fields[loss]}"), TimeRemainingColumn()]
    loss_ema = math.nan
    t0 = time.perf_counter()
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("train", total=settings.steps, completed=step, loss="-")
            while step < settings.steps:
                x, y = _batch(train_faces, train_its, settings.batch, settings.transplant, g)
                loss = F.l1_loss(net(x.to(settings.device)), y.to(settings.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                v = float(loss.detach())
                loss_ema = v if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * v
                bar.update(task, completed=step, loss=f"{loss_ema:.4f}")
                if step % settings.checkpoint_every == 0:
                    checkpoint()
                    if not progress:
                        console.print(f"artefact-net: step {step}/{settings.steps}, L1 {loss_ema:.4f}")
    except KeyboardInterrupt:
        checkpoint()
        raise
    checkpoint()
    net = net.cpu().eval()
    before, after = held_out_psnr(net, hold_faces, hold_its)
    meta = {"model": bank["model"], "weights": bank["weights"], "image_shape": bank["image_shape"],
            "bn_mode": bank["bn_mode"], "snapshots": bank["snapshots"], "iterations": settings.iterations,
            "faces": len(faces), "face_seed": settings.face_seed, "steps": step,
            "held_out_psnr_before": before, "held_out_psnr_after": after}
    sha = save_network(net, out / WEIGHTS, meta)
    summary = {**meta, "sha256": sha, "train_seconds": time.perf_counter() - t0,
               "artefact_seconds": bank["seconds"], "settings": asdict(settings)}
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"held-out public faces ({n_hold}): attack iterates {before:.2f} dB -> restored {after:.2f} dB")
    return summary


def build_parser() -> argparse.ArgumentParser:
    d = ArtefactSettings(config="")
    p = argparse.ArgumentParser(prog="fl-sim restorer train-artefact",
                                description="Train the artefact-net restorer on the attacker's own attacks of "
                                            "its public faces, under CONFIG's model (offline).")
    p.add_argument("config", help="the experiment config the attack will run under (its model and resolution)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. model.weights=RUN/global_model.pt)")
    p.add_argument("--out", help="output directory (default: <FL_SIM_HOME>/restorers/artefact-net)")
    p.add_argument("--faces", type=int, default=d.faces, help="public faces to attack")
    p.add_argument("--face-seed", type=int, default=d.face_seed, help="seed of the DCGAN latents (disjoint from D_c)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="InvertG iterations per face")
    p.add_argument("--snapshots", default=d.snapshots, help="iterations whose iterates are kept, comma-separated")
    p.add_argument("--chunk", type=int, default=d.chunk, help="faces attacked together as one batch (memory)")
    p.add_argument("--width", type=int, default=d.width, help="UNet width (w, 2w, 4w)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--transplant", type=float, default=d.transplant)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--device", default=d.device)
    p.add_argument("--resume", action="store_true", help="continue from --out's bank and checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from attacks.restorers.train import run_training_command

    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress")}
    values["out"] = values["out"] or ""

    def work() -> str:
        settings = ArtefactSettings(**values)
        settings.snapshot_list()
        if min(settings.faces, settings.steps, settings.batch, settings.width, settings.checkpoint_every,
               settings.chunk) < 1:
            raise ValueError("--faces, --steps, --batch, --width, --chunk and --checkpoint-every must be >= 1")
        if settings.faces < 2:
            raise ValueError("--faces must be >= 2 (one is held out)")
        summary = train(settings, resume=args.resume, progress=not args.no_progress)
        where = Path(settings.out or default_model_dir()) / WEIGHTS
        return (f"artefact-net: [bold]{where}[/] (sha256 {summary['sha256'][:16]}...); use it with "
                f"restorer: artefact-net, restorer_params: {{model: {where}}}")

    return run_training_command(work)


if __name__ == "__main__":
    raise SystemExit(main())
