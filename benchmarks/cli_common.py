"""What the benchmarks' command lines share: a config with overrides, its errors, a CSV out."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_config_arguments(p: argparse.ArgumentParser, default: str, what: str) -> None:
    """The positional experiment config (default `default`; `what` it provides) and its overrides."""
    p.add_argument("config", nargs="?", default=default, help=f"experiment config: {what} (default {default})")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for fl-sim run")
    p.add_argument("--out", help="also write the rows to this CSV")


def load_or_report(args: argparse.Namespace, console):
    """The config, or None after printing why it could not be loaded (a missing file, a bad key)."""
    from fl_sim.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return None


def write_rows(frame, out: str | None, console) -> None:
    """The rows as CSV at `out`, when given."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
        console.print(f"rows written to {out}")
