"""A real similarity-oracle service for tests: `fl-sim oracle serve` in a subprocess on
127.0.0.1 (a free port), and small helpers to talk to it."""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from server.oracle.store import Store

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OracleProcess:
    """`python -m fl_sim.cli oracle serve --config FILE` on a free port."""

    def __init__(self, folder: Path, **settings) -> None:
        self.folder = folder
        self.port = free_port()
        self.db = folder / "oracle.sqlite"
        self.config = folder / "oracle.yaml"
        self.config.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": self.port, "db": str(self.db),
                                               "backend": "sface-bf16", **settings}))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = folder / "serve.log"

    def start(self, timeout: float = 120) -> "OracleProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fl_sim.cli", "oracle", "serve",
                                          "--config", str(self.config)],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the oracle exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the oracle did not become healthy:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def new_key(server: OracleProcess, role: str, budget: int | None = None) -> str:
    """A fresh key straight in the store (the running service reads keys per request)."""
    return Store(server.db).create_key(role, budget=budget)[1]


def client(server: OracleProcess, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def array_payload(images: np.ndarray, dtype: str = "uint8", shape: list[int] | None = None) -> dict:
    return {"array": {"dtype": dtype, "shape": list(shape or images.shape),
                      "data": base64.b64encode(np.ascontiguousarray(images).tobytes()).decode()}}


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "reason"} and body["reason"], body
    if error is not None:
        assert body["error"] == error, body
    return body
