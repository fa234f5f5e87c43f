"""`fl-sim`: run experiments, manage assets, rebuild reports, attack saved cases, benchmark."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from fl_sim.environment import set_quiet_environment
from fl_sim.face_detection import ALIGNMENTS

console = Console(stderr=False)
err = Console(stderr=True)

set_quiet_environment()  # before Flower and Ray load


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------
# assets


def cmd_assets_list(args: argparse.Namespace) -> int:
    from fl_sim import assets

    table = Table(title=f"assets (cache: {assets.home()})")
    for col in ("name", "source", "size", "fetched"):
        table.add_column(col, no_wrap=True)
    table.add_column("licence", overflow="fold")
    table.add_column("what", overflow="fold")
    for a in assets.ASSETS.values():
        fetched = "[green]yes[/]" if assets.is_fetched(a) else "[yellow]no[/]"
        table.add_row(a.name, a.requirement, f"{a.size_mb:.1f} MB", fetched, a.licence, a.description)
    console.print(table)
    return 0


def cmd_assets_fetch(args: argparse.Namespace) -> int:
    from fl_sim import assets

    names = args.names or list(assets.ASSETS)
    for name in names:
        asset = assets.lookup(name)
        already = assets.is_fetched(asset) and not args.force
        path = assets.fetch(name, force=args.force)
        console.print(f"{'ok' if already else 'fetched'} {name:14s} {asset.requirement:26s} {path}")
    return 0


# ---------------------------------------------------------------------------------------
# run, report, attack


def cmd_run(args: argparse.Namespace) -> int:
    from fl_sim import api

    if args.resume:
        if args.config or args.overrides:
            raise UsageError("--resume takes the run directory only; its config.yaml is reused")
        api.resume(args.resume)
        return 0
    if not args.config:
        raise UsageError("give a config file (for example configs/demo.yaml) or --resume RUN_DIR")
    api.run(args.config, out=args.out, overrides=args.overrides, device=args.device)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from datetime import datetime

    from server.sweep import load_sweep, open_sweep, run_sweep

    if args.resume:
        if args.sweep:
            raise UsageError("--resume takes the sweep directory only; its sweep.yaml is reused")
        out = Path(args.resume)
        sweep = open_sweep(out, None)
    else:
        if not args.sweep:
            raise UsageError("give a sweep file (for example configs/sweeps/defenses.yaml) or --resume DIR")
        sweep = load_sweep(args.sweep)
        out = Path(args.out or f"runs/sweep-{sweep.name}-{datetime.now():%Y%m%d-%H%M%S}")
        sweep = open_sweep(out, sweep)
    console.print(f"sweep directory: [bold]{out}[/]")
    run_sweep(sweep, out, console, ray_address=args.ray)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fl_sim.config import load_config

    console.print(load_config(args.config, args.overrides).to_yaml(), end="", markup=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fl_sim.report import write_report
    from fl_sim.results import RunDirectory

    path = write_report(RunDirectory.open(args.run))
    console.print(f"report: [bold]{path}[/]")
    return 0


BLACKBOX_ATTACKS = ("eigenface", "blobs")  # `fl-sim attack NAME --oracle URL ...`; else NAME is a case file


def cmd_attack(args: argparse.Namespace) -> int:
    from server.offline import parse_params

    if args.case in BLACKBOX_ATTACKS:
        return _attack_oracle(args, parse_params(args.params))
    if not args.attack:
        raise UsageError("attacking a case file needs --attack NAME (a gradient attack from the registry); "
                         f"a black-box attack is one of {', '.join(BLACKBOX_ATTACKS)} with --oracle URL")
    from fl_sim import api

    api.attack_case(args.case, args.attack, parse_params(args.params), out=args.out, truth=args.truth,
                    device=args.device)
    return 0


def _attack_oracle(args: argparse.Namespace, params: dict) -> int:
    """A similarity-only attack against a running oracle service."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from attacks.oracle import HttpOracle
    from server.blackbox import run_blackbox

    missing = [flag for flag, value in (("--oracle", args.oracle), ("--key", args.key), ("--target", args.target))
               if not value]
    if missing:
        raise UsageError(f"fl-sim attack {args.case} needs {', '.join(missing)}")
    if args.budget is not None:
        params["budget"] = args.budget
    out = Path(args.out or f"runs/{args.case}-{args.target}")
    resumed = (out / "search.ckpt").exists()
    with HttpOracle(args.oracle, args.key, args.target) as oracle, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} "
                                                                            "queries, best {task.fields[best]:.3f}"),
            TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task(f"{args.case} -> {args.target}", total=params.get("budget", 25_000), best=float("nan"))
        if resumed:
            err.print(f"resuming the search saved in {out / 'search.ckpt'}")
        result, summary = run_blackbox(args.case, oracle, args.target, out, params,
                                       progress=lambda q, total, best: bar.update(task, completed=q, total=total,
                                                                                  best=best))
    console.print(f"{summary.attack} against {summary.target}: best similarity {summary.similarity:.3f} after "
                  f"{summary.queries:,} queries ({summary.stopped_by}), {summary.seconds:.0f} s; "
                  f"reconstruction and trajectory in [bold]{out}[/]")
    return 0


