"""Throughput of the similarity-oracle service under load, beside the raw model in the same run.

    fl-sim bench oracle [--clients 1 4 16] [--seconds 10] [--batch 8] [--threads 2] [--backend sface-bf16]

Starts `fl-sim oracle serve` on a free loopback port with a fresh store (one ORL person
enrolled, rate limit out of the way), then for each client count runs that many concurrent HTTP
clients for --seconds, each posting the same batch of --batch images (the compact array
encoding, encoded once). Prints requests/s, images/s, p50/p99 latency and the count of
errors, beside the raw throughput of the same model laid out as the service runs it (same
workers, one thread each, same batch) and of the reference backend (--reference).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_images_per_second(backend: str, workers: int, batch: int, seconds: float) -> float:
    """The model alone, laid out as the service runs it: `workers` threads, each calling the
    shared embedder with one thread of its own."""
    import numpy as np
    import torch

    from fl_sim.faces import EMBEDDERS

    torch.set_num_threads(1)
    model = EMBEDDERS.get(backend)()
    x = np.random.default_rng(0).integers(0, 256, size=(batch, 112, 112, 3), dtype=np.uint8)
    model.embed_uint8(x)
    counts = [0] * workers
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            model.embed_uint8(x)
            counts[i] += batch

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def start_service(folder: Path, threads: int, backend: str) -> tuple[subprocess.Popen, str, str]:
    import httpx
    import yaml

    from server.oracle.store import Store

    port = _free_port()
    db = folder / "oracle.sqlite"
    config = folder / "oracle.yaml"
    config.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": port, "db": str(db), "backend": backend,
                                      "threads": threads, "rate_per_second": 1e6, "max_batch": 256}))
    store = Store(db)
    admin, query = store.create_key("admin")[1], store.create_key("query")[1]
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim.cli", "oracle", "serve", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise SystemExit("the oracle did not start")
    _enroll(url, admin)
    return proc, url, query


def _enroll(url: str, admin: str) -> None:
    import base64
    import io

    import httpx
    from PIL import Image

    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(name="orl", image_size=112))
    pngs = []
    for img in ds.images[ds.identities == 0][:4]:
        buf = io.BytesIO()
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode())
    r = httpx.post(f"{url}/v1/identities", json={"id": "target", "images": pngs},
                   headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    r.raise_for_status()


def load(url: str, key: str, clients: int, batch: int, seconds: float) -> dict[str, float]:
    """`clients` threads posting the same batch for `seconds`. The request body is encoded
    once: the load generator shares the machine's cores with the service, and re-encoding
    every request would bill the client's work to the service."""
    import json

    import httpx
    import numpy as np
    import torch

    from attacks.oracle import encode_array

    images = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    body = json.dumps({"array": encode_array(images)}).encode()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}",
                                                              "Content-Type": "application/json"}) as http:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = http.post("/v1/identities/target/similarity", content=body)
                with lock:
                    if r.status_code == 200 and len(r.json()["scores"]) == batch:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"requests_s": len(lat) / wall, "images_s": len(lat) * batch / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"), "errors": errors[0]}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(prog="fl-sim bench oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="the service's (and the raw model's) threads")
    p.add_argument("--backend", default="sface-bf16", help="the service's face-recognition backend")
    p.add_argument("--reference", default="sface", help="also measure this backend raw (before the speed work); "
                                                         "'' to skip")
    args = p.parse_args(argv)
    console = Console()
    if args.reference and args.reference != args.backend:
        ref = raw_images_per_second(args.reference, args.threads, args.batch, min(args.seconds, 5))
        console.print(f"raw {args.reference} ({args.threads} workers x 1 thread, batch {args.batch}): {ref:.0f} img/s")
    raw = raw_images_per_second(args.backend, args.threads, args.batch, min(args.seconds, 5))
    console.print(f"raw {args.backend} ({args.threads} workers x 1 thread, batch {args.batch}): {raw:.0f} img/s")
    table = Table(title=f"oracle service ({args.backend}), batches of {args.batch}, {args.seconds:.0f} s per row")
    for col in ("clients", "requests/s", "images/s", "% of raw", "p50 ms", "p99 ms", "errors (4xx/5xx)"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, key = start_service(Path(tmp), args.threads, args.backend)
        try:
            for n in args.clients:
                r = load(url, key, n, args.batch, args.seconds)
                table.add_row(str(n), f"{r['requests_s']:.1f}", f"{r['images_s']:.0f}",
                              f"{100 * r['images_s'] / raw:.0f} %", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                              str(r["errors"]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    console.print(table)
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
