"""`fl-sim restorer train`: train a small DDPM face model offline, for the `diffusion` restorer.

No registry ships a face diffusion model, so the offline default is trained here on public
faces: by default 1000 faces of the DCGAN generator (the `synthetic` data set, seed 2024,
disjoint from client data), 32 px, a small UNet (channels 32-64-64, one ResNet layer per
block), 1000-step linear DDPM schedule, epsilon prediction, AdamW, EMA of the weights.
The defaults train in a few minutes on 2 CPU cores; the result is a coarse face prior, not
the paper's FFHQ DifFace model (give `restorer_params.model` a real one when you have it).

Checkpoints (`checkpoint.pt`: model, EMA, optimiser, step, RNG) are written every
`--checkpoint-every` steps and on Ctrl-C; `--resume` continues from one. Each checkpoint
also exports the EMA model as a diffusers pipeline directory (`unet/`, `scheduler/`,
`model_index.json`) that the restorer loads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    out: str
    data: str = "synthetic"
    images: int = 1000
    data_seed: int = 2024
    size: int = 32
    grey: bool = False
    steps: int = 2000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    channels: str = "32,64,64"
    layers_per_block: int = 1
    attention: bool = False
    timesteps: int = 1000
    ema: float = 0.995
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "cpu"
    threads: int = 0

    def channel_list(self) -> tuple[int, ...]:
        try:
            ch = tuple(int(c) for c in self.channels.split(","))
        except ValueError:
            raise ValueError(f"--channels must be comma-separated integers, got {self.channels!r}") from None
        if not ch or any(c < 1 or c % 8 for c in ch):
            raise ValueError(f"--channels must be positive multiples of 8, got {self.channels!r}")
        return ch


def build_unet(s: TrainSettings):
    from diffusers import UNet2DModel

    ch = s.channel_list()
    down = ["DownBlock2D"] * len(ch)
    up = ["UpBlock2D"] * len(ch)
    if s.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = math.gcd(*ch, 32) if len(ch) > 1 else math.gcd(ch[0], 32)
    return UNet2DModel(sample_size=s.size, in_channels=1 if s.grey else 3, out_channels=1 if s.grey else 3,
                       block_out_channels=ch, layers_per_block=s.layers_per_block, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=groups)


def build_scheduler(s: TrainSettings):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=s.timesteps, beta_schedule="linear")


def training_images(s: TrainSettings) -> torch.Tensor:
    """The public faces to train on, (N, C, size, size) in [-1, 1]."""
    from fl_sim.data import DataSpec, load_dataset

    options: dict[str, float | int | str] = {"identities": s.images} if s.data == "synthetic" else {}
    ds = load_dataset(DataSpec(s.data, s.size, options=options, seed=s.data_seed,
                               max_images=None if s.data == "synthetic" else s.images))
    x = ds.images[: s.images].float()
    if s.grey:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    return x * 2 - 1


def export(out: Path, unet, scheduler) -> None:
    """The model as a diffusers pipeline directory (written beside, then swapped in)."""
    from diffusers import DDPMPipeline

    tmp = out / ".export"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    for name in ("unet", "scheduler", "model_index.json"):
        target = out / name
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(tmp / name, target)
    tmp.rmdir()


def save_checkpoint(out: Path, step: int, model, ema, opt, settings: TrainSettings, gen: torch.Generator,
                    scheduler) -> None:
    state = {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "settings": asdict(settings), "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)
    export(out, ema, scheduler)
    (out / "training.json").write_text(json.dumps({"step": step, **asdict(settings)}, indent=2))


def train(s: TrainSettings, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> Path:
    """Train (or continue) and return the output directory. Without the progress bar (a log
    file, CI), `log` gets the step, loss and rate at every checkpoint instead."""
    import copy

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out).expanduser()
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a checkpoint; continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    model = build_unet(s).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    scheduler = build_scheduler(s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed)
    step = 0
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = TrainSettings(**state["settings"])
        for key in ("size", "grey", "channels", "layers_per_block", "attention", "timesteps"):
            if getattr(saved, key) != getattr(s, key):
                raise ValueError(f"--{key.replace('_', '-')} differs from the checkpoint's "
                                 f"({getattr(saved, key)!r}); the model cannot change shape on resume")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
    data = training_images(s).to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    n = data.shape[0]
    columns = [TextColumn("[bold]ddpm"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    t0 = time.perf_counter()
    start = step
    loss_ema = float("nan")
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("train", total=s.steps, completed=step, loss="-", rate="")
            while step < s.steps:
                idx = torch.randint(0, n, (s.batch,), generator=gen)
                x0 = data[idx.to(device)]
                flip = torch.rand(s.batch, generator=gen) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1).to(device), x0.flip(-1), x0)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.randint(0, s.timesteps, (s.batch,), generator=gen).to(device)
                a = alphas[t].view(-1, 1, 1, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                loss = F.mse_loss(model(xt, t).sample, noise)
                for group in opt.param_groups:
                    group["lr"] = s.lr * min(1.0, (step + 1) / max(s.warmup, 1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - s.ema)
                step += 1
                value = float(loss.detach())
                loss_ema = value if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * value
                rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=step, loss=f"{loss_ema:.4f}", rate=f"{rate:.1f} it/s")
                if step % s.checkpoint_every == 0 or step == s.steps:
                    save_checkpoint(out, step, model, ema, opt, s, gen, scheduler)
                    if not progress:
                        log(f"ddpm: step {step}/{s.steps}, loss {loss_ema:.4f}, {rate:.1f} it/s, "
                            f"{time.perf_counter() - t0:.0f} s")
    except KeyboardInterrupt:
        save_checkpoint(out, step, model, ema, opt, s, gen, scheduler)
        raise
    if not (out / "unet").exists():  # resumed at or past the last step
        save_checkpoint(out, step, model, ema, opt, s, gen, scheduler)
    return out


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings(out="")
    p = argparse.ArgumentParser(prog="fl-sim restorer train",
                                description="Train a small DDPM face model for the diffusion restorer (offline).")
    p.add_argument("--out", help="output directory (default: <FL_SIM_HOME>/restorers/ddpm-faces, "
                                 "where the diffusion restorer looks)")
    p.add_argument("--data", default=d.data, help="data set to train on (default: synthetic DCGAN faces)")
    p.add_argument("--images", type=int, default=d.images, help="number of training faces")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the data set (synthetic: the latents)")
    p.add_argument("--size", type=int, default=d.size, help="resolution in pixels")
    p.add_argument("--grey", action="store_true", help="train a one-channel model")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--channels", default=d.channels, help="UNet block widths, comma-separated")
    p.add_argument("--layers-per-block", type=int, default=d.layers_per_block)
    p.add_argument("--attention", action="store_true", help="self-attention in the lowest-resolution block")
    p.add_argument("--timesteps", type=int, default=d.timesteps, help="DDPM schedule length")
    p.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the exported weights")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: leave as is)")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_training_command(work: Callable[[], str]) -> int:
    """A trainer command's exit: bad settings are one error line and code 2, Ctrl-C leaves the
    saved checkpoint and code 130; `work` validates, trains and returns the closing line."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        done = work()
    except (ValueError, FileExistsError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; the checkpoint is saved (continue with --resume)")
        return 130
    console.print(done)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        from attacks.restorers.diffusion import default_model_dir

        args.out = str(default_model_dir())
    values = {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress")}

    def work() -> str:
        settings = TrainSettings(**values)
        blocks = len(settings.channel_list())
        if settings.size < 8 or settings.size % (2 ** (blocks - 1)):
            raise ValueError(f"--size {settings.size} must be >= 8 and divisible by {2 ** (blocks - 1)} for {blocks} blocks")
        if settings.steps < 1 or settings.batch < 1 or settings.checkpoint_every < 1:
            raise ValueError("--steps, --batch and --checkpoint-every must be >= 1")
        out = train(settings, resume=args.resume, progress=not args.no_progress)
        return f"diffusion face model: [bold]{out}[/] (restorer `diffusion` loads it by default)"

    return run_training_command(work)


if __name__ == "__main__":
    raise SystemExit(main())
