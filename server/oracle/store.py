"""The oracle's store: one SQLite file in WAL mode, one connection per thread.

    identities  id, template (float32 bytes, L2-normalised), dim, images, backend, created
    api_keys    key_id, sha256 of the key (the key itself is never stored), role, created, budget
    usage       per key: requests, queries (images scored), rejected (answered 4xx)
    audit       one row per request: time, key_id, endpoint, identity, images, status

An enrollment is one INSERT in one transaction (synchronous=FULL): after a crash the identity
is either there with its template, or absent. Templates are read only to score; nothing here
hands one to the API layer's responses.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fl_sim.results import connect_wal

Role = Literal["admin", "query"]
ROLES: tuple[Role, ...] = ("admin", "query")

SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    template BLOB NOT NULL,
    dim INTEGER NOT NULL,
    images INTEGER NOT NULL,
    backend TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'query')),
    created TEXT NOT NULL,
    budget INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT PRIMARY KEY,
    requests INTEGER NOT NULL DEFAULT 0,
    queries INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    key_id TEXT,
    endpoint TEXT NOT NULL,
    identity TEXT,
    images INTEGER NOT NULL DEFAULT 0,
    status INTEGER NOT NULL
);
"""


class IdentityExists(ValueError):
    pass


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    role: Role
    created: str
    budget: int | None  # None: the service's query_budget applies


@dataclass(frozen=True)
class IdentityRecord:
    id: str
    images: int
    created: str


@dataclass(frozen=True)
class Usage:
    key_id: str
    requests: int
    queries: int
    rejected: int


@dataclass
class AuditRow:
    endpoint: str
    key_id: str | None = None
    identity: str | None = None
    images: int = 0
    status: int = 0


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        db.executescript(SCHEMA)

    # -- connections --------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _connect(self) -> sqlite3.Connection:
        db = connect_wal(self.path, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")  # an acknowledged enrollment survives a power cut
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- keys ---------------------------------------------------------------------
    def create_key(self, role: Role, budget: int | None = None) -> tuple[str, str]:
        """A new API key: (key_id, key). Only the key's sha256 is stored; show the key once."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        key_id = "k_" + secrets.token_hex(4)
        key = f"orc_{secrets.token_urlsafe(32)}"
        with self._tx() as db:
            db.execute("INSERT INTO api_keys (key_id, sha256, role, created, budget) VALUES (?, ?, ?, ?, ?)",
                       (key_id, key_hash(key), role, now(), budget))
            db.execute("INSERT INTO usage (key_id) VALUES (?)", (key_id,))
        return key_id, key

    def lookup_key(self, key: str) -> KeyRecord | None:
        row = self._db().execute("SELECT key_id, role, created, budget FROM api_keys WHERE sha256 = ?",
                                 (key_hash(key),)).fetchone()
        return None if row is None else KeyRecord(*row)

    def keys(self) -> list[KeyRecord]:
        rows = self._db().execute("SELECT key_id, role, created, budget FROM api_keys ORDER BY created")
        return [KeyRecord(*r) for r in rows]

    # -- identities -----------------------------------------------------------------
    def add_identity(self, identity: str, template: np.ndarray, images: int, backend: str) -> IdentityRecord:
        vec = np.ascontiguousarray(template, dtype="<f4").reshape(-1)
        created = now()
        try:
            with self._tx() as db:
                db.execute("INSERT INTO identities (id, template, dim, images, backend, created) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (identity, vec.tobytes(), vec.size, images, backend, created))
        except sqlite3.IntegrityError:
            raise IdentityExists(f"identity {identity!r} is already enrolled") from None
        return IdentityRecord(identity, images, created)

    def template(self, identity: str) -> np.ndarray | None:
        row = self._db().execute("SELECT template, dim FROM identities WHERE id = ?", (identity,)).fetchone()
        if row is None:
            return None
        return np.frombuffer(row[0], dtype="<f4", count=row[1]).astype(np.float32)

    def has_identity(self, identity: str) -> bool:
        return self._db().execute("SELECT 1 FROM identities WHERE id = ?", (identity,)).fetchone() is not None

    def identities(self) -> list[IdentityRecord]:
        rows = self._db().execute("SELECT id, images, created FROM identities ORDER BY created, id")
        return [IdentityRecord(*r) for r in rows]

    def count_identities(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    def backends(self) -> set[str]:
        return {r[0] for r in self._db().execute("SELECT DISTINCT backend FROM identities")}

    def delete_identity(self, identity: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM identities WHERE id = ?", (identity,)).rowcount > 0

    # -- usage and audit -------------------------------------------------------------
    def count_request(self, key_id: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO usage (key_id, requests) VALUES (?, 1) "
                       "ON CONFLICT (key_id) DO UPDATE SET requests = requests + 1", (key_id,))

    def reserve_queries(self, key_id: str, n: int, budget: int | None) -> int | None:
        """Count n more images scored for the key if its budget allows: the new total, or None
        (nothing counted) when it would go over."""
        with self._tx() as db:
            row = db.execute("UPDATE usage SET queries = queries + ? WHERE key_id = ? "
                             "AND (? IS NULL OR queries + ? <= ?) RETURNING queries",
                             (n, key_id, budget, n, budget)).fetchone()
        return None if row is None else int(row[0])

    def refund_queries(self, key_id: str, n: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE usage SET queries = MAX(0, queries - ?) WHERE key_id = ?", (n, key_id))

    def usage(self, key_id: str) -> Usage:
        row = self._db().execute("SELECT requests, queries, rejected FROM usage WHERE key_id = ?",
                                 (key_id,)).fetchone()
        return Usage(key_id, *(row or (0, 0, 0)))

    def record(self, row: AuditRow) -> None:
        """The audit row of a finished request; a rejected one (4xx) also counts as rejected."""
        with self._tx() as db:
            db.execute("INSERT INTO audit (time, key_id, endpoint, identity, images, status) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (now(), row.key_id, row.endpoint, row.identity, row.images, row.status))
            if row.key_id is not None and 400 <= row.status < 500:
                db.execute("UPDATE usage SET rejected = rejected + 1 WHERE key_id = ?", (row.key_id,))

    def audit_rows(self, limit: int = 1000) -> list[tuple]:
        return self._db().execute("SELECT time, key_id, endpoint, identity, images, status FROM audit "
                                  "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()


__all__ = ["Store", "KeyRecord", "IdentityRecord", "Usage", "AuditRow", "IdentityExists", "ROLES", "key_hash"]