def cmd_eigenfaces_train(args: argparse.Namespace) -> int:
    from server.eigenface_training import train_command

    return train_command(args, console)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    # benchmarks/ sits beside the packages in the source tree (not installed as a package of
    # its own, to keep a generic name out of site-packages).
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(BENCHES[args.what])
    return int(module.main(args.rest) or 0)


BENCHES = {
    "attack": "benchmarks.attack_speed",
    "central": "benchmarks.central",
    "critic": "benchmarks.critic_calibration",
    "federation": "benchmarks.federation_speed",
    "dfleak": "benchmarks.dfleak_table",
    "oracle": "benchmarks.oracle_speed",
    "eigenface": "benchmarks.eigenface_table",
    "landscape": "benchmarks.landscape",
}


RESTORER_TRAINERS = {  # action -> module with main(argv)
    "train": "attacks.restorers.train",  # the DDPM face model of `restorer: diffusion`
    "train-artefact": "server.artefact_training",  # the network of `restorer: artefact-net`
}


def cmd_restorer_train(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(RESTORER_TRAINERS[args.action]).main(args.rest) or 0)


# ---------------------------------------------------------------------------------------
# oracle: the similarity-oracle service (server/oracle; imported inside the commands)


def cmd_oracle_serve(args: argparse.Namespace) -> int:
    from server.oracle.app import serve
    from server.oracle.settings import load_settings

    serve(load_settings(args.config, host=args.host, port=args.port, db=args.db))
    return 0


def cmd_oracle_keys_create(args: argparse.Namespace) -> int:
    from server.oracle.store import Store

    key_id, key = Store(args.db).create_key(args.role, budget=args.budget)
    err.print(f"created {args.role} key {key_id} in {args.db}; it is shown once, keep it:")
    console.print(key, markup=False, highlight=False)
    return 0


def cmd_oracle_enroll(args: argparse.Namespace) -> int:
    from server.oracle.backend import Backend
    from server.oracle.enroll import dataset_identities, enroll, folder_identities, load_files
    from server.oracle.store import IdentityExists, Store

    if args.images and not args.id:
        raise UsageError("--images needs --id (the identity the images show)")
    if args.id and not args.images:
        raise UsageError("--id goes with --images")
    store = Store(args.db)
    backend = Backend(args.backend)
    if args.images:
        jobs = [(args.id, lambda: load_files([Path(f) for f in args.images], backend.size, args.aligner))]
    elif args.folder:
        jobs = [(name, lambda files=files: load_files(files[: args.per_identity], backend.size, args.aligner))
                for name, files in folder_identities(Path(args.folder))]
    else:
        jobs = [(name, lambda crops=crops: crops)
                for name, crops in dataset_identities(args.dataset, backend.size, args.per_identity)]
    done = skipped = 0
    for identity, crops in jobs:
        if store.has_identity(identity):
            if not args.skip_existing:
                raise IdentityExists(f"identity {identity!r} is already enrolled in {args.db} "
                                     "(--skip-existing to pass over it)")
            skipped += 1
            continue
        record = enroll(store, backend, identity, crops())
        done += 1
        console.print(f"enrolled {record.id} ({record.images} images)", markup=False, highlight=False)
    console.print(f"{done} enrolled, {skipped} already there; {store.count_identities()} identities in {args.db}")
    return 0


