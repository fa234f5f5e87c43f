"""DFLeak vs its ablations vs InvertG on the same victims: a Table II / Table V style table
with paired statistics.

    fl-sim bench dfleak [--config configs/bench/dfleak.yaml] [key.sub=value ...] [--out DIR]
    fl-sim bench dfleak --split dev              # the development victims (for choosing settings)
    fl-sim bench dfleak --shard 0/2 --out D &    # shards of one run, started together
    fl-sim bench dfleak --shard 1/2 --out D      #   (the last one to finish writes the table)
    fl-sim bench dfleak --resume D               # continue a stopped run, then tabulate

Victims: the config's `threat.victims.ids` are the evaluation victims the table reports on;
`threat.victims.dev_ids` are the development victims on which settings (select rule,
restorer, epsilon...) are chosen by looking at reconstructions. `--split` picks one; a run
directory holds one split.

Cases come from the product's one pipeline (`server.cases.simulate_victims`): each victim's
reply from the ClientApp's own `local_update` (BatchNorm mode, defenses and all) and the
strategy's `make_case`. Attacks go through the federation's attack runner, so every finished
(victim, attack) is in the run's results store at once and a resumed or sharded run never
redoes one. An attack runs on all of a shard's victims as one batch (attacks.multi; each
victim's result is its result alone, up to rounding); a victim's seconds are its share of
the batch, and the table prints each method's victim-iterations per second.

The run directory is a `fl-sim run` directory (config.yaml, metrics.csv, images/,
report.html) plus table.csv (mean and std per method), victims.csv (one row per victim and
method, with DFLeak's diagnostics), comparisons.csv (each method against the reference
method, victim by victim: mean paired difference, 95 % CI, wins/ties/losses, n), table.md
(all of it with the paper's numbers beside ours) and grid.png (victims x methods).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("psnr", "mse", "lpips", "ssim", "id_similarity", "id_rank1", "id_rank")
BENCH_FILE = "bench.json"

# DFLeak paper, Table II (ResNet18 gender classifier, batch 1) and Table V (CelebA-HQ 112).
PAPER_TABLE_II = {
    ("CelebA-HQ", 112, "invertg"): (19.34, 0.0252, 0.2763, 0.6124),
    ("CelebA-HQ", 112, "dfleak"): (22.66, 0.0078, 0.1600, 0.6848),
    ("LFW", 112, "invertg"): (18.34, 0.0267, 0.4086, 0.5871),
    ("LFW", 112, "dfleak"): (20.35, 0.0109, 0.3082, 0.6458),
    ("CelebA-HQ", 56, "invertg"): (22.58, 0.0064, 0.0925, 0.7769),
    ("CelebA-HQ", 56, "dfleak"): (24.49, 0.0048, 0.0631, 0.8074),
}
PAPER_TABLE_V = {"dfleak-no-init": 20.54, "dfleak-no-restore": 21.56, "dfleak-no-schedule": 22.48, "dfleak": 22.66}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-sim bench dfleak", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench" / "dfleak.yaml"))
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p.add_argument("--out", help="run directory (default runs/dfleak-<split>-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue a run directory of this benchmark, then tabulate")
    p.add_argument("--split", choices=["eval", "dev"], default="eval",
                   help="evaluation victims (threat.victims.ids) or development victims (dev_ids)")
    p.add_argument("--iterations", type=int, help="every attack's iterations")
    p.add_argument("--victims", type=int, help="only the first N victims of the split")
    p.add_argument("--attacks", help="comma-separated attack labels (default: all in the config)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--shard", help="i/n: only victims i, i+n, ... of the split (shards share --out)")
    return p


# ---------------------------------------------------------------------------------------
# The bench's config: the experiment config with the bench's choices applied


def resolve(args: argparse.Namespace):
    """The config this benchmark runs (attacks filtered, iterations set) and its victims."""
    from fl_sim.config import ConfigError, load_config
    from server.leakage import select_attacks

    config = select_attacks(load_config(args.config, args.overrides),
                            args.attacks.split(",") if args.attacks else None, args.iterations)
    victims = config.threat.victims
    if victims.mode != "explicit":
        raise ConfigError("threat.victims.mode: this benchmark needs explicit victims (ids, and dev_ids to tune on)")
    ids = list(victims.ids if args.split == "eval" else victims.dev_ids)
    if not ids:
        raise ConfigError(f"threat.victims.{'ids' if args.split == 'eval' else 'dev_ids'}: no victims for --split "
                          f"{args.split}")
    return config, ids[: args.victims] if args.victims else ids


def open_run(args: argparse.Namespace, argv: list[str]):
    """(args, config, victims, run directory). A new --out is created; a shard joins the
    directory of its siblings when they run the same config; --resume reopens one."""
    from fl_sim.config import ConfigError
    from fl_sim.results import RunDirectory, RunExists
    from server.preflight import preflight

    resuming = bool(args.resume)
    if resuming:
        out = Path(args.resume)
        if not (out / BENCH_FILE).exists():
            raise ConfigError(f"{out} holds no DFLeak benchmark (no {BENCH_FILE})")
        shard, threads = args.shard, args.threads
        args = build_parser().parse_args(json.loads((out / BENCH_FILE).read_text())["argv"])
        args.out, args.shard, args.threads = str(out), shard, threads
    config, victims = resolve(args)
    preflight(config)
    out = Path(args.out or f"runs/dfleak-{args.split}-{datetime.now():%Y%m%d-%H%M%S}")
    if (out / "config.yaml").exists():
        same = RunDirectory.open(out).config() == config
        if resuming or (args.shard and same):
            return args, config, victims, RunDirectory.open(out)
        hint = "its config differs" if args.shard else f"continue it with --resume {out}"
        raise ConfigError(f"{out} already holds a run; {hint}")
    try:
        run = RunDirectory.create(out, config)
    except RunExists:  # a sibling shard made it a moment ago
        return args, config, victims, RunDirectory.open(out)
    # Shard-free arguments: every shard and a later --resume share them.
    keep = [a for i, a in enumerate(argv) if not (a == "--shard" or a.startswith("--shard=")
                                                  or (i > 0 and argv[i - 1] == "--shard")
                                                  or a == "--threads" or (i > 0 and argv[i - 1] == "--threads"))]
    (out / BENCH_FILE).write_text(json.dumps({"argv": keep}))
    return args, config, victims, run


# ---------------------------------------------------------------------------------------
# Running


def attack_victims(args, config, victims: list[int], run) -> None:
    import torch

    from fl_sim.federated_data import federated_data
    from server.leakage import measure_leakage, printing_events

    if args.threads:
        torch.set_num_threads(args.threads)
    mine = victims
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        mine = victims[i::n]
    data = federated_data(config)
    rnd = config.threat.rounds[0]
    who = lambda client: f"client {client} (identity {identity(config, data, client, rnd)})"  # noqa: E731
    for rnd_, client, key, error in measure_leakage(config, mine, run, printing_events(who)):
        print(f"failed: client {client} {key}: {error}", flush=True)


# ---------------------------------------------------------------------------------------
# Tabulating


def identity(config, data, client: int, rnd: int) -> int:
    """The person in a victim's (first) image."""
    from fl_sim.federated_data import client_sample

    return int(data.dataset.identities[int(client_sample(config, data, client, rnd)[0])])


