"""Durable state: one SQLite file by default; profiles here, datasets and jobs add their own tables.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

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


class ProfileBackend(Protocol):
    """Where profiles are stored: the seam for replicas that share them.

    The SQLite backend serves one node (or several processes on one host sharing the data dir). A
    Postgres or Redis backend implementing these five methods lets many replicas share one set of
    profiles: each replica's :class:`ProfileStore` polls :meth:`revision` and reloads on change.
    """

    def load_all(self) -> list[StoredProfile]: ...

    def upsert(self, profile: StoredProfile, *, create_only: bool) -> StoredProfile:
        """Store ``profile`` (keeping the original created_at on replace); ProfileExistsError if create_only."""
        ...

    def delete(self, name: str) -> bool: ...

    def revision(self) -> int:
        """A number that changes whenever any writer changes the profiles."""
        ...


class SqliteProfileBackend:
    """Profiles in the shared SQLite file; a revision counter row tracks every change."""

    _DDL = """
    CREATE TABLE IF NOT EXISTS profiles (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        interventions TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS profile_revision (id INTEGER PRIMARY KEY CHECK (id = 0), value INTEGER NOT NULL);
    INSERT OR IGNORE INTO profile_revision (id, value) VALUES (0, 0)
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(self._DDL)

    def load_all(self) -> list[StoredProfile]:
        with self.db.connect() as con:
            rows = con.execute("SELECT * FROM profiles ORDER BY name").fetchall()
        return [StoredProfile(r["name"], r["description"], parse_profile(json.loads(r["interventions"])),
                              r["created_at"], r["updated_at"]) for r in rows]

    def upsert(self, profile: StoredProfile, *, create_only: bool) -> StoredProfile:
        payload = json.dumps([s.model_dump(exclude_none=True) for s in profile.interventions])
        with self.db.transaction() as con:
            row = con.execute("SELECT created_at FROM profiles WHERE name = ?", (profile.name,)).fetchone()
            if row is not None and create_only:
                raise ProfileExistsError(profile.name)
            created = row["created_at"] if row is not None else profile.created_at
            con.execute(
                "INSERT OR REPLACE INTO profiles (name, description, interventions, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)", (profile.name, profile.description, payload, created, profile.updated_at))
            con.execute("UPDATE profile_revision SET value = value + 1 WHERE id = 0")
        return replace(profile, created_at=created)

    def delete(self, name: str) -> bool:
        with self.db.transaction() as con:
            deleted = con.execute("DELETE FROM profiles WHERE name = ?", (name,)).rowcount > 0
            if deleted:
                con.execute("UPDATE profile_revision SET value = value + 1 WHERE id = 0")
        return deleted

    def revision(self) -> int:
        with self.db.connect() as con:
            return int(con.execute("SELECT value FROM profile_revision WHERE id = 0").fetchone()[0])


class ProfileStore:
    """Named edit profiles. ``base`` is reserved (the unedited model) and never stored.

    Reads hit an in-memory mirror (the engine resolves a profile per batch); writes go to the
    backend first and update the mirror only after they committed. :meth:`refresh` picks up what
    other replicas wrote (the server calls it every ``profile_refresh_s``).
    """

    def __init__(self, backend: ProfileBackend | Database) -> None:
        self.backend: ProfileBackend = SqliteProfileBackend(backend) if isinstance(backend, Database) else backend
        self._lock = threading.Lock()
        self._cache: dict[str, StoredProfile] = {}
        self._revision = -1
        self.reload()

    def reload(self) -> None:
        revision = self.backend.revision()
        profiles = self.backend.load_all()
        with self._lock:
            self._cache = {p.name: p for p in profiles}
            self._revision = revision

    def refresh(self) -> bool:
        """Reload if another writer changed the profiles; True when it did."""
        if self.backend.revision() == self._revision:
            return False
        self.reload()
        return True

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
        stored = self.backend.upsert(StoredProfile(name, description, list(interventions), now, now),
                                     create_only=create_only)
        with self._lock:
            self._cache[name] = stored
        return stored

    def delete(self, name: str) -> bool:
        deleted = self.backend.delete(name)
        with self._lock:
            self._cache.pop(name, None)
        return deleted