def _add_oracle_parser(sub: argparse._SubParsersAction) -> None:
    oracle = sub.add_parser("oracle", help="the similarity-oracle service: serve, keys, enroll")
    osub = oracle.add_subparsers(dest="oracle_command", required=True, metavar="ACTION")

    serve = osub.add_parser("serve", help="run the HTTP service (uvicorn)")
    serve.add_argument("--config", help="YAML settings (host, port, db, backend, limits); defaults without")
    serve.add_argument("--host", help="override the settings' host")
    serve.add_argument("--port", type=int, help="override the settings' port")
    serve.add_argument("--db", help="override the settings' db")
    serve.set_defaults(fn=cmd_oracle_serve)

    keys = osub.add_parser("keys", help="API keys (only their sha256 is stored)")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = ksub.add_parser("create", help="create a key and print it once")
    create.add_argument("--role", required=True, choices=["admin", "query"])
    create.add_argument("--db", default="oracle.sqlite", help="the oracle's store (default oracle.sqlite)")
    create.add_argument("--budget", type=int, help="images this key may have scored (default: the service's)")
    create.set_defaults(fn=cmd_oracle_keys_create)

    enroll = osub.add_parser("enroll", help="enroll identities directly in the store (no server needed)")
    enroll.add_argument("--db", default="oracle.sqlite", help="the oracle's store (default oracle.sqlite)")
    what = enroll.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", metavar="FILE", help="images of one identity (with --id)")
    what.add_argument("--folder", help="a folder with one sub-folder of images per identity")
    what.add_argument("--dataset", choices=["orl"], help="a registered data set, one identity per person")
    enroll.add_argument("--id", help="the identity's id, [A-Za-z0-9_.-]{1,64} (with --images)")
    enroll.add_argument("--per-identity", type=int, help="use only the first N images of each identity")
    enroll.add_argument("--backend", default="sface-bf16", help="face-recognition backend (the service's)")
    enroll.add_argument("--aligner", default="resize", help="how images become crops (as the service)")
    enroll.add_argument("--skip-existing", action="store_true", help="pass over identities already enrolled")
    enroll.set_defaults(fn=cmd_oracle_enroll)


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-sim",
        description="Audit how much federated-learning clients leak of their face images.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment: federation, attacks, report")
    run.add_argument("config", nargs="?", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    run.add_argument("--out", help="run directory (default runs/<config>-<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    run.add_argument("--device", help="cpu or cuda (overrides the config)")
    run.set_defaults(fn=cmd_run)

    sweep = sub.add_parser("sweep", help="defense x strength x attack: leakage, accuracy, the privacy-utility chart")
    sweep.add_argument("sweep", nargs="?", help="a sweep file, e.g. configs/sweeps/defenses.yaml")
    sweep.add_argument("--out", help="sweep directory (default runs/sweep-<name>-<timestamp>); an existing "
                                     "one with the same sweep continues")
    sweep.add_argument("--resume", metavar="DIR", help="continue a stopped sweep")
    sweep.add_argument("--ray", metavar="ADDRESS", help="run the points as tasks on a Ray cluster "
                                                        "(\"auto\" or host:port; DIR on shared storage)")
    sweep.set_defaults(fn=cmd_sweep)

    cfg = sub.add_parser("config", help="print a config with every default filled in")
    cfg.add_argument("config")
    cfg.add_argument("overrides", nargs="*")
    cfg.set_defaults(fn=cmd_config)

    assets_p = sub.add_parser("assets", help="list or fetch weights and data sets")
    asub = assets_p.add_subparsers(dest="assets_command", required=True, metavar="ACTION")
    asub.add_parser("list", help="name, source, size, licence, fetched or not").set_defaults(fn=cmd_assets_list)
    fetch = asub.add_parser("fetch", help="fetch assets (all when none named)")
    fetch.add_argument("names", nargs="*")
    fetch.add_argument("--force", action="store_true", help="fetch again even when present")
    fetch.set_defaults(fn=cmd_assets_fetch)

    rep = sub.add_parser("report", help="rebuild report.html of a run")
    rep.add_argument("run")
    rep.set_defaults(fn=cmd_report)

    att = sub.add_parser("attack", help="attack a saved case file offline, or an oracle service "
                                        "(`attack eigenface|blobs --oracle URL --key KEY --target ID`)")
    att.add_argument("case", help="a case file (AttackCase.save), or a black-box attack: eigenface, blobs")
    att.add_argument("--attack", help="gradient attack name from the registry (for a case file)")
    att.add_argument("--param", dest="params", action="append", default=[], help="key=value attack setting")
    att.add_argument("--oracle", help="black-box: the oracle service's URL, e.g. http://127.0.0.1:8765")
    att.add_argument("--key", help="black-box: a query key of the service")
    att.add_argument("--target", help="black-box: the enrolled identity to reconstruct")
    att.add_argument("--budget", type=int, help="black-box: queries in all (default 25000)")
    att.add_argument("--truth", help="optional ground-truth images (.pt or .png) for metrics")
    att.add_argument("--out", help="output run directory")
    att.add_argument("--device", default="cpu")
    att.set_defaults(fn=cmd_attack)

    bench = sub.add_parser("bench", help="print speed and memory figures")
    bench.add_argument("what", choices=sorted(BENCHES))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark")
    bench.set_defaults(fn=cmd_bench)

    restorer = sub.add_parser("restorer", help="DFLeak's face restorers: `restorer train` trains the offline "
                                               "diffusion model on public faces, `restorer train-artefact CONFIG` "
                                               "the artefact-removal network on the attacker's own attacks")
    restorer.add_argument("action", choices=sorted(RESTORER_TRAINERS))
    restorer.add_argument("rest", nargs=argparse.REMAINDER, help="options of the action (train --help lists them)")
    restorer.set_defaults(fn=cmd_restorer_train)

    eig = sub.add_parser("eigenfaces", help="the eigenface basis of the black-box attack: `eigenfaces train`")
    esub = eig.add_subparsers(dest="eigenfaces_command", required=True, metavar="ACTION")
    train = esub.add_parser("train", help="train the basis on public faces (progress, checkpoints, resume)")
    train.add_argument("--out", default="runs/eigenfaces", help="output folder (basis.pt, eigenfaces.png, "
                                                                 "report.html; a checkpoint there resumes)")
    train.add_argument("--preset", choices=["authors-code", "paper"], default="authors-code",
                       help="soft-symmetry and generative-regularisation weights as published")
    train.add_argument("--dataset", default="synthetic", help="the public faces: a registered data set "
                                                               "(default: DCGAN faces, never a client's)")
    train.add_argument("--root", help="the data set's folder (image-folder, lfw, celeba)")
    train.add_argument("--faces", type=int, default=4000, help="public faces to train on (default 4000)")
    train.add_argument("--alignment", choices=ALIGNMENTS, default="none",
                       help="yunet: align the faces onto SFace's template first, as a service that aligns "
                            "would (faces YuNet finds none in are left out)")
    train.add_argument("--param", dest="params", action="append", default=[],
                       help="key=value training setting: components, symmetry, generative_weight, iterations, "
                            "batch, lr, weight_decay, grey, seed")
    train.set_defaults(fn=cmd_eigenfaces_train)

    _add_oracle_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from fl_sim.assets import AssetError
    from fl_sim.config import ConfigError
    from fl_sim.results import RunExists

    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.fn
    try:
        return handler(args)
    except (ConfigError, UsageError, RunExists, FileNotFoundError, KeyError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc.args[0] if exc.args else exc}", highlight=False, soft_wrap=True)
        return 2
    except AssetError as exc:
        err.print(f"[red]asset error:[/] {exc}", highlight=False, soft_wrap=True)
        return 3
    except KeyboardInterrupt:
        err.print("interrupted; finished work is saved (continue with --resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
