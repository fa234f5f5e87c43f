"""DFLeak vs its ablations vs InvertG on the same victims: a Table II / Table V style table.

    python benchmarks/dfleak_table.py [--config configs/bench/dfleak.yaml] [--iterations N]
    fl-sim bench dfleak [same options]

The victims, model, data, public set and attacks come from the bench config (by default
configs/bench/dfleak.yaml); the cases are built the way the federation builds them in its
first attacked round, without running Flower: the server's global model (seeded as the
server seeds it), each explicit victim's FedSGD batch (`client_sample`), its gradient
computed as the client computes it (cross-entropy, named_parameters order) and an
`AttackCase` with exactly the fields the server's strategy fills. Every (victim, attack)
result is saved as it finishes, so a stopped run continues with --resume.

BatchNorm: `--bn eval` (default) computes the client's gradient with frozen BatchNorm
(running statistics), as inversefed and DFLeak's released code (model.eval()) do; `--bn
train` uses batch statistics, what a client training normally does. At batch size 1 and
64 px ResNet18's last BatchNorm layers normalise over 2 x 2 maps and the gradient becomes
chaotic in the input (a 0.1 % perturbation of the true image already gives a cosine loss
of 0.4), so no optimisation attack gets anywhere in that setting.

Writes into --out: table.csv (mean and std per method), victims.csv (one row per victim
and method), table.md (with the paper's numbers beside ours), grid.png (victims x
methods), and results/*.pt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("psnr", "mse", "lpips", "ssim")

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


def build_cases(config, bn_mode: str, limit: int | None = None):
    """[(partition id, case, truth images, truth labels)] for the config's explicit victims in
    its first attacked round."""
    from attacks.case import AttackCase
    from fl_sim.federated_data import build_federated_data, client_sample
    from fl_sim.models import build_model

    if config.federation.algorithm != "fedsgd":
        raise ValueError("this benchmark builds FedSGD cases; set federation.algorithm: fedsgd")
    if config.threat.victims.mode != "explicit" or not config.threat.victims.ids:
        raise ValueError("this benchmark needs threat.victims.mode: explicit with ids")
    data = build_federated_data(config)
    torch.manual_seed(config.seed)  # as the server builds its global model
    model = build_model(config.model.name, data.num_classes, config.model.weights)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rnd = config.threat.rounds[0]
    ds = data.dataset
    out = []
    for pid in config.threat.victims.ids[:limit]:
        idx = torch.as_tensor(client_sample(config, data, pid, rnd))
        images, labels = ds.images[idx], ds.labels[idx]
        net = build_model(config.model.name, data.num_classes)
        net.load_state_dict(weights)
        net.train(bn_mode == "train")
        inputs = ds.normalise(images)
        named = list(net.named_parameters())
        loss = F.cross_entropy(net(inputs), labels)
        grads = torch.autograd.grad(loss, [p for _, p in named])
        update = {n: g.detach().clone() for (n, _), g in zip(named, grads)}
        case = AttackCase(model_name=config.model.name, num_classes=data.num_classes,
                          image_shape=tuple(images.shape[1:]), weights=weights, update=update,
                          update_kind="gradient", num_images=len(idx), mean=ds.mean, std=ds.std,
                          labels=labels.clone() if config.threat.labels_known else None, grey=ds.grey,
                          meta={"round": rnd, "client": pid, "dataset": ds.name}, bn_mode=bn_mode)
        out.append((pid, case, images, labels, ds.identities[idx].tolist()))
    return data, out


def public_images(config, data) -> torch.Tensor:
    from fl_sim.federated_data import public_set

    return public_set(config, data).images


def run_one(attack_cfg, case, public, iterations: int | None, threads: int):
    from attacks.registry import build_attack, config_fields

    params = dict(attack_cfg.params)
    if iterations:
        params["iterations"] = iterations
    if "public_images" in config_fields(attack_cfg.name) and params.get("public_images") is None:
        params["public_images"] = public
    if threads:
        torch.set_num_threads(threads)
    attack = build_attack(attack_cfg.name, **params)
    last = [time.perf_counter()]

    def progress(it, total, loss):
        now = time.perf_counter()
        if now - last[0] > 30 or it == total:
            last[0] = now
            print(f"    {it}/{total} loss {loss:.4f}", flush=True)

    return attack.run(case, progress=progress)


def grid(path: Path, rows: list[torch.Tensor], row_names: list[str], col_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, m = len(rows), len(col_names)
    fig, axes = plt.subplots(n, m, figsize=(1.3 * m, 1.3 * n + 0.3), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(m):
            ax = axes[i][j]
            img = row[j].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img, cmap="gray" if img.shape[2] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_names[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row_names[i], fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(records: list[dict], order: list[str]):
    import pandas as pd

    frame = pd.DataFrame(records)
    agg = frame.groupby("attack")[list(METRICS) + ["seconds", "it_per_s"]].agg(["mean", "std"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    agg["victims"] = frame.groupby("attack").size()
    agg = agg.reindex([a for a in order if a in agg.index]).reset_index()
    return frame, agg


def markdown(agg, meta: dict) -> str:
    lines = [f"ORL {meta['size']} px, {meta['model']}, FedSGD batch {meta['batch']}, BatchNorm {meta['bn']}, "
             f"{meta['victims']} victims, {meta['iterations']} iterations per attack "
             f"(the paper: 5000); mean ± std over victims. SSIM: standard Gaussian-window SSIM "
             f"(the paper's code reports complex-wavelet SSIM).", "",
             "| method | PSNR | MSE | LPIPS | SSIM | s / victim |", "|---|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        lines.append(f"| {r['attack']} | {r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} | {r['mse_mean']:.4f} | "
                     f"{r['lpips_mean']:.4f} | {r['ssim_mean']:.4f} | {r['seconds_mean']:.0f} |")
    lines += ["", "Paper, Table II (ResNet18 gender classifier, batch 1, 5000 iterations, GPU):", "",
              "| data | size | method | PSNR | MSE | LPIPS | SSIM (CW-SSIM) |", "|---|---|---|---|---|---|---|"]
    for (d, s, m), v in PAPER_TABLE_II.items():
        lines.append(f"| {d} | {s} | {m} | {v[0]:.2f} | {v[1]:.4f} | {v[2]:.4f} | {v[3]:.4f} |")
    lines += ["", "Paper, Table V (CelebA-HQ 112, PSNR): " +
              ", ".join(f"{k} {v:.2f}" for k, v in PAPER_TABLE_V.items())]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfleak_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench" / "dfleak.yaml"))
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p.add_argument("--out", help="output directory (default runs/dfleak-table-<timestamp>)")
    p.add_argument("--resume", help="continue an output directory")
    p.add_argument("--iterations", type=int, help="override every attack's iterations")
    p.add_argument("--victims", type=int, help="only the first N victims")
    p.add_argument("--attacks", help="comma-separated attack labels to run (default: all in the config)")
    p.add_argument("--bn", choices=["eval", "train"], default="eval",
                   help="the client's BatchNorm mode (default eval: frozen, as inversefed's and DFLeak's code)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return p


def main(argv: list[str] | None = None) -> int:
    from fl_sim.config import load_config
    from fl_sim.metrics import image_metrics

    args = build_parser().parse_args(argv)
    if args.resume:
        out = Path(args.resume)
        saved = json.loads((out / "bench.json").read_text())
        args = build_parser().parse_args(saved["argv"])
        args.out = str(out)
    else:
        out = Path(args.out or f"runs/dfleak-table-{datetime.now():%Y%m%d-%H%M%S}")
        if (out / "bench.json").exists():
            print(f"{out} already holds a benchmark; continue it with --resume {out}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"argv": list(argv if argv is not None else sys.argv[1:])}))
    (out / "results").mkdir(exist_ok=True)
    config = load_config(args.config, args.overrides)
    attacks = [a for a in config.attacks if not args.attacks or a.key in args.attacks.split(",")]
    data, cases = build_cases(config, args.bn, args.victims)
    public = public_images(config, data)
    print(f"{len(cases)} victims x {len(attacks)} attacks; {cases[0][1].describe()}", flush=True)
    records: list[dict] = []
    rows, names = [], []
    for pid, case, truth, labels, ident in cases:
        row = [truth[0]]
        for a in attacks:
            path = out / "results" / f"client{pid}_{a.key}.pt"
            if path.exists():
                saved = torch.load(path, weights_only=False)
            else:
                print(f"client {pid} (identity {ident[0]}): {a.key}", flush=True)
                result = run_one(a, case, public, args.iterations, args.threads)
                m = image_metrics(result.images, truth, names=list(METRICS))
                saved = {"images": result.images, "metrics": {k: float(np.mean(v)) for k, v in m.items()},
                         "seconds": result.seconds, "iterations": result.iterations,
                         "it_per_s": result.extras.get("it_per_s", 0.0), "extras": result.extras,
                         "label_ok": bool(torch.equal(result.labels.sort().values, labels.sort().values))}
                torch.save(saved, path)
                print(f"  {a.key}: " + " ".join(f"{k} {v:.4f}" for k, v in saved["metrics"].items())
                      + f"  {saved['seconds']:.0f} s", flush=True)
            records.append({"client": pid, "identity": ident[0], "attack": a.key, **saved["metrics"],
                            "seconds": saved["seconds"], "iterations": saved["iterations"],
                            "it_per_s": saved["it_per_s"], "label_ok": saved["label_ok"],
                            **{f"x_{k}": v for k, v in saved["extras"].items()
                               if k in ("trigger_iteration", "init_index", "init_feature_distance",
                                        "restore_seconds", "best_loss")}})
            row.append(saved["images"][0])
        rows.append(row)
        names.append(f"client {pid}")
    frame, agg = summarise(records, [a.key for a in attacks])
    frame.to_csv(out / "victims.csv", index=False)
    agg.to_csv(out / "table.csv", index=False)
    iterations = args.iterations or attacks[0].params.get("iterations", 5000)
    meta = {"size": config.data.image_size, "model": config.model.name, "batch": config.federation.batch_size,
            "bn": args.bn, "victims": len(cases), "iterations": iterations}
    (out / "table.md").write_text(markdown(agg, meta))
    grid(out / "grid.png", rows, names, ["ground truth"] + [a.key for a in attacks])
    print(markdown(agg, meta))
    print(f"written: {out}/table.csv, victims.csv, table.md, grid.png")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
