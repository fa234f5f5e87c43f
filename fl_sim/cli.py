"""`fl-sim`: run experiments, manage assets, rebuild reports, attack saved cases, benchmark."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from fl_sim.environment import set_quiet_environment

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


def cmd_attack(args: argparse.Namespace) -> int:
    from fl_sim import api
    from server.offline import parse_params

    api.attack_case(args.case, args.attack, parse_params(args.params), out=args.out, truth=args.truth,
                    device=args.device)
    return 0


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
    "federation": "benchmarks.federation_speed",
    "dfleak": "benchmarks.dfleak_table",
}


def cmd_restorer_train(args: argparse.Namespace) -> int:
    from attacks.restorers.train import main as train_main

    return int(train_main(args.rest) or 0)


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

    att = sub.add_parser("attack", help="attack one saved case file offline")
    att.add_argument("case", help="a case file (AttackCase.save)")
    att.add_argument("--attack", required=True, help="attack name from the registry")
    att.add_argument("--param", dest="params", action="append", default=[], help="key=value attack setting")
    att.add_argument("--truth", help="optional ground-truth images (.pt or .png) for metrics")
    att.add_argument("--out", help="output run directory")
    att.add_argument("--device", default="cpu")
    att.set_defaults(fn=cmd_attack)

    bench = sub.add_parser("bench", help="print speed and memory figures")
    bench.add_argument("what", choices=sorted(BENCHES))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark")
    bench.set_defaults(fn=cmd_bench)

    restorer = sub.add_parser("restorer", help="DFLeak's face restorers: `restorer train` trains the offline "
                                               "diffusion model on public faces")
    restorer.add_argument("action", choices=["train"])
    restorer.add_argument("rest", nargs=argparse.REMAINDER, help="options of the action (train --help lists them)")
    restorer.set_defaults(fn=cmd_restorer_train)
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
