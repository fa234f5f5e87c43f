"""fl-sim's InvertG beside breaching's, in one run: `fl-sim bench attack --against breaching`.

For each (model, size) row both tools attack the same victims: real ORL faces, one image
each, the same global weights and observed FedSGD gradients, BatchNorm frozen (eval mode),
labels given, the same thread count and iteration count, the same InvertG settings. breaching (in its own environment,
see benchmarks/breaching_env.py) attacks the victims one after the other, as it must;
fl-sim attacks them together, as its federation's attack runner does with a round's victims.
Measurements alternate between the tools and repeat; each is a fresh process, so its peak
memory is its own. Printed per row: victim-iterations per second (median over repeats),
the ratio, peak memory, and the mean PSNR of the returned images after the fixed number of
iterations, for breaching, fl-sim's fast path (the default: factored matching, bf16 where the
CPU has it) and fl-sim's exact fp32 path (materialised gradients, float32): a faster path
that converges worse shows up here.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_ROWS = [("resnet18", 64), ("resnet18", 112), ("mobilenet_v2", 64)]
# breaching's `invertinggradients` settings where fl-sim's InvertG defaults differ: its TV
# (mean |dx| + |dy| of the normalised input, as fl-sim's) is 0.2; fl-sim's own default is
# DFLeak's paper's 0.01. Everything else (cosine over all layers, signed Adam at 0.1, step
# decay at 3/8, 5/8, 7/8, boxed pixels) is already the same.
AS_BREACHING = {"tv": 0.2}


def write_cases(model: str, size: int, victims: int, path: Path, seed: int = 0) -> None:
    """V cases of V different ORL people (one photo each) on one set of global weights."""
    import torch

    from attacks.synthetic import make_case
    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec("orl", size))
    per_person = len(ds) // ds.num_classes
    idx = [(i % ds.num_classes) * per_person + i // ds.num_classes for i in range(victims)]
    imgs = ds.images[idx].unsqueeze(1)  # (V, 1, C, H, W)
    labels = ds.labels[idx]
    common = dict(seed=seed, bn_mode="eval", send_labels=True, mean=ds.mean, std=ds.std, grey=ds.grey)
    first = make_case(model, ds.num_classes, imgs[0], labels[:1], **common)
    cases = [first] + [make_case(model, ds.num_classes, imgs[i], labels[i:i + 1], weights=first.weights, **common)
                       for i in range(1, victims)]
    torch.save({"cases": [c.to_dict() for c in cases], "truth": imgs}, path)


def measure_flsim(cases: str, iterations: int, warmup: int, threads: int, exact: bool,
                  precision: str = "auto", seed: int = 0) -> dict[str, Any]:
    """fl-sim's InvertG on all cases together (in this process)."""
    import torch

    from attacks.case import AttackCase
    from attacks.multi import MultiVictimInversion
    from attacks.registry import build_attack
    from fl_sim.metrics import psnr

    torch.set_num_threads(threads)
    blob = torch.load(cases, map_location="cpu", weights_only=True)
    loaded = [AttackCase.from_dict(d) for d in blob["cases"]]
    for c in loaded[1:]:
        c.weights = loaded[0].weights  # one round's victims share the global weights object
    settings: dict[str, Any] = {**AS_BREACHING, "iterations": iterations, "fast": not exact,
                                "precision": "fp32" if exact else precision, "seed": seed}
    attack = build_attack("invertg", **settings)
    stamps: list[float] = []

    def progress(it: int, total: int, loss: float) -> None:
        if it in (warmup, iterations):
            stamps.append(time.perf_counter())

    runner = MultiVictimInversion(attack) if len(loaded) > 1 else None
    if runner is not None:
        results = runner.run(loaded, progress=progress)
    else:
        results = [attack.run(loaded[0], progress=progress)]
    v = len(loaded)
    psnrs = [float(psnr(r.images, t)) for r, t in zip(results, blob["truth"])]
    return {"victim_it_per_s": v * (iterations - warmup) / (stamps[1] - stamps[0]), "psnr": psnrs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "backend": getattr(runner, "used_backend", "engine")}


