"""How the attack's throughput scales over Ray workers: `fl-sim bench attack --ray-workers 1 2`.

Each worker is a Ray task with one CPU and one thread that attacks its own batch of victims
together (as the federation's attack runner does with a round's victims). W workers start
at once on the same work; the aggregate is the sum of their victim-iterations per second,
and the efficiency is the aggregate over W times one worker's figure. What a cluster of N
workers would do is then an extrapolation from the measured efficiency, and is printed as one.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any


def _worker(cases: str, iterations: int, warmup: int) -> dict[str, Any]:
    from benchmarks.against_breaching import measure_flsim

    return measure_flsim(cases, iterations, warmup, threads=1, exact=False)


def main(args, rows_to_measure: list[tuple[str, int]]) -> int:
    import ray

    from benchmarks.against_breaching import write_cases

    workers = sorted(set(args.ray_workers))
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    remote = ray.remote(num_cpus=1)(_worker)
    iterations = args.iterations or 30
    victims = max(args.victims)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="fl-sim-scaling-") as tmp:
            for model, size in rows_to_measure:
                cases = str(Path(tmp) / f"{model}-{size}.pt")
                write_cases(model, size, victims, Path(cases))
                per_w: dict[int, list[float]] = {w: [] for w in workers}
                for _ in range(args.repeats):
                    for w in workers:
                        out = ray.get([remote.remote(cases, iterations, args.warmup) for _ in range(w)])
                        per_w[w].append(sum(r["victim_it_per_s"] for r in out))
                        print(f"  {model:12s} {size:4d} px  {w} worker(s) {per_w[w][-1]:7.2f} victim-it/s",
                              file=sys.stderr, flush=True)
                one = statistics.median(per_w[workers[0]]) / workers[0]
                for w in workers:
                    agg = statistics.median(per_w[w])
                    rows.append({"model": model, "size": size, "workers": w, "victim_it_per_s": agg,
                                 "per_worker": agg / w, "efficiency": agg / (w * one)})
    finally:
        ray.shutdown()
    print(f"InvertG over Ray workers (1 CPU, 1 thread each; {victims} victims together per worker; "
          f"median of {args.repeats}):")
    header = f"{'model':12s} {'px':>4s} {'workers':>7s} {'victim-it/s':>11s} {'per worker':>10s} {'efficiency':>10s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:12s} {r['size']:4d} {r['workers']:7d} {r['victim_it_per_s']:11.2f} "
              f"{r['per_worker']:10.2f} {r['efficiency']:10.2f}")
    top = max(workers)
    for model, size in rows_to_measure:
        mine = [r for r in rows if (r["model"], r["size"]) == (model, size)]
        eff = next(r["efficiency"] for r in mine if r["workers"] == top)
        one = next(r["per_worker"] for r in mine if r["workers"] == workers[0])
        est = ", ".join(f"{n} workers ~{n * one * eff:.0f}" for n in (8, 32, 128))
        print(f"extrapolation, not a measurement ({model} {size} px, efficiency {eff:.2f} at {top} workers "
              f"held constant): {est} victim-it/s")
    return 0
