"""The run directory and its results store.

    runs/NAME/
      config.yaml     the resolved config
      results.sqlite  the store: every finished (round, client, attack) and round, at once
      metrics.csv     one row per (round, client, attack), exported from the store
      rounds.csv      one row per round
      global_model.pt the global model's state_dict after the last finished round
      models/         round-NNN.pt: the global model after each round in federation.save_rounds
      checkpoints/    round-NNN.pt: the last finished round's weights, what a resume starts from
      images/         ground truth and reconstructions as PNG
      report.html

SQLite makes each finished attack durable the moment it ends (a killed run loses only the
work in progress) and lets a resumed run ask what is already done.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import torch
from PIL import Image

import yaml

from fl_sim.config import ExperimentConfig, parse_config


@dataclass
class AttackRecord:
    """One finished attack on one victim's update in one round."""

    round: int
    client: int
    attack: str
    psnr: float = float("nan")
    mse: float = float("nan")
    ssim: float = float("nan")
    lpips: float = float("nan")
    id_similarity: float = float("nan")
    id_rank1: float = float("nan")  # share of the images whose critic rank-1 identity is the victim's
    id_rank: float = float("nan")  # the victim's rank among all identities by the critic (1 best; mean over images)
    label_accuracy: float = float("nan")
    iterations: int = 0
    seconds: float = 0.0
    num_images: int = 1
    final_loss: float = float("nan")  # the attack's objective at the image it returned
    image: str = ""  # reconstruction PNG, relative to the run directory
    truth_image: str = ""
    diagnostics: str = ""  # JSON of attack-specific numbers (DFLeak: trigger_iteration, ...), for the reader


@dataclass
class RoundRecord:
    round: int
    test_accuracy: float
    test_loss: float
    clients: int
    seconds: float
    train_loss: float = float("nan")
    sampled: str = ""  # partition ids sampled this round, space separated


# dataclass field types are strings here (postponed annotations)
_SQL_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT"}

# The latest global model's file in a run directory: written by the exports below and
# recognised by `RunDirectory.of_model`, so writer and reader share one spelling.
GLOBAL_MODEL_FILE = "global_model.pt"


def _table_sql(name: str, cls: type, key: tuple[str, ...]) -> str:
    cols = ", ".join(f"{f.name} {_SQL_TYPES[str(f.type)]}"
                     for f in dataclasses.fields(cls))
    return f"CREATE TABLE IF NOT EXISTS {name} ({cols}, PRIMARY KEY ({', '.join(key)}))"


