"""The oracle's store: one SQLite file in WAL mode, one connection per thread.

    identities  id, template (float32 bytes, L2-normalised), dim, images, backend, created
    api_keys    key_id, sha256 of the key (the key itself is never stored), role, created, budget
    usage       per key: requests, queries (images scored), rejected (answered 4xx)
    audit       one row per request: time, key_id, endpoint, identity, images, status, error
                (the error code of a refused request: no_face, key_blocked, budget_exhausted, ...)
    identity_usage  per identity: images scored against it (all keys; its query budget)
    flags       the stateful detector's flags: key_id, time, queries (the key's count then),
                distance, blocked (1 when the key was blocked there)
    meta        the service's secret (keys the hashed score noise; made once, kept)

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
CREATE TABLE IF NOT EXISTS identity_usage (
    identity TEXT PRIMARY KEY,
    queries INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS flags (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    time TEXT NOT NULL,
    queries INTEGER NOT NULL,
    distance REAL NOT NULL,
    blocked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

# Columns added after a store may have been created: (table, column, declaration).
MIGRATIONS = [("audit", "error", "TEXT")]



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
    error: str | None = None  # the error code of a refused request


@dataclass(frozen=True)
class Flag:
    key_id: str
    time: str
    queries: int  # the key's images scored when it was flagged
    distance: float
    blocked: bool


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
        for table, column, declaration in MIGRATIONS:
            columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

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
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. durable=False (counters, the audit log): committed to the WAL
        without an fsync (synchronous=NORMAL): it survives a killed process, and at worst the
        last moments of counting are lost to a power cut, never the database. Identities and
        keys are always written durably."""
        db = self._db()
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
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
        with self._tx(durable=False) as db:
            db.execute("INSERT INTO usage (key_id, requests) VALUES (?, 1) "
                       "ON CONFLICT (key_id) DO UPDATE SET requests = requests + 1", (key_id,))

    def reserve_queries(self, key_id: str, n: int, budget: int | None, identity: str | None = None,
                        identity_budget: int | None = None) -> int | None | Literal["identity"]:
        """Count n more images scored for the key (and against the identity) if both budgets
        allow: the key's new total; None when the key's budget would go over, "identity" when
        the identity's would. Nothing is counted unless everything fits (one transaction)."""
        with self._tx(durable=False) as db:
            row = db.execute("UPDATE usage SET queries = queries + ? WHERE key_id = ? "
                             "AND (? IS NULL OR queries + ? <= ?) RETURNING queries",
                             (n, key_id, budget, n, budget)).fetchone()
            if row is None:
                return None
            if identity is not None:
                db.execute("INSERT INTO identity_usage (identity, queries) VALUES (?, 0) "
                           "ON CONFLICT (identity) DO NOTHING", (identity,))
                fits = db.execute("UPDATE identity_usage SET queries = queries + ? WHERE identity = ? "
                                  "AND (? IS NULL OR queries + ? <= ?) RETURNING queries",
                                  (n, identity, identity_budget, n, identity_budget)).fetchone()
                if fits is None:
                    db.execute("UPDATE usage SET queries = queries - ? WHERE key_id = ?", (n, key_id))
                    return "identity"
        return int(row[0])

    def refund_queries(self, key_id: str, n: int, identity: str | None = None) -> None:
        with self._tx(durable=False) as db:
            db.execute("UPDATE usage SET queries = MAX(0, queries - ?) WHERE key_id = ?", (n, key_id))
            if identity is not None:
                db.execute("UPDATE identity_usage SET queries = MAX(0, queries - ?) WHERE identity = ?",
                           (n, identity))

    def identity_queries(self, identity: str) -> int:
        row = self._db().execute("SELECT queries FROM identity_usage WHERE identity = ?", (identity,)).fetchone()
        return 0 if row is None else int(row[0])

    # -- the stateful detector's flags and blocks ---------------------------------------
    def add_flag(self, key_id: str, queries: int, distance: float, blocked: bool) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO flags (key_id, time, queries, distance, blocked) VALUES (?, ?, ?, ?, ?)",
                       (key_id, now(), queries, distance, int(blocked)))

    def flags(self, key_id: str | None = None) -> list[Flag]:
        rows = self._db().execute("SELECT key_id, time, queries, distance, blocked FROM flags "
                                  "WHERE ? IS NULL OR key_id = ? ORDER BY seq", (key_id, key_id))
        return [Flag(k, t, q, d, bool(b)) for k, t, q, d, b in rows]

    def is_blocked(self, key_id: str) -> bool:
        return self._db().execute("SELECT 1 FROM flags WHERE key_id = ? AND blocked = 1 LIMIT 1",
                                  (key_id,)).fetchone() is not None

    def secret(self) -> bytes:
        """The service's secret, made on first use and kept (hashed noise stays fixed across restarts)."""
        with self._tx() as db:
            db.execute("INSERT INTO meta (name, value) VALUES ('secret', ?) ON CONFLICT (name) DO NOTHING",
                       (secrets.token_bytes(32),))
            return bytes(db.execute("SELECT value FROM meta WHERE name = 'secret'").fetchone()[0])

    def usage(self, key_id: str) -> Usage:
        row = self._db().execute("SELECT requests, queries, rejected FROM usage WHERE key_id = ?",
                                 (key_id,)).fetchone()
        return Usage(key_id, *(row or (0, 0, 0)))

    def record(self, row: AuditRow) -> None:
        """The audit row of a finished request; a rejected one (4xx) also counts as rejected."""
        with self._tx(durable=False) as db:
            db.execute("INSERT INTO audit (time, key_id, endpoint, identity, images, status, error) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (now(), row.key_id, row.endpoint, row.identity, row.images, row.status, row.error))
            if row.key_id is not None and 400 <= row.status < 500:
                db.execute("UPDATE usage SET rejected = rejected + 1 WHERE key_id = ?", (row.key_id,))

    def audit_rows(self, limit: int = 1000) -> list[tuple]:
        return self._db().execute("SELECT time, key_id, endpoint, identity, images, status, error FROM audit "
                                  "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()

    def rejections(self) -> dict[str, int]:
        """Refused requests by error code (every 4xx the audit log holds)."""
        rows = self._db().execute("SELECT COALESCE(error, CAST(status AS TEXT)), COUNT(*) FROM audit "
                                  "WHERE status >= 400 AND status < 500 GROUP BY 1 ORDER BY 2 DESC")
        return {code: int(n) for code, n in rows}


__all__ = ["Store", "KeyRecord", "IdentityRecord", "Usage", "AuditRow", "Flag", "IdentityExists", "ROLES", "key_hash"]
