"""Similarity-only face reconstruction, eigenfaces vs Gaussian blobs, on enrolled identities:
the paper's Table 2 measured here, with an independent critic.

    fl-sim bench eigenface [--config configs/bench/eigenface.yaml] [--split eval|dev|extra] [--out DIR]
                           [--targets N] [--budget Q] [--attacks eigenface,blobs] [--workers 2]
                           [--defense NAME] [--oracle inprocess|http]

For each target identity: the oracle enrolls its first `enroll_images` images (the service's
scoring code: in process, or the real HTTP service started on loopback); each attack runs
once up to the largest budget, keeping the best image within every smaller budget, so
budgets 10k, 25k and 50k come from one run. Each reconstruction is then judged by the
critic (FaceNet, never queried): its mean cosine to the target's held-out real images, and
rank-1 identification among all enrolled identities' critic templates.

Writes into the run folder: eigenface.csv (one row per attack, target, budget: attack,
target, budget, queries, oracle_similarity, critic_similarity, rank1, then defense,
flagged_at, stopped_by), table.md (Table 2 layout beside the paper's figures, and paired
differences eigenface - blobs per budget with 95 % t intervals), trajectories.png, critic.png
(the critic's similarity against queries, between a real photo's same- and different-person
levels), grid.png and report.html; jobs/ holds each search's folder (checkpoint,
trajectory): a stopped run continues with the same --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fl_sim.face_detection import ALIGNMENTS, Alignment, align_images

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["attack", "target", "budget", "queries", "oracle_similarity", "critic_similarity", "rank1",
           "defense", "flagged_at", "stopped_by"]
# Razzhigaev et al., Table 2 (ArcFace oracle, FaceNet critic): (queries, oracle, critic)
PAPER = {"eigenface": (50_000, 0.97, 0.62), "blobs": (300_000, 0.90, 0.45)}


SPLITS = ("dev", "eval", "extra")  # settings are chosen on dev; eval and extra report


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = "orl"
    root: str | None = None
    enroll_images: int = Field(5, ge=1)
    dev_targets: list[int] = Field(default_factory=list)
    eval_targets: list[int] = Field(default_factory=list)
    # further evaluation people, never used to choose settings: `--split extra` widens the
    # evaluation beyond what the default bench fits into its two hours
    extra_targets: list[int] = Field(default_factory=list)
    budgets: list[int] = Field(default_factory=lambda: [10_000, 25_000, 50_000])
    backend: str = "sface-bf16"
    critic: str = "facenet"
    # how the photos become the 112 px crops the oracle enrolls and the critic judges: `none`
    # takes the data set's centred square as the crop; `yunet` aligns each photo onto SFace's
    # five-point template (YuNet's landmarks), as a deployed recognition service enrolls faces.
    # The attack's images are crops either way (the service passes a 112 x 112 image untouched).
    alignment: Alignment = "none"
    # name -> settings; a name other than a black-box attack's says which one in `method`
    # (e.g. `eigenface-jitter: {method: eigenface, probe_jitter: 4}`), so variants sit side by side
    attacks: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"eigenface": {}, "blobs": {}})
    defenses: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"none": {}})
    workers: int = Field(2, ge=1)
    references: list[str] = Field(default_factory=lambda: ["blobs"])  # paired comparisons against each

    @field_validator("attacks")
    @classmethod
    def _known_methods(cls, attacks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from attacks.blackbox import BLACKBOX

        for name, settings in attacks.items():
            BLACKBOX.get(settings.get("method", name))  # UnknownName: names the black-box attacks there are
        return attacks

    @model_validator(mode="after")
    def _splits_disjoint(self) -> "BenchConfig":
        # a person whose results chose the settings must not also be counted in their evaluation
        for a, b in itertools.combinations(SPLITS, 2):
            if shared := sorted(set(self.targets(a)) & set(self.targets(b))):
                raise ValueError(f"{a}_targets and {b}_targets share {shared}: the splits must be disjoint")
        return self

    def targets(self, split: str) -> list[int]:
        """The people of a split: the `<split>_targets` field, one per name in SPLITS."""
        return getattr(self, f"{split}_targets")


def load_bench_config(path: str | Path, overrides: dict[str, Any]) -> BenchConfig:
    tree = yaml.safe_load(Path(path).read_text()) or {}
    tree.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig.model_validate(tree)


@dataclass(frozen=True)
class Job:
    attack: str
    target: int
    defense: str
    params: dict
    defenses: dict
    budget: int
    budgets: tuple[int, ...]
    folder: str
    dataset: str
    root: str | None
    enroll_images: int
    backend: str
    oracle_url: str | None = None
    oracle_key: str | None = None
    alignment: str = "none"

    @property
    def method(self) -> str:
        """The black-box attack this job runs (a named variant says it in `method`)."""
        return self.params.get("method", self.attack)


# ---------------------------------------------------------------------------------------
# the data: enrolment images and held-out images per identity


@lru_cache(maxsize=2)
def faces_by_identity(dataset: str, root: str | None, size: int = 112, alignment: str = "none"):
    """{identity: (N, 3, size, size) in [0, 1]} in the data set's order (cached per process:
    alignment runs YuNet on every photo)."""
    import torch

    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(name=dataset, image_size=size, root=root))
    images = ds.images if ds.images.shape[1] == 3 else ds.images.expand(-1, 3, -1, -1)
    # every photo must align (no drop_missing): a service that aligns could not enroll one that does not
    images, _ = align_images(images, alignment, size)
    ids = ds.identities
    return {int(i): images[ids == i] for i in torch.unique(ids).tolist()}


# ---------------------------------------------------------------------------------------
# one attack on one target (a worker process)


def run_job(job: Job) -> dict:
    import torch

    torch.set_num_threads(1)
    from attacks.oracle import HttpOracle, InProcessOracle
    from fl_sim.oracle_defenses import OracleDefenses
    from server.blackbox import run_blackbox

    folder = Path(job.folder)
    done = folder / "result.json"  # written last: the job is complete
    if done.exists():
        return json.loads(done.read_text())
    faces = faces_by_identity(job.dataset, job.root, alignment=job.alignment)[job.target]
    if job.oracle_url:
        oracle = HttpOracle(job.oracle_url, job.oracle_key, f"id{job.target}")
    else:
        oracle = InProcessOracle(faces[:job.enroll_images], backend=job.backend,
                                 defenses=OracleDefenses.model_validate(job.defenses), seed=job.target)
    params = {k: v for k, v in job.params.items() if k != "method"} | {"budget": job.budget}
    result, summary = run_blackbox(job.method, oracle, f"id{job.target}", folder, params, snapshots=job.budgets)
    torch.save({b: img for b, img in result.snapshots.items()}, folder / "snapshots.pt")
    out = {"summary": summary.__dict__, "flagged_at": getattr(oracle, "flagged_at", None),
           "trajectory": result.trajectory}
    (folder / "result.json").write_text(json.dumps(out))
    return out


# ---------------------------------------------------------------------------------------
# judging the reconstructions with the critic


@dataclass(frozen=True)
class Judgement:
    frame: Any  # pandas.DataFrame, one row per attack, target, budget (COLUMNS)
    # what a real photo scores, judged as a reconstruction is (its mean cosine to held-out
    # photos): each enrolment photo against its own person's and against everyone else's
    same_person: float
    different_person: float


def judge(config: BenchConfig, jobs: list[Job], results: dict[str, dict]) -> Judgement:
    import numpy as np
    import pandas as pd
    import torch

    from attacks.score_search import best_at
    from fl_sim.faces import embedder, template_of

    critic = embedder(config.critic)
    faces = faces_by_identity(config.dataset, config.root, alignment=config.alignment)
    gallery_ids = sorted(faces)
    enrolled = {i: critic.embed(faces[i][:config.enroll_images]) for i in gallery_ids}
    held_out = {i: critic.embed(faces[i][config.enroll_images:]) for i in gallery_ids}
    gallery = np.stack([template_of(enrolled[i]) for i in gallery_ids])
    same = [float((held_out[i] @ enrolled[i].T).mean()) for i in gallery_ids]
    different = [float((held_out[j] @ enrolled[i].T).mean()) for i in gallery_ids for j in gallery_ids if j != i]
    rows = []
    for job in jobs:
        res = results[job.folder]
        snaps = torch.load(Path(job.folder) / "snapshots.pt", weights_only=True)
        for budget in job.budgets:
            emb = critic.embed(snaps[budget][None])[0]
            critic_sim = float((held_out[job.target] @ emb).mean())
            rank1 = int(gallery_ids[int(np.argmax(gallery @ emb))] == job.target)
            queries = min(budget, res["summary"]["queries"])
            rows.append([job.attack, job.target, budget, queries, best_at(res["trajectory"], budget), critic_sim,
                         rank1, job.defense, res["flagged_at"], res["summary"]["stopped_by"]])
    return Judgement(pd.DataFrame(rows, columns=COLUMNS), float(np.mean(same)), float(np.mean(different)))


def table_markdown(frame, header: str, references: Sequence[str] = ("blobs",)) -> str:
    from fl_sim.stats import comparison_markdown, paired_comparisons

    lines = [header, "", "| defense | attack | budget | targets | oracle similarity | critic similarity | rank-1 |",
             "|---|---|---|---|---|---|---|"]
    agg = frame.groupby(["defense", "attack", "budget"], sort=False).agg(
        n=("target", "size"), oracle=("oracle_similarity", "mean"), oracle_sd=("oracle_similarity", "std"),
        critic=("critic_similarity", "mean"), critic_sd=("critic_similarity", "std"), rank1=("rank1", "mean"))
    for (defense, attack, budget), r in agg.iterrows():
        lines.append(f"| {defense} | {attack} | {budget:,} | {int(r.n)} | {r.oracle:.3f} ± {r.oracle_sd:.3f} | "
                     f"{r.critic:.3f} ± {r.critic_sd:.3f} | {100 * r.rank1:.0f} % |")
    lines += ["", "Paper (Table 2; ArcFace oracle, FaceNet critic): eigenfaces 0.97 / 0.62 at 50k queries; "
                  "Gaussian blobs 0.90 / 0.45 at 300k.", ""]
    attacks = list(dict.fromkeys(frame["attack"]))
    # every attack against each configured reference that ran (none ran: the first attack)
    references = [r for r in references if r in attacks] or attacks[:1]
    for reference in references if len(attacks) > 1 else []:
        for (defense, budget), part in frame.groupby(["defense", "budget"], sort=False):
            comps = paired_comparisons(part, reference, metrics=("oracle_similarity", "critic_similarity", "rank1"),
                                       victim_columns=("target",))
            lines += [f"Paired against {reference}, defense {defense}, budget {budget:,}:", "",
                      comparison_markdown(comps), ""]
    return "\n".join(lines)


def figures(judgement: Judgement, jobs: list[Job], results: dict[str, dict], out: Path, config: BenchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from torchvision.utils import save_image

    critic_plot(judgement, out / "critic.png", config.critic)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colours = {"eigenface": "tab:blue", "blobs": "tab:orange"}
    for job in jobs:
        if not results[job.folder]["trajectory"]:  # refused from the start
            continue
        q, s = zip(*results[job.folder]["trajectory"])
        ax.plot(q, s, color=colours.get(job.attack, "grey"), alpha=0.5, lw=1,
                label=job.attack if job is next(j for j in jobs if j.attack == job.attack) else None)
    ax.set_xlabel("queries")
    ax.set_ylabel("best oracle similarity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "trajectories.png")
    plt.close(fig)

    # grid: per (defense, target) a row: a held-out real image, then each attack at each budget
    faces = faces_by_identity(config.dataset, config.root, alignment=config.alignment)
    tiles, columns = [], None
    for defense, target in dict.fromkeys((j.defense, j.target) for j in jobs):
        row = [faces[target][config.enroll_images]]
        for job in [j for j in jobs if (j.defense, j.target) == (defense, target)]:
            snaps = torch.load(Path(job.folder) / "snapshots.pt", weights_only=True)
            row += [snaps[b] for b in job.budgets]
        columns = columns or len(row)
        if len(row) == columns:
            tiles += row
    if tiles:
        save_image(torch.stack(tiles), out / "grid.png", nrow=columns, padding=2, pad_value=1.0)


def critic_plot(judgement: Judgement, path: Path, critic: str) -> None:
    """The critic's similarity at each budget, per attack and defense setting (mean, and each
    target's thin line), between what a real photo of the same person and of a stranger score:
    how close the reconstruction comes to the person as a recogniser the attack never queried sees it."""
    import matplotlib.pyplot as plt

    frame = judgement.frame
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for n, ((attack, defense), part) in enumerate(frame.groupby(["attack", "defense"], sort=False)):
        colour = f"C{n}"
        for _, one in part.groupby("target"):
            ax.plot(one["budget"], one["critic_similarity"], color=colour, alpha=0.2, lw=0.8)
        mean = part.groupby("budget")["critic_similarity"].mean()
        label = attack if defense == "none" else f"{attack} ({defense})"
        ax.plot(mean.index, mean.values, color=colour, lw=2, marker="o", label=label)
    for level, text in ((judgement.same_person, "a real photo of the person"),
                        (judgement.different_person, "a real photo of a stranger")):
        ax.axhline(level, color="black", ls="--", lw=1)
        ax.annotate(f"{text} ({level:.2f})", (0.01, level), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax.set_xlabel("queries")
    ax.set_ylabel(f"critic ({critic}) similarity to the target's photos")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path, markdown: str, jobs: list[Job]) -> None:
    import html

    budgets = ", ".join(f"{b:,}" for b in jobs[0].budgets) if jobs else ""
    attacks = ", ".join(dict.fromkeys(j.attack for j in jobs))
    body = html.escape(markdown)
    (out / "report.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>eigenface benchmark</title><style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}
pre{{white-space:pre-wrap}}</style></head><body><h1>Similarity-only reconstruction</h1>
<h2>Reconstructions</h2><p>Each row (a target, under one oracle defense setting): a held-out real
image of the target, then {attacks} at budgets {budgets}.</p>
<img src="grid.png" alt="grid" style="max-width:100%">
<h2>Best oracle similarity against queries</h2><img src="trajectories.png" alt="trajectories">
<h2>The critic's similarity against queries</h2><p>The independent critic, never queried, at each budget:
each target's line and the mean, between what a real photo of the same person and of a stranger
score.</p><img src="critic.png" alt="critic similarity against queries">
<h2>Table</h2><pre>{body}</pre></body></html>
""")


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-sim bench eigenface", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench" / "eigenface.yaml"))
    p.add_argument("--out", help="run folder (default runs/eigenface-<split>-<time>); an existing one continues")
    p.add_argument("--split", choices=SPLITS, default="eval",
                   help="the config's eval_targets, dev_targets or extra_targets")
    p.add_argument("--targets", type=int, help="only the first N targets of the split")
    p.add_argument("--budget", type=int, help="the largest budget (smaller configured budgets kept)")
    p.add_argument("--attacks", help="comma-separated attacks (default: all in the config)")
    p.add_argument("--defense", default="none",
                   help="comma-separated oracle defense settings from the config, or 'all' (default: none)")
    p.add_argument("--workers", type=int, help="parallel searches (processes)")
    p.add_argument("--alignment", choices=ALIGNMENTS,
                   help="how photos become crops (default: the config's): yunet aligns them as a service would")
    p.add_argument("--oracle", choices=["inprocess", "http"], default="inprocess",
                   help="http: start the real service on loopback and attack it over HTTP")
    p.add_argument("--param", dest="params", action="append", default=[],
                   help="attack.key=value: override one attack setting, e.g. eigenface.lr=0.05")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from server.offline import parse_params

    args = build_parser().parse_args(argv)
    console = Console()
    config = load_bench_config(args.config, {"workers": args.workers, "alignment": args.alignment})
    targets = config.targets(args.split)
    targets = targets[: args.targets] if args.targets else targets
    budgets = sorted(b for b in config.budgets if args.budget is None or b <= args.budget)
    if args.budget and args.budget not in budgets:
        budgets.append(args.budget)
    attacks = args.attacks.split(",") if args.attacks else list(config.attacks)
    defenses = list(config.defenses) if args.defense == "all" else args.defense.split(",")
    for name in attacks:
        if name not in config.attacks:
            raise SystemExit(f"unknown attack {name!r}; allowed: {', '.join(config.attacks)}")
    for name in defenses:
        if name not in config.defenses:
            raise SystemExit(f"unknown defense setting {name!r}; allowed: {', '.join(config.defenses)}")
    overrides: dict[str, dict] = {}
    for key, value in parse_params(args.params).items():
        attack, _, setting = key.partition(".")
        overrides.setdefault(attack, {})[setting] = value
    from attacks.blackbox import build_blackbox

    for name in attacks:  # a bad setting is named now, not by every worker after the run folder exists
        params = {**config.attacks[name], **overrides.get(name, {})}
        try:
            build_blackbox(params.pop("method", name), f"attack {name!r}", **params)
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"error: {exc.args[0] if exc.args else exc}") from None
    out = Path(args.out or ROOT / "runs" / f"eigenface-{args.split}-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"config": config.model_dump(), "split": args.split,
                                                "targets": targets, "budgets": budgets, "attacks": attacks,
                                                "defenses": defenses, "overrides": overrides,
                                                "oracle": args.oracle}, indent=2))
    service = None
    url = key = None
    if args.oracle == "http":
        service, url, key = start_http_oracle(out, config, targets, defenses)
    def settings(attack: str) -> dict:
        params = {**config.attacks[attack], **overrides.get(attack, {})}
        if config.alignment != "none" and params.get("method", attack) == "eigenface":
            params.setdefault("alignment", config.alignment)  # the public faces aligned as the service aligns
        return params

    jobs = [Job(a, t, d, settings(a), config.defenses[d], max(budgets),
                tuple(budgets), str(out / "jobs" / f"{d}-{a}-{t}"), config.dataset, config.root,
                config.enroll_images, config.backend, url, key, config.alignment)
            for d in defenses for t in targets for a in attacks]
    console.print(f"{len(jobs)} searches ({', '.join(attacks)} x {len(targets)} {args.split} targets x "
                  f"defenses {', '.join(defenses)}), up to {max(budgets):,} queries each, "
                  f"{config.workers} at a time, oracle {args.oracle}; [bold]{out}[/]")
    for alignment in sorted({j.params.get("alignment", "none") for j in jobs
                             if j.method == "eigenface" and not j.params.get("basis")}):
        from attacks.blackbox import default_basis

        default_basis(alignment=alignment, progress=console.print)  # trained once here, not by every worker
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=config.workers) as pool:
            futures = {pool.submit(run_job, job): job for job in jobs}
            for n, future in enumerate(as_completed(futures), 1):
                job = futures[future]
                res = future.result()
                results[job.folder] = res
                s = res["summary"]
                console.print(f"[{n}/{len(jobs)}] {job.defense:>8s} {job.attack:>9s} target {job.target:>3d}: "
                              f"best {s['similarity']:.3f} after {s['queries']:,} queries ({s['stopped_by']}), "
                              f"{s['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s in all")
    finally:
        if service is not None:
            service.terminate()
            service.wait(timeout=30)
    judgement = judge(config, jobs, results)
    frame = judgement.frame
    frame.to_csv(out / "eigenface.csv", index=False)
    header = (f"Similarity-only reconstruction of {len(targets)} {config.dataset} {args.split} identities "
              f"({config.backend} oracle over {args.oracle}, {config.critic} critic, {config.enroll_images} "
              f"enrolment images each; critic similarity = mean cosine to the target's other images; "
              f"a real photo scores {judgement.same_person:.2f} for its own person, "
              f"{judgement.different_person:.2f} for a stranger).")
    markdown = table_markdown(frame, header, config.references)
    (out / "table.md").write_text(markdown + "\n")
    figures(judgement, jobs, results, out, config)
    report(out, markdown, jobs)
    console.print(markdown, markup=False, highlight=False)
    console.print(f"eigenface.csv, table.md, grid.png, report.html in [bold]{out}[/]")
    return 0