def victim_frame(config, victims: list[int], run):
    """One row per (victim, method) of this benchmark, DFLeak's diagnostics as columns."""
    import pandas as pd

    from fl_sim.federated_data import federated_data

    frame = run.metrics_frame()
    rnd = config.threat.rounds[0]
    frame = frame[(frame["round"] == rnd) & frame["client"].isin(victims)].copy()
    data = federated_data(config)
    frame.insert(2, "identity", [identity(config, data, c, rnd) for c in frame["client"]])
    diag = pd.DataFrame([json.loads(d) if d else {} for d in frame["diagnostics"]], index=frame.index)
    keep = [c for c in ("trigger_iteration", "restoration_events", "replaced_share", "init_index",
                        "init_feature_distance", "restore_seconds") if c in diag]
    return pd.concat([frame.drop(columns=["diagnostics"]), diag[keep].add_prefix("x_")], axis=1)


def method_order(config, frame) -> list[str]:
    present = list(dict.fromkeys(frame["attack"]))
    main = [a.key for a in config.attacks if a.key in present]
    return main + [m for m in present if m not in main]


def summarise(frame, order: list[str]):
    agg = frame.groupby("attack")[list(METRICS) + ["seconds"]].agg(["mean", "std"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    agg["victims"] = frame.groupby("attack").size()
    # Throughput: a victim's seconds are its share of the batch when victims ran together.
    agg["victim_it_per_s"] = frame.groupby("attack")["iterations"].sum() / frame.groupby("attack")["seconds"].sum()
    return agg.reindex([a for a in order if a in agg.index]).reset_index()


def describe(config, split: str, victims: list[int], iterations) -> str:
    from fl_sim.federated_data import federated_data

    fed = config.federation
    return (f"{config.data.name} at {config.data.image_size} px, {config.model.name}, FedSGD batch {fed.batch_size}, "
            f"BatchNorm {fed.bn_mode}, {len(victims)} {'evaluation' if split == 'eval' else 'development'} victims "
            f"(clients {', '.join(map(str, victims))}), {iterations} iterations per attack (the paper: 5000). "
            "SSIM: standard Gaussian-window SSIM (the paper's code reports complex-wavelet SSIM). "
            "Rows named `method [policy]` are the same runs returned by another `select` policy. "
            f"Rank-1: the critic ({config.metrics.id_backend}) names the victim first among all "
            f"{len({i for i in federated_data(config).dataset.identities.tolist() if i >= 0})} identities of the data set, each known "
            "from its other images (chance: one in that many); id rank: the victim's place in the critic's "
            "ordering of them (a reconstruction that carries no identity lands near the middle).")


def markdown(agg, comparisons, header: str) -> str:
    from fl_sim.stats import comparison_markdown

    lines = [header, "", "Mean ± std over victims:", "",
             "| method | PSNR ↑ | MSE ↓ | LPIPS ↓ | SSIM ↑ | id similarity ↑ | rank-1 ↑ | id rank ↓ | s / victim | victim-it/s | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        lines.append(f"| {r['attack']} | {r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} | {r['mse_mean']:.4f} | "
                     f"{r['lpips_mean']:.3f} ± {r['lpips_std']:.3f} | {r['ssim_mean']:.3f} | "
                     f"{r['id_similarity_mean']:.3f} ± {r['id_similarity_std']:.3f} | {r['id_rank1_mean']:.0%} | "
                     f"{r['id_rank_mean']:.1f} | {r['seconds_mean']:.0f} | {r['victim_it_per_s']:.1f} | "
                     f"{int(r['victims'])} |")
    speed = dict(zip(agg["attack"], agg["victim_it_per_s"]))
    if "dfleak" in speed and "invertg" in speed:
        lines += ["", f"Throughput (victim-iterations per second, a round's victims attacked together, restoration "
                      f"included): DFLeak {speed['dfleak']:.1f}, InvertG {speed['invertg']:.1f}: DFLeak at "
                      f"{speed['dfleak'] / speed['invertg']:.0%} of InvertG."]
    lines += ["", "Paired, victim by victim:", "", comparison_markdown(comparisons)]
    lines += ["", "The paper, Table II (ResNet18 gender classifier, batch 1, 5000 iterations, GPU):", "",
              "| data | size | method | PSNR | MSE | LPIPS | SSIM (CW-SSIM) |", "|---|---|---|---|---|---|---|"]
    for (d, s, m), v in PAPER_TABLE_II.items():
        lines.append(f"| {d} | {s} | {m} | {v[0]:.2f} | {v[1]:.4f} | {v[2]:.4f} | {v[3]:.4f} |")
    lines += ["", "The paper, Table V (CelebA-HQ 112 px, PSNR): " +
              ", ".join(f"{k} {v:.2f}" for k, v in PAPER_TABLE_V.items())]
    return "\n".join(lines) + "\n"


def grid(path: Path, run, frame, order: list[str]) -> None:
    """Victims (rows) x ground truth and every method (columns)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    victims = list(dict.fromkeys(frame["client"]))
    cols = ["ground truth"] + order
    tiles = {}  # (row, column) -> image; a FedAvg client's images come as one strip of tiles
    for i, client in enumerate(victims):
        rows = frame[frame["client"] == client].set_index("attack")
        for j, col in enumerate(cols):
            rel = rows["truth_image"].iloc[0] if col == "ground truth" else rows["image"].get(col, "")
            if rel:
                tiles[i, j] = np.asarray(Image.open(run.path / rel).convert("RGB"))
    # Rows as tall as their strips are wide: a client of 3 images gets a taller row than one of
    # 5 instead of a thin strip between wide gaps (every column as wide as the widest strip).
    aspect = [max((t.shape[1] / t.shape[0] for (r, _), t in tiles.items() if r == i), default=1.0)
              for i in range(len(victims))]
    width = min(1.3 * max(aspect), 18.0 / len(cols))
    heights = [width / a for a in aspect]
    fig, axes = plt.subplots(len(victims), len(cols), figsize=(width * len(cols), sum(heights) + 0.3),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    for i, client in enumerate(victims):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            if (i, j) in tiles:
                ax.imshow(tiles[i, j])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:  # wrapped: 'method [policy]' labels are wider than a tile
                name, _, policy = col.partition(" [")
                ax.set_title("\n".join(textwrap.wrap(name, 16) + ([f"[{policy}"] if policy else [])), fontsize=6)
            if j == 0:
                ax.set_ylabel(f"client {client}", fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_sections(agg, comparisons, header: str, grid_png: Path) -> list[tuple[str, str]]:
    import pandas as pd

    from fl_sim.report import _file_uri
    from fl_sim.stats import comparison_frame

    ours = pd.DataFrame({
        "method": agg["attack"],
        "PSNR ↑": [f"{m:.2f} ± {s:.2f}" for m, s in zip(agg["psnr_mean"], agg["psnr_std"])],
        "MSE ↓": agg["mse_mean"].map("{:.4f}".format),
        "LPIPS ↓": agg["lpips_mean"].map("{:.3f}".format),
        "SSIM ↑": agg["ssim_mean"].map("{:.3f}".format),
        "id similarity ↑": agg["id_similarity_mean"].map("{:.3f}".format),
        "rank-1 ↑": agg["id_rank1_mean"].map("{:.0%}".format),
        "id rank ↓": agg["id_rank_mean"].map("{:.1f}".format),
        "s / victim": agg["seconds_mean"].map("{:.0f}".format),
        "victim-it/s": agg["victim_it_per_s"].map("{:.1f}".format),
    })
    paired = comparison_frame(comparisons)
    paper = pd.DataFrame([{"data": d, "size": z, "method": m, "PSNR": v[0], "MSE": v[1], "LPIPS": v[2],
                           "SSIM (CW-SSIM)": v[3]} for (d, z, m), v in PAPER_TABLE_II.items()])
    ablation = ", ".join(f"{k} {v:.2f}" for k, v in PAPER_TABLE_V.items())
    table_html = (
        f"<p class='sub'>{header}</p>" + ours.to_html(index=False, border=0)
        + "<p class='sub'>Paired, victim by victim (method minus reference; 95 % t interval):</p>"
        + paired.to_html(index=False, border=0, float_format="{:.4f}".format)
        + "<p class='sub'>The paper, Table II (ResNet18 gender classifier, batch 1, 5000 iterations, GPU):</p>"
        + paper.to_html(index=False, border=0, float_format="{:.4f}".format)
        + f"<p class='sub'>The paper, Table V (CelebA-HQ 112 px, PSNR): {ablation}.</p>"
    )
    grid_html = (f"<figure><img src='{_file_uri(grid_png)}' alt='victims x methods' style='max-width:100%'>"
                 "<figcaption>Each victim's ground truth and every method's reconstruction</figcaption></figure>")
    return [("DFLeak, its ablations and InvertG (Table II / Table V)", table_html),
            ("Reconstructions, victims x methods", grid_html)]


def tabulate(args, config, victims: list[int], run) -> bool:
    """Write the tables and the report when every (victim, attack) is done; False if not yet."""
    from fl_sim.report import reference_attack, write_report
    from fl_sim.stats import comparison_frame, paired_comparisons

    rnd = config.threat.rounds[0]
    done = run.done_attacks()
    missing = [(pid, a.key) for pid in victims for a in config.attacks if (rnd, pid, a.key) not in done]
    if missing:
        return False
    out = run.path
    frame = victim_frame(config, victims, run)
    order = method_order(config, frame)
    agg = summarise(frame, order)
    reference = reference_attack(config, frame)
    comparisons = paired_comparisons(frame, reference, ("psnr", "lpips", "ssim", "id_similarity"))
    iterations = config.attacks[0].params.get("iterations", 5000)
    header = describe(config, args.split, victims, iterations)
    frame.to_csv(out / "victims.csv", index=False)
    agg.to_csv(out / "table.csv", index=False)
    comparison_frame(comparisons).to_csv(out / "comparisons.csv", index=False)
    text = markdown(agg, comparisons, header)
    (out / "table.md").write_text(text)
    grid(out / "grid.png", run, frame, order)
    report = write_report(run, report_sections(agg, comparisons, header, out / "grid.png"))
    print(text)
    print(f"written: {out}/table.csv, victims.csv, comparisons.csv, table.md, grid.png; report: {report}")
    return True


def main(argv: list[str] | None = None) -> int:
    from fl_sim.config import ConfigError

    argv = list(argv if argv is not None else sys.argv[1:])
    try:
        args, config, victims, run = open_run(build_parser().parse_args(argv), argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        attack_victims(args, config, victims, run)
        if not tabulate(args, config, victims, run):
            print(f"shard {args.shard} done; the table is written when the last shard finishes "
                  f"(or by --resume {run.path})")
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
