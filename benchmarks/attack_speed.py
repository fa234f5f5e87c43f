"""Speed of the InvertG iteration: victim-iterations per second and peak memory.

Three implementations on the same victims, each measured in a fresh process (so its peak
resident memory is its own):

- reference: the straightforward loop (forward in train mode, first-order gradient with
  create_graph, cosine over all parameters in plain tensor ops, backward to the image, Adam
  on the signed gradient),
- engine: attacks.engine.GradientInversion on one victim (fused matching loss),
- together: attacks.multi.MultiVictimInversion on V victims of one round (torch.func.vmap).

At 32 px the last stage of ResNet18 and MobileNetV2 is 1x1, where BatchNorm on the batch
statistics of one image is undefined; those rows use a client with BatchNorm in eval mode.

    python benchmarks/attack_speed.py --models resnet18 --sizes 64 --victims 1 4 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _setup(model: str, size: int, victims: int, seed: int = 0):
    import torch

    from attacks.synthetic import make_case

    g = torch.Generator().manual_seed(seed)
    bn_mode = "eval" if size < 48 else "train"
    imgs = torch.rand(victims, 1, 3, size, size, generator=g)
    first = make_case(model, 2, imgs[0], torch.tensor([0]), seed=seed, bn_mode=bn_mode)
    cases = [first] + [make_case(model, 2, imgs[i], torch.tensor([i % 2]), seed=seed, weights=first.weights,
                                 bn_mode=bn_mode) for i in range(1, victims)]
    return cases, bn_mode


def _measure(mode: str, model: str, size: int, victims: int, iterations: int, warmup: int, threads: int,
             channels_last: bool, backend: str = "auto") -> dict[str, Any]:
    """One measurement, in this process."""
    import resource

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    cases, bn_mode = _setup(model, size, victims)
    if mode == "reference":
        case = cases[0]
        net = case.build_model()
        params = list(net.parameters())
        target = [case.update[n] for n, _ in net.named_parameters()]
        x = torch.randn(1, 3, size, size, requires_grad=True)
        y = torch.tensor([0])
        opt = torch.optim.Adam([x], lr=0.1)

        def step() -> None:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((a * b).sum() for a, b in zip(grads, target))
            n1 = sum(a.pow(2).sum() for a in grads)
            n2 = sum(b.pow(2).sum() for b in target)
            rec = 1 - dot / (n1.sqrt() * n2.sqrt())
            rec.backward()
            x.grad.sign_()
            opt.step()

        for _ in range(warmup):
            step()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iterations):
            step()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        victim_its = iterations
    else:
        from attacks.registry import build_attack

        attack = build_attack("invertg", iterations=warmup + iterations, channels_last=channels_last,
                              fast=backend != "exact")
        stamps: list[tuple[float, float]] = []

        def progress(it: int, total: int, loss: float) -> None:
            if it in (warmup, warmup + iterations):
                stamps.append((time.perf_counter(), time.process_time()))

        if mode == "engine":
            attack.run(cases[0], progress=progress)
            victims = 1
        else:
            from attacks.multi import MultiVictimInversion

            MultiVictimInversion(attack, backend=backend).run(cases, progress=progress)
        seconds, cpu = stamps[1][0] - stamps[0][0], stamps[1][1] - stamps[0][1]
        victim_its = iterations * victims
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "model": model, "size": size, "victims": victims, "bn": bn_mode,
            "victim_it_per_s": victim_its / seconds, "victim_it_per_cpu_s": victim_its / cpu,
            "peak_rss_mb": peak_mb, "threads": threads, "backend": backend if mode != "reference" else "-"}


def _in_subprocess(job: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(job)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark job {job} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fl-sim bench attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 112])
    p.add_argument("--victims", nargs="+", type=int, default=[1, 4],
                   help="victims attacked together (1 = the engine alone)")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations per measurement (default 10; 200 with --against, which also scores PSNR)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the median is shown")
    p.add_argument("--no-reference", action="store_true", help="skip the plain reference loop")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--backend", default="auto", choices=["auto", "factored", "expanded", "vmap", "exact"],
                   help="multi-victim backend; 'exact' also turns off the factored single-victim path")
    p.add_argument("--in-process", action="store_true", help="measure in this process (peak RSS is then shared)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--against", choices=["breaching"],
                   help="measure beside another framework in one run (see benchmarks/against_breaching.py); "
                        "defaults then: ResNet18 at 64 and 112 px and MobileNetV2 at 64 px, --victims 8, --repeats 2")
    p.add_argument("--breaching", default="breaching==0.1.2",
                   help="with --against breaching: a pip requirement or the path of a local checkout, installed "
                        "into breaching's own environment (never this project's)")
    p.add_argument("--quality-seeds", type=int, default=1,
                   help="with --against: starts per victim for the PSNR comparison of fl-sim's fast and exact "
                        "paths (more starts, a tighter interval; breaching is not rerun)")
    p.add_argument("--ray-workers", nargs="+", type=int,
                   help="measure how throughput scales over this many Ray workers (1 CPU each), e.g. 1 2; "
                        "see benchmarks/attack_scaling.py")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="fl-sim's matching precision with --against (the attack's default: auto)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        job = json.loads(args.one)
        print(json.dumps(_measure(**job)))
        return 0
    if args.against or args.ray_workers:
        from benchmarks import against_breaching, attack_scaling

        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
        if "--models" in given or "--sizes" in given:
            rows = [(m, s) for m in args.models for s in args.sizes]
        else:
            rows = against_breaching.DEFAULT_ROWS
        if "--victims" not in given:
            args.victims = [8]
        if "--repeats" not in given:
            args.repeats = 2
        if args.ray_workers:
            return attack_scaling.main(args, rows)
        return against_breaching.main(args, rows)
    args.iterations = args.iterations or 10

    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"note: load average {load:.1f} before starting; other work shares the CPU. With more busy "
              f"threads than cores, {args.threads}-thread OpenMP runs can slow down many times; "
              f"--threads 1 gives steadier figures.", file=sys.stderr)
    jobs = []
    for model in args.models:
        for size in args.sizes:
            if not args.no_reference:
                jobs.append(("reference", model, size, 1))
            for v in args.victims:
                jobs.append(("engine" if v == 1 else "together", model, size, v))
    results: dict[tuple, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for mode, model, size, v in jobs:
            job = {"mode": mode, "model": model, "size": size, "victims": v, "iterations": args.iterations,
                   "warmup": args.warmup, "threads": args.threads, "channels_last": args.channels_last,
                   "backend": args.backend}
            row = _measure(**job) if args.in_process else _in_subprocess(job)
            results.setdefault((mode, model, size, v), []).append(row)
            print(f"  measured {mode:9s} {model:12s} {size:4d} px  V={v:<2d} "
                  f"{row['victim_it_per_s']:7.2f} victim-it/s", file=sys.stderr, flush=True)

    rows = []
    for key, runs in results.items():
        row = dict(runs[0])
        row["victim_it_per_s"] = statistics.median(r["victim_it_per_s"] for r in runs)
        row["victim_it_per_cpu_s"] = statistics.median(r["victim_it_per_cpu_s"] for r in runs)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        rows.append(row)
    ref = {(r["model"], r["size"]): r["victim_it_per_s"] for r in rows if r["mode"] == "reference"}
    print(f"InvertG iteration speed, {args.threads} thread(s), median of {args.repeats}. victim-it/s = "
          f"iterations x victims per wall second; per CPU-s = per second of this process's CPU time "
          f"(steadier when other work shares the machine)")
    header = (f"{'model':12s} {'px':>4s} {'bn':5s} {'mode':9s} {'backend':8s} {'victims':>7s} {'victim-it/s':>11s} "
              f"{'x ref':>6s} {'per CPU-s':>9s} {'x ref':>6s} {'peak RSS MB':>11s}")
    print(header)
    print("-" * len(header))
    ref_cpu = {(r["model"], r["size"]): r["victim_it_per_cpu_s"] for r in rows if r["mode"] == "reference"}
    for r in rows:
        key = (r["model"], r["size"])
        wall_x = f"{r['victim_it_per_s'] / ref[key]:6.2f}" if key in ref else f"{'-':>6s}"
        cpu_x = f"{r['victim_it_per_cpu_s'] / ref_cpu[key]:6.2f}" if key in ref_cpu else f"{'-':>6s}"
        print(f"{r['model']:12s} {r['size']:4d} {r['bn']:5s} {r['mode']:9s} {r['backend']:8s} {r['victims']:7d} "
              f"{r['victim_it_per_s']:11.2f} {wall_x} {r['victim_it_per_cpu_s']:9.2f} {cpu_x} {r['peak_rss_mb']:11.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
