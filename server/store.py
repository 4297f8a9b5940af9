"""Durable state in one SQLite file: profiles here; datasets and jobs add their own tables.

WAL journal with ``synchronous=FULL``: a committed write survives ``kill -9`` and power loss.
Each call opens a short-lived connection, so stores are safe to use from any thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from laser_ops.interventions import InterventionSpec, parse_profile

RESERVED_PROFILES = frozenset({"base"})


class Database:
    """Connection factory plus idempotent schema creation."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA foreign_keys=ON")
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def ensure_schema(self, ddl: str) -> None:
        with self.transaction() as con:
            for statement in ddl.split(";"):
                if statement.strip():
                    con.execute(statement)


@dataclass(frozen=True)
class StoredProfile:
    name: str
    description: str
    interventions: list[InterventionSpec]
    created_at: float
    updated_at: float


class ProfileExistsError(KeyError):
    pass


class ProfileStore:
    """Named edit profiles. ``base`` is reserved (the unedited model) and never stored.

    Reads hit an in-memory mirror (the engine resolves a profile per batch); writes go to SQLite
    first and update the mirror only after the commit.
    """

    _DDL = """
    CREATE TABLE IF NOT EXISTS profiles (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        interventions TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(self._DDL)
        self._lock = threading.Lock()
        self._cache: dict[str, StoredProfile] = {}
        self.reload()

    def reload(self) -> None:
        with self.db.connect() as con:
            rows = con.execute("SELECT * FROM profiles ORDER BY name").fetchall()
        with self._lock:
            self._cache = {r["name"]: self._row(r) for r in rows}

    @staticmethod
    def _row(r: sqlite3.Row) -> StoredProfile:
        return StoredProfile(r["name"], r["description"], parse_profile(json.loads(r["interventions"])),
                             r["created_at"], r["updated_at"])

    def list(self) -> list[StoredProfile]:
        with self._lock:
            return sorted(self._cache.values(), key=lambda p: p.name)

    def get(self, name: str) -> StoredProfile | None:
        with self._lock:
            return self._cache.get(name)

    def specs(self, name: str) -> list[InterventionSpec]:
        """Interventions of a profile (``base`` -> []); KeyError if unknown."""
        if name == "base":
            return []
        p = self.get(name)
        if p is None:
            raise KeyError(name)
        return p.interventions

    def __contains__(self, name: object) -> bool:
        return name == "base" or (isinstance(name, str) and self.get(name) is not None)

    def put(self, name: str, interventions: list[InterventionSpec], description: str = "", *,
            create_only: bool = False) -> StoredProfile:
        if name in RESERVED_PROFILES:
            raise ProfileExistsError(name)
        now = time.time()
        payload = json.dumps([s.model_dump(exclude_none=True) for s in interventions])
        with self.db.transaction() as con:
            row = con.execute("SELECT created_at FROM profiles WHERE name = ?", (name,)).fetchone()
            if row is not None and create_only:
                raise ProfileExistsError(name)
            created = row["created_at"] if row is not None else now
            con.execute(
                "INSERT OR REPLACE INTO profiles (name, description, interventions, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)", (name, description, payload, created, now))
        stored = StoredProfile(name, description, list(interventions), created, now)
        with self._lock:
            self._cache[name] = stored
        return stored

    def delete(self, name: str) -> bool:
        with self.db.transaction() as con:
            deleted = con.execute("DELETE FROM profiles WHERE name = ?", (name,)).rowcount > 0
        with self._lock:
            self._cache.pop(name, None)
        return deleted
