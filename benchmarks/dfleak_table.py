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

BatchNorm: `--bn` defaults to the config's `federation.bn_mode`; `eval` computes the client's gradient with frozen BatchNorm
(running statistics), as inversefed and DFLeak's released code (model.eval()) do; `--bn
train` uses batch statistics, what a client training normally does. At batch size 1 and
64 px ResNet18's last BatchNorm layers normalise over 2 x 2 maps and the gradient becomes
chaotic in the input (a 0.1 % perturbation of the true image already gives a cosine loss
of 0.4), so no optimisation attack gets anywhere in that setting.

--out is a run directory like `fl-sim run`'s (config.yaml with the BatchNorm mode used,
metrics.csv, images/, report.html), plus table.csv (mean and std per method, the Table II /
Table V layout), victims.csv (one row per victim and method), table.md (with the paper's
numbers beside ours), grid.png (victims x methods, also in the report) and results/*.pt
(each finished attack, what --resume skips).
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

    return attack, attack.run(case, progress=progress)


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
             f"(the paper's code reports complex-wavelet SSIM). Rows marked [paper select] are the same "
             f"runs with the paper's rule (the lowest-loss iterate of the whole run) instead of the "
             f"config's `select`.", "",
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
    p.add_argument("--bn", choices=["eval", "train"],
                   help="the client's BatchNorm mode (default: the config's federation.bn_mode)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--shard", help="i/n: only victims i, i+n, ... (run n processes on one --out, then --resume "
                                   "without --shard to tabulate)")
    return p


def report_sections(agg, meta: dict, grid_png: Path) -> list[tuple[str, str]]:
    """The Table II / Table V comparison and the picture grid, for report.html."""
    import pandas as pd

    from fl_sim.report import _file_uri

    ours = pd.DataFrame({
        "method": agg["attack"],
        "PSNR ↑": [f"{m:.2f} ± {s:.2f}" for m, s in zip(agg["psnr_mean"], agg["psnr_std"])],
        "MSE ↓": agg["mse_mean"].map("{:.4f}".format),
        "LPIPS ↓": agg["lpips_mean"].map("{:.4f}".format),
        "SSIM ↑": agg["ssim_mean"].map("{:.4f}".format),
        "s / victim": agg["seconds_mean"].map("{:.0f}".format),
    })
    paper = pd.DataFrame([{"data": d, "size": z, "method": m, "PSNR": v[0], "MSE": v[1], "LPIPS": v[2],
                           "SSIM (CW-SSIM)": v[3]} for (d, z, m), v in PAPER_TABLE_II.items()])
    ablation = ", ".join(f"{k} {v:.2f}" for k, v in PAPER_TABLE_V.items())
    table_html = (
        f"<p class='sub'>ORL {meta['size']} px, {meta['model']}, FedSGD batch {meta['batch']}, BatchNorm "
        f"{meta['bn']}, {meta['victims']} victims, {meta['iterations']} iterations per attack (the paper: "
        f"5000); mean ± std over victims. Rows marked [paper select] are the same runs with the paper's "
        f"rule (lowest loss of the whole run) instead of the config's <code>select</code>.</p>"
        + ours.to_html(index=False, border=0)
        + "<p class='sub'>The paper, Table II (ResNet18 gender classifier, batch 1, 5000 iterations, GPU):</p>"
        + paper.to_html(index=False, border=0, float_format="{:.4f}".format)
        + f"<p class='sub'>The paper, Table V (CelebA-HQ 112 px, PSNR): {ablation}.</p>"
    )
    grid_html = (f"<figure><img src='{_file_uri(grid_png)}' alt='victims x methods' style='max-width:100%'>"
                 "<figcaption>Each victim's ground truth and every method's reconstruction</figcaption></figure>")
    return [("DFLeak, its ablations and InvertG (Table II / Table V)", table_html),
            ("Reconstructions, victims x methods", grid_html)]


def _attack_record(rnd: int, pid: int, key: str, saved: dict, truth_image: str, image: str):
    from fl_sim.results import AttackRecord

    m = saved["metrics"]
    return AttackRecord(round=rnd, client=pid, attack=key, psnr=m["psnr"], mse=m["mse"], ssim=m["ssim"],
                        lpips=m["lpips"], id_similarity=m.get("id_similarity", float("nan")),
                        label_accuracy=1.0 if saved["label_ok"] else 0.0, iterations=int(saved["iterations"]),
                        seconds=float(saved["seconds"]), num_images=int(len(saved["images"])),
                        final_loss=float(saved["extras"].get("best_loss", float("nan"))),
                        image=image, truth_image=truth_image)


def _open_run(args, argv: list[str] | None):
    """(parsed args, run directory); a fresh --out is created, --resume reopens one."""
    from fl_sim.config import load_config
    from fl_sim.results import RunDirectory, RunExists

    resuming = bool(args.resume)
    if resuming:
        out = Path(args.resume)
        if not (out / "bench.json").exists():
            raise SystemExit(f"{out} holds no DFLeak benchmark (no bench.json)")
        saved = json.loads((out / "bench.json").read_text())
        shard = args.shard
        args = build_parser().parse_args(saved["argv"])
        args.out, args.shard = str(out), shard
    config = load_config(args.config, args.overrides)
    args.bn = args.bn or config.federation.bn_mode
    # config.yaml records the BatchNorm mode the gradients were computed with.
    config = config.model_copy(update={"federation": config.federation.model_copy(update={"bn_mode": args.bn})})
    if resuming:
        # A benchmark directory from before it was a run directory gets its config.yaml now.
        opener = RunDirectory.open if (Path(args.out) / "config.yaml").exists() else RunDirectory.create
        return args, config, opener(args.out, config) if opener is RunDirectory.create else opener(args.out)
    out = Path(args.out or f"runs/dfleak-table-{datetime.now():%Y%m%d-%H%M%S}")
    try:
        run = RunDirectory.create(out, config)
    except RunExists:
        raise SystemExit(f"{out} already holds a run; continue it with --resume {out}") from None
    argv_list = list(argv if argv is not None else sys.argv[1:])
    # Keep the shard out of the saved arguments: every shard and the final tabulation share them.
    saved_argv = [a for i, a in enumerate(argv_list) if a != "--shard" and (i == 0 or argv_list[i - 1] != "--shard")
                  and not a.startswith("--shard=")]
    (out / "bench.json").write_text(json.dumps({"argv": saved_argv}))
    return args, config, run


def main(argv: list[str] | None = None) -> int:
    from fl_sim.metrics import image_metrics
    from fl_sim.report import write_report

    args, config, run = _open_run(build_parser().parse_args(argv), argv)
    out = run.path
    (out / "results").mkdir(exist_ok=True)
    attacks = [a for a in config.attacks if not args.attacks or a.key in args.attacks.split(",")]
    if not attacks:
        raise SystemExit(f"--attacks {args.attacks!r} matches none of {[a.key for a in config.attacks]}")
    data, cases = build_cases(config, args.bn, args.victims)
    public = public_images(config, data)
    id_backend = config.metrics.id_backend
    rnd = config.threat.rounds[0]
    print(f"{len(cases)} victims x {len(attacks)} attacks; {cases[0][1].describe()}", flush=True)
    records: list[dict] = []
    rows, names = [], []
    for number, (pid, case, truth, labels, ident) in enumerate(cases):
        if args.shard:
            i, n = (int(v) for v in args.shard.split("/"))
            if number % n != i:
                continue
        row = [truth[0]]
        truth_image = run.save_image(f"r{rnd}_c{pid}_truth", truth)
        for a in attacks:
            path = out / "results" / f"client{pid}_{a.key}.pt"
            if path.exists():
                saved = torch.load(path, weights_only=False)
            else:
                print(f"client {pid} (identity {ident[0]}): {a.key}", flush=True)
                attack, result = run_one(a, case, public, args.iterations, args.threads)
                m = image_metrics(result.images, truth, names=list(METRICS), id_backend=id_backend)
                # DFLeak: what each `select` policy would have returned from this same run.
                alt = {policy: {k: float(np.mean(v)) for k, v in image_metrics(img, truth, names=list(METRICS)).items()}
                       for policy, img in getattr(attack, "last_candidates", {}).items()}
                saved = {"images": result.images, "metrics": {k: float(np.mean(v)) for k, v in m.items()},
                         "select": getattr(attack.config, "select", None), "candidates": alt,
                         "seconds": result.seconds, "iterations": result.iterations,
                         "it_per_s": result.extras.get("it_per_s", 0.0), "extras": result.extras,
                         "label_ok": bool(torch.equal(result.labels.sort().values, labels.sort().values))}
                torch.save(saved, path)
                print(f"  {a.key}: " + " ".join(f"{k} {v:.4f}" for k, v in saved["metrics"].items())
                      + f"  {saved['seconds']:.0f} s", flush=True)
            if id_backend and "id_similarity" not in saved["metrics"]:  # saved before it was measured
                sim = image_metrics(saved["images"], truth, names=[], id_backend=id_backend)["id_similarity"]
                saved["metrics"]["id_similarity"] = float(np.mean(sim))
                torch.save(saved, path)
            image = run.save_image(f"r{rnd}_c{pid}_{a.key}", saved["images"].detach().float().cpu().clamp(0, 1))
            run.add_attack(_attack_record(rnd, pid, a.key, saved, truth_image, image))
            metrics = {k: saved["metrics"][k] for k in METRICS}
            records.append({"client": pid, "identity": ident[0], "attack": a.key, **metrics,
                            "seconds": saved["seconds"], "iterations": saved["iterations"],
                            "it_per_s": saved["it_per_s"], "label_ok": saved["label_ok"],
                            **{f"x_{k}": v for k, v in saved["extras"].items()
                               if k in ("trigger_iteration", "init_index", "init_feature_distance",
                                        "restore_seconds", "best_loss")}})
            # The paper's selection rule (lowest loss of the whole run) from the same run, when
            # the config selected otherwise.
            if saved.get("select") not in (None, "lowest-loss") and "lowest-loss" in saved.get("candidates", {}):
                records.append({"client": pid, "identity": ident[0], "attack": f"{a.key} [paper select]",
                                **saved["candidates"]["lowest-loss"], "seconds": saved["seconds"],
                                "iterations": saved["iterations"], "it_per_s": saved["it_per_s"],
                                "label_ok": saved["label_ok"]})
            row.append(saved["images"][0])
        rows.append(row)
        names.append(f"client {pid}")
    if args.shard:
        print(f"shard {args.shard} done; tabulate with --resume {out} once every shard has finished")
        return 0
    order = [k for a in attacks for k in (a.key, f"{a.key} [paper select]")]
    frame, agg = summarise(records, order)
    frame.to_csv(out / "victims.csv", index=False)
    agg.to_csv(out / "table.csv", index=False)
    iterations = args.iterations or attacks[0].params.get("iterations", 5000)
    meta = {"size": config.data.image_size, "model": config.model.name, "batch": config.federation.batch_size,
            "bn": args.bn, "victims": len(cases), "iterations": iterations}
    (out / "table.md").write_text(markdown(agg, meta))
    grid(out / "grid.png", rows, names, ["ground truth"] + [a.key for a in attacks])
    report = write_report(run, report_sections(agg, meta, out / "grid.png"))
    print(markdown(agg, meta))
    print(f"written: {out}/table.csv, victims.csv, table.md, grid.png; report: {report}")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