def connect_wal(path: str | Path, **kwargs) -> sqlite3.Connection:
    """A SQLite connection in WAL mode (readers never block the writer), waiting up to 30 s
    for a lock. Several processes may open one file at once (benchmark shards, a restarted
    service): switching to WAL needs a moment alone with the file and SQLite answers
    "locked" at once rather than waiting, so that step is retried."""
    deadline = time.monotonic() + 60
    while True:
        db = sqlite3.connect(path, timeout=30, **kwargs)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _empty(cls: type, name: str):
    """What an empty (NULL) cell reads as: NaN for numbers, the field's default otherwise."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return "" if str(f.type) == "str" else float("nan")


def _add_missing_columns(db: sqlite3.Connection, table: str, cls: type) -> None:
    """A store written by an older fl-sim gains the columns added since (left empty)."""
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for f in dataclasses.fields(cls):
        if f.name not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {f.name} {_SQL_TYPES[str(f.type)]}")


class RunExists(FileExistsError):
    pass


class RunDirectory:
    """A run's folder; creating one never overwrites an existing run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.images = self.path / "images"
        self._db: sqlite3.Connection | None = None

    # -- creation and reopening -----------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: ExperimentConfig) -> "RunDirectory":
        """A new run directory; RunExists if one is there (even one made a moment ago by
        another process: config.yaml appears atomically, complete or not at all)."""
        run = cls(path)
        exists = RunExists(f"run directory {run.path} already holds a run; continue it with "
                           f"`fl-sim run --resume {run.path}` or choose another --out")
        if (run.path / "config.yaml").exists():
            raise exists
        run.images.mkdir(parents=True, exist_ok=True)
        tmp = run.path / f".config.{os.getpid()}.{threading.get_ident()}.yaml"
        tmp.write_text(config.to_yaml())
        try:
            os.link(tmp, run.path / "config.yaml")  # atomic, and fails if it exists
        except FileExistsError:
            raise exists from None
        finally:
            tmp.unlink()
        run.db  # create the tables
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        run = cls(path)
        if not (run.path / "config.yaml").exists():
            raise FileNotFoundError(f"{run.path} is not a run directory (no config.yaml)")
        run.images.mkdir(exist_ok=True)
        return run

    @staticmethod
    def default_path(config_path: str | Path | None, name: str, root: str | Path = "runs") -> Path:
        stem = Path(config_path).stem if config_path else name
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(root) / f"{stem}-{stamp}"

    def config(self) -> ExperimentConfig:
        return parse_config(yaml.safe_load((self.path / "config.yaml").read_text()))

    # -- the store -----------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        db = connect_wal(self.path / "results.sqlite")
        db.execute(_table_sql("attacks", AttackRecord, ("round", "client", "attack")))
        db.execute(_table_sql("rounds", RoundRecord, ("round",)))
        _add_missing_columns(db, "attacks", AttackRecord)
        _add_missing_columns(db, "rounds", RoundRecord)
        db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB)")
        db.commit()
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _insert(self, table: str, record: object) -> None:
        row = dataclasses.asdict(record)
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({marks})", list(row.values()))

    def add_attack(self, record: AttackRecord) -> None:
        self._insert("attacks", record)
        self.export_csv()

    def add_round(self, record: RoundRecord) -> None:
        self._insert("rounds", record)
        self.export_csv()

    def done_attacks(self) -> set[tuple[int, int, str]]:
        return {tuple(r) for r in self.db.execute("SELECT round, client, attack FROM attacks")}

    def done_rounds(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT round FROM rounds")}

    def attack_records(self) -> list[AttackRecord]:
        return list(self._read("attacks", AttackRecord, "round, client, attack"))

    def round_records(self) -> list[RoundRecord]:
        return list(self._read("rounds", RoundRecord, "round"))

    def _read(self, table: str, cls: type, order: str) -> Iterator:
        names = [f.name for f in dataclasses.fields(cls)]
        for row in self.db.execute(f"SELECT {', '.join(names)} FROM {table} ORDER BY {order}"):
            yield cls(**{n: (_empty(cls, n) if v is None else v) for n, v in zip(names, row)})

    def set_state(self, key: str, value: bytes) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def get_state(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- the federation's checkpoint ---------------------------------------------------
    # One write of the global weights per round (45 MB for ResNet18): checkpoints/round-NNN.pt,
    # committed by recording the round in the store; global_model.pt and models/round-NNN.pt
    # are hard links to it (copies where the file system has no links).
    def save_checkpoint(self, state: dict[str, torch.Tensor], server_round: int, key: str,
                        keep: Sequence[int] = (), server_state: dict[str, torch.Tensor] | None = None) -> None:
        """The global weights after `server_round`: written, committed (`key` in the store),
        exported as global_model.pt (and models/round-NNN.pt for rounds in `keep`), and older
        checkpoints removed. A kill at any point leaves the last committed round loadable.
        `server_state` (the server optimiser's, e.g. FedAvgM's velocity) is written beside the
        weights before the commit, never into the model files users load."""
        path = self.save_model(state, checkpoint=server_round)
        if server_state:
            _save_atomic(server_state, self.server_state_path(server_round))
        self.set_state(key, str(server_round).encode())
        _link(path, self.path / GLOBAL_MODEL_FILE)
        if server_round in keep:
            _link(path, self.model_path(server_round))
        current = {path, self.server_state_path(server_round)}
        for old in path.parent.glob("*.pt"):  # older rounds' weights and server states, in one listing
            if old not in current:
                old.unlink(missing_ok=True)

    def checkpoint(self, key: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The last committed round and its global weights, or None."""
        last = self.get_state(key)
        if last is None:
            return None
        rnd = int(last.decode())
        path = self.checkpoint_path(rnd)
        if not path.exists():
            return None
        return rnd, torch.load(path, map_location="cpu", weights_only=True)

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:03d}.pt"

    def server_state_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"server-{server_round:03d}.pt"

    def checkpoint_server_state(self, server_round: int) -> dict[str, torch.Tensor]:
        """The server optimiser's state saved with the round's checkpoint ({} when none was)."""
        path = self.server_state_path(server_round)
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}

    # -- exports -------------------------------------------------------------------
    def save_model(self, state: dict[str, torch.Tensor], server_round: int | None = None,
                   checkpoint: int | None = None) -> Path:
        """The global model as a plain state_dict file (what `model.weights` loads):
        `global_model.pt`, or `models/round-NNN.pt` for a round. Written to a temporary file and
        renamed, so a reader (or a killed run) never sees half a model."""
        if checkpoint is not None:
            path = self.checkpoint_path(checkpoint)
        else:
            path = self.path / GLOBAL_MODEL_FILE if server_round is None else self.model_path(server_round)
        _save_atomic(state, path)
        return path

    def model_path(self, server_round: int) -> Path:
        return self.path / "models" / f"round-{server_round:03d}.pt"

    @staticmethod
    def of_model(weights: str | Path) -> tuple[Path, int | None] | None:
        """The run directory a model file was saved by, and its round (None for
        `global_model.pt`, the latest); None when it is not a file a run writes (the inverse of
        `model_path` and the global_model.pt export)."""
        weights = Path(weights).expanduser()
        if weights.name == GLOBAL_MODEL_FILE:
            return weights.parent, None
        match = re.fullmatch(r"round-(\d+)\.pt", weights.name)
        if match and weights.parent.name == "models":
            return weights.parent.parent, int(match.group(1))
        return None

    def metrics_frame(self) -> pd.DataFrame:
        cols = [f.name for f in dataclasses.fields(AttackRecord)]
        return pd.DataFrame([dataclasses.asdict(r) for r in self.attack_records()], columns=cols)

    def rounds_frame(self) -> pd.DataFrame:
        cols = [f.name for f in dataclasses.fields(RoundRecord)]
        return pd.DataFrame([dataclasses.asdict(r) for r in self.round_records()], columns=cols)

    def export_csv(self) -> None:
        self.metrics_frame().to_csv(self.path / "metrics.csv", index=False)
        self.rounds_frame().to_csv(self.path / "rounds.csv", index=False)

    def save_image(self, name: str, images: torch.Tensor, nrow: int | None = None) -> str:
        """Write a batch in [0, 1] as one PNG strip; returns the path relative to the run."""
        from torchvision.utils import make_grid

        x = images.detach().float().cpu().clamp(0, 1)
        grid = make_grid(x, nrow=nrow or len(x), padding=1, pad_value=1.0) if x.dim() == 4 else x
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        rel = Path("images") / f"{name}.png"
        Image.fromarray(arr).save(self.path / rel)
        return rel.as_posix()


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """A tensor dict written to a temporary file and renamed: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def _link(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source` (a hard link, replacing it atomically; a copy
    where links are not supported)."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