def start_http_oracle(out: Path, config: BenchConfig, targets: list[int], defenses: list[str]):
    """The real service on loopback with the targets enrolled; (process, url, query key)."""
    import socket
    import subprocess
    import sys

    import httpx
    import numpy as np
    import torch

    from server.oracle.enroll import enroll
    from server.oracle.backend import Backend
    from server.oracle.store import Store

    if len(defenses) != 1:
        raise SystemExit("--oracle http runs one defense setting at a time (--defense NAME)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = out / "oracle.sqlite"
    store = Store(db)
    backend = Backend(config.backend, threads=1)
    faces = faces_by_identity(config.dataset, config.root, alignment=config.alignment)
    for t in targets:
        if not store.has_identity(f"id{t}"):
            crops = (faces[t][:config.enroll_images] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            enroll(store, backend, f"id{t}", np.ascontiguousarray(crops))
    backend.batcher.close()
    key = store.create_key("query")[1]
    settings = {"host": "127.0.0.1", "port": port, "db": str(db), "backend": config.backend, "threads": 2,
                "rate_per_second": 1e6, "max_batch": 256, "defenses": config.defenses[defenses[0]]}
    (out / "oracle.yaml").write_text(yaml.safe_dump(settings))
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim.cli", "oracle", "serve", "--config", str(out / "oracle.yaml")],
                            cwd=ROOT, stdout=open(out / "oracle.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return proc, url, key
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the oracle did not start; see {out / 'oracle.log'}")


if __name__ == "__main__":
    raise SystemExit(main())