def _run(cmd: list[str], cwd: str | None = None) -> dict[str, Any]:
    from benchmarks import breaching_env

    env = breaching_env.run_env({**os.environ, "PYTHONWARNINGS": "ignore"})
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args, rows_to_measure: list[tuple[str, int]]) -> int:
    from benchmarks import breaching_env

    breaching_python = breaching_env.ensure(args.breaching, log=lambda m: print(m, file=sys.stderr))
    iterations = args.iterations or 200
    victims = max(args.victims)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fl-sim-vs-breaching-") as tmp:
        for model, size in rows_to_measure:
            cases = Path(tmp) / f"{model}-{size}.pt"
            write_cases(model, size, victims, cases)
            base = {"cases": str(cases), "iterations": iterations, "warmup": args.warmup,
                    "threads": args.threads}
            runs: dict[str, list[dict[str, Any]]] = {"breaching": [], "fl-sim": [], "fl-sim exact": []}
            quality: dict[str, list[list[float]]] = {"fl-sim": [], "fl-sim exact": []}  # by seed
            for rep in range(args.repeats):
                jobs = [("breaching", [str(breaching_python), str(HERE / "breaching_runner.py"),
                                       json.dumps(base)], tempfile.gettempdir()),
                        ("fl-sim", [sys.executable, str(Path(__file__)), json.dumps(
                            {**base, "exact": False, "precision": args.precision})], None)]
                if rep == 0:  # the reference for reconstruction quality; its speed is not the point
                    jobs.append(("fl-sim exact", [sys.executable, str(Path(__file__)),
                                                  json.dumps({**base, "exact": True})], None))
                for name, cmd, cwd in (jobs if rep % 2 == 0 else jobs[1::-1] + jobs[2:]):
                    row = _run(cmd, cwd)
                    runs[name].append(row)
                    if rep == 0 and name in quality:
                        quality[name].append(row["psnr"])
                    print(f"  {model:12s} {size:4d} px  {name:13s} {row['victim_it_per_s']:7.2f} victim-it/s  "
                          f"PSNR {statistics.mean(row['psnr']):5.2f} dB", file=sys.stderr, flush=True)
            for seed in range(1, args.quality_seeds):  # more starts for the PSNR comparison only
                for name, exact in (("fl-sim", False), ("fl-sim exact", True)):
                    row = _run([sys.executable, str(Path(__file__)), json.dumps(
                        {**base, "exact": exact, "precision": args.precision, "seed": seed})])
                    quality[name].append(row["psnr"])
                    print(f"  {model:12s} {size:4d} px  {name:13s} seed {seed}: PSNR {statistics.mean(row['psnr']):5.2f} dB",
                          file=sys.stderr, flush=True)
            rows.append(_summarise(model, size, victims, iterations, runs, quality))
    _print(rows, args.threads, args.repeats, iterations, victims)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _fast_vs_exact(quality: dict[str, list[list[float]]]):
    """Paired PSNR difference fast - exact over (victim, start) pairs, with its 95 % t interval."""
    import pandas as pd

    from fl_sim.stats import paired_comparisons

    rows = [{"attack": name, "victim": v, "seed": s, "psnr": p}
            for name, by_seed in quality.items() for s, psnrs in enumerate(by_seed) for v, p in enumerate(psnrs)]
    (cmp,) = paired_comparisons(pd.DataFrame(rows), "fl-sim exact", metrics=("psnr",),
                                victim_columns=("victim", "seed"))
    return cmp


def _summarise(model: str, size: int, victims: int, iterations: int, runs: dict[str, list[dict]],
               quality: dict[str, list[list[float]]]) -> dict[str, Any]:
    cmp = _fast_vs_exact(quality)

    def med(name: str) -> float:
        return statistics.median(r["victim_it_per_s"] for r in runs[name])

    def mean_psnr(name: str) -> float:  # the first repeat: later repeats redo the same computation
        return statistics.mean(runs[name][0]["psnr"])

    return {"model": model, "size": size, "victims": victims, "iterations": iterations,
            "breaching_it_per_s": med("breaching"), "flsim_it_per_s": med("fl-sim"),
            "ratio": med("fl-sim") / med("breaching"),
            "breaching_peak_mb": max(r["peak_rss_mb"] for r in runs["breaching"]),
            "flsim_peak_mb": max(r["peak_rss_mb"] for r in runs["fl-sim"]),
            "breaching_psnr": mean_psnr("breaching"), "flsim_psnr": mean_psnr("fl-sim"),
            "exact_psnr": mean_psnr("fl-sim exact"), "exact_it_per_s": med("fl-sim exact"),
            "flsim_backend": runs["fl-sim"][0]["backend"],
            "fast_minus_exact_psnr": cmp.mean_difference, "fast_minus_exact_ci": [cmp.ci_low, cmp.ci_high],
            "fast_minus_exact_n": cmp.n,
            "breaching_version": runs["breaching"][0]["breaching"], "torch": runs["breaching"][0]["torch"]}


def _print(rows: list[dict[str, Any]], threads: int, repeats: int, iterations: int, victims: int) -> None:
    r0 = rows[0]
    print(f"InvertG, fl-sim vs breaching {r0['breaching_version']} (torch {r0['torch']}), {threads} thread(s), "
          f"{victims} victims (ORL, 1 image each, BatchNorm frozen), {iterations} iterations, median of "
          f"{repeats} interleaved repeats. breaching attacks victims one by one; fl-sim together.")
    header = (f"{'model':12s} {'px':>4s} {'breaching it/s':>14s} {'fl-sim it/s':>11s} {'ratio':>6s} "
              f"{'peak MB b/f':>11s} {'PSNR breaching':>14s} {'fl-sim':>6s} {'exact fp32':>10s} "
              f"{'fl-sim - exact [95 % CI], n':>29s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:12s} {r['size']:4d} {r['breaching_it_per_s']:14.2f} {r['flsim_it_per_s']:11.2f} "
              f"{r['ratio']:5.1f}x {r['breaching_peak_mb']:5.0f}/{r['flsim_peak_mb']:<5.0f} "
              f"{r['breaching_psnr']:14.2f} {r['flsim_psnr']:6.2f} {r['exact_psnr']:10.2f} "
              f"{r['fast_minus_exact_psnr']:+9.2f} [{r['fast_minus_exact_ci'][0]:+.2f}, "
              f"{r['fast_minus_exact_ci'][1]:+.2f}], {r['fast_minus_exact_n']}")
    print("PSNR in dB after the fixed iteration count, mean over victims (and starts); the difference "
          "is paired by victim and start.")


if __name__ == "__main__":  # one fl-sim measurement in a fresh process
    print(json.dumps(measure_flsim(**json.loads(sys.argv[1]))))
