"""Seconds per round and peak memory of the federation (`fl-sim bench federation`).

Each combination of model and algorithm runs as its own `fl-sim run` in a child process (a
fresh Ray each time), no attacks, and is measured from outside: wall time, the rounds'
seconds from rounds.csv (round 1 includes Ray's start-up; "later" is the median of the
others), and the peak memory (PSS: shared pages counted once) of the child's whole process tree
(Ray's GCS, raylet and client actors included), sampled every 0.2 s.

Defaults are small (100 clients, 10 per round, 3 rounds, 8 synthetic 32 px faces per
client); flags make it bigger:

    fl-sim bench federation --models resnet18 --algorithms fedavg --rounds 5 --image-size 64
    fl-sim bench federation --secure-aggregation      # each also under SecAgg+, side by side
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml


def _pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (Ray's object store, libraries) counted once
    across the processes that share them, so the sum over a tree is not inflated."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_memory_mb(root: int) -> float:
    """Memory (PSS) of a process and all its descendants, in MB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _pss_bytes(pid)
        stack.extend(children.get(pid, []))
    return total / 2**20


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_memory_mb(self.pid))
            time.sleep(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak


def experiment(args: argparse.Namespace, model: str, algorithm: str, secure: bool = False) -> dict:
    per_client = args.images_per_client
    return {
        "name": f"bench-{model}-{algorithm}{'-secagg' if secure else ''}",
        "seed": 0,
        "data": {"name": "synthetic", "image_size": args.image_size, "test_fraction": 0.1,
                 # one identity per client, `per_client` training images each (+1 held out)
                 "options": {"identities": args.clients, "per_identity": per_client + 1}},
        "model": {"name": model},
        "federation": {"num_clients": args.clients, "clients_per_round": args.per_round, "rounds": args.rounds,
                       "algorithm": algorithm, "batch_size": per_client if algorithm == "fedsgd" else args.batch_size,
                       "local_lr": 0.01, "local_steps": args.local_steps, "server_lr": 0.1,
                       "partitioning": "by-identity", "secure_aggregation": {} if secure else None},
        "threat": {"rounds": []},
        "attacks": [],
        "engine": {"backend": args.backend, "client_num_cpus": args.client_cpus},
        "metrics": {"lpips": False, "id_backend": None},
    }


def measure(args: argparse.Namespace, model: str, algorithm: str, workdir: Path, secure: bool = False) -> dict:
    import pandas as pd

    tag = f"{model}-{algorithm}{'-secagg' if secure else ''}"
    cfg_path = workdir / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(experiment(args, model, algorithm, secure)))
    out = workdir / f"run-{tag}"
    cmd = [sys.executable, "-m", "fl_sim.cli", "run", str(cfg_path), "--out", str(out)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakSampler(child.pid)
    sampler.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    if child.returncode != 0:
        raise RuntimeError(f"{model} {algorithm} failed:\n{output[-3000:]}")
    rounds = pd.read_csv(out / "rounds.csv")
    secs = rounds.seconds.tolist()
    return {"model": model, "algorithm": algorithm, "secure": secure, "wall": wall, "first": secs[0],
            "later": statistics.median(secs[1:]) if len(secs) > 1 else float("nan"), "peak_mb": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fl-sim bench federation", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--algorithms", default="fedsgd,fedavg")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--images-per-client", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="FedAvg minibatch (FedSGD uses all local images)")
    p.add_argument("--local-steps", type=int, default=4, help="FedAvg local steps")
    p.add_argument("--backend", choices=["ray", "inprocess"], default="ray")
    p.add_argument("--client-cpus", type=float, default=1.0)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="run each combination also under SecAgg+ (federation.secure_aggregation)")
    p.add_argument("--keep", metavar="DIR", help="keep the runs in DIR (default: a temporary folder)")
    args = p.parse_args(argv or [])

    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = []
    with tempfile.TemporaryDirectory(prefix="fl-sim-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            for algorithm in args.algorithms.split(","):
                for secure in ((False, True) if args.secure_aggregation else (False,)):
                    console.print(f"running {model} {algorithm}{' under SecAgg+' if secure else ''} ({args.backend}, "
                                  f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds, "
                                  f"{args.image_size} px) ...")
                    r = measure(args, model.strip(), algorithm.strip(), workdir, secure)
                    console.print(f"  wall {r['wall']:.1f} s, round 1 {r['first']:.1f} s, later rounds "
                                  f"{r['later']:.1f} s, peak memory {r['peak_mb']:.0f} MB")
                    results.append(r)

    t = Table(title=f"federation speed: {args.clients} clients, {args.per_round} per round, {args.rounds} rounds, "
                    f"{args.images_per_client} images of {args.image_size} px per client, {args.backend}")
    for c in ("model", "algorithm", "aggregation", "wall s", "round 1 s", "later rounds s", "peak MB (PSS)"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(r["model"], r["algorithm"], "SecAgg+" if r["secure"] else "plain", f"{r['wall']:.1f}", f"{r['first']:.1f}", f"{r['later']:.1f}",
                  f"{r['peak_mb']:.0f}")
    console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
